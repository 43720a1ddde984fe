"""The memory of one video being segmented: global memory (stage-4 keys and values of chosen frames) and local
memory (the previous frame, stages 2-4).

Layout. Global keys live in one preallocated buffer B x Ck x T_cap x P and values in B x T_cap x P x N_cap x Cv4
(P = H4 * W4 positions per frame, T_cap frame slots). A read takes the used slots as a view, flattened to the
B x Ck x M / B x N x Cv4 x M (M = T * P) the network expects, so nothing is concatenated per frame. Values are
position-major because the top-k global read gathers whole value rows (all objects' channels of one position):
the view it transposes back to is then contiguous, not a copy per frame. Capacity grows
geometrically (x2) when a frame does not fit; with `max_frames` it never exceeds that many slots (plus prompt
frames beyond it, see below): the oldest evictable frame's slot is overwritten in place, so memory stays flat on
long videos. Softmax over memory positions does not depend on their order, so slots need not be in time order.

Which frames are kept. Frames given a mask ("prompt" frames, the first frame among them) are pinned: they hold the
only ground truth of their objects and are never evicted. Other frames are evicted oldest first once
`max_frames` frames are held. If prompts alone fill `max_frames`, one extra slot still holds the newest frame.

Objects added later (design choice). Objects are grouped by the frame they were first given at; a group reads
only memory frames from that frame on: its global read is a separate softmax over those frames (a view when they
are consecutive slots, else gathered), as XMem/Cutie do with their per-object memory buckets. The alternative,
encoding an empty mask for the new object into the older frames (STCN, which knows every object up front), would
need the old images again and would tell the new object "you are background" wherever it already was visible.
Value rows of a group in slots older than its start are never read (left at zero).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmrc.model.memory_reads import memory_key_sq
from lmrc.model.network import MemoryInput


@dataclass
class ObjectGroup:
    """Objects first given at frame `start` (frame counter of the segmenter); they are objects [first, last)."""

    start: int
    first: int
    last: int


class MemoryBank:
    """Global + local memory of one video. All tensors have batch size B (1 for the segmenter).

    `max_frames`: None keeps every global-memory frame; else the pinned (prompt) frames plus the most recent
    others, `max_frames` in all (at least 2).
    """

    def __init__(self, max_frames: int | None = None, initial_capacity: int = 8,
                 dtype: torch.dtype | None = None) -> None:
        if max_frames is not None and max_frames < 2:
            raise ValueError("max_frames must be at least 2 (the first frame and one recent frame)")
        self.max_frames = max_frames
        self.initial_capacity = initial_capacity
        self.dtype = dtype  # of the global buffers (None: the first key's and value's)
        self.keys: Tensor | None = None  # B x Ck x T_cap x P
        self.key_sq: Tensor | None = None  # B x T_cap x P: ||key||^2 in float32, computed once per memory frame
        self.values: Tensor | None = None  # B x T_cap x P x N_cap x Cv4
        self.slot_frame: list[int] = []  # frame index held by each used slot
        self.pinned: set[int] = set()  # frame indices that are never evicted
        self.groups: list[ObjectGroup] = []
        self.local_keys: dict[int, Tensor] = {}
        self.local_values: dict[int, Tensor] = {}
        self.local_frame: int | None = None
        self.feature_size: tuple[int, int] | None = None  # (H4, W4)

    # --- objects -------------------------------------------------------------------------------------------------

    @property
    def num_objects(self) -> int:
        return self.groups[-1].last if self.groups else 0

    def add_objects(self, count: int, start: int) -> ObjectGroup:
        """Register `count` objects first given at frame `start`; they read memory frames >= start only."""
        if count <= 0:
            raise ValueError("add at least one object")
        if self.slot_frame and start <= max(self.slot_frame):
            raise ValueError(f"new objects start at frame {start}, but memory already holds frame {max(self.slot_frame)}")
        group = ObjectGroup(start, self.num_objects, self.num_objects + count)
        self.groups.append(group)
        if self.values is not None and self.values.shape[3] < group.last:
            self._resize(objects=group.last)
        return group

    # --- global memory -------------------------------------------------------------------------------------------

    @property
    def frames(self) -> list[int]:
        """Frame indices in the global memory, in time order."""
        return sorted(self.slot_frame)

    @property
    def capacity(self) -> int:
        """Frame slots allocated."""
        return 0 if self.keys is None else self.keys.shape[2]

    def add_global(self, frame: int, key: Tensor, value: Tensor, pinned: bool = False) -> None:
        """Add frame `frame`: key B x Ck x H4 x W4, value B x N x Cv4 x H4 x W4 (N = objects known now)."""
        if value.shape[1] != self.num_objects:
            raise ValueError(f"value has {value.shape[1]} objects, memory knows {self.num_objects}")
        if frame in self.slot_frame:
            raise ValueError(f"frame {frame} is already in memory")
        size = tuple(key.shape[-2:])
        if self.feature_size is None:
            self.feature_size = size
        elif size != self.feature_size:
            raise ValueError(f"frame {frame} has features {size}, memory holds {self.feature_size}: one video, one size")
        if pinned:
            self.pinned.add(frame)
        slot = self._free_slot(key, value)
        self.keys[:, :, slot] = key.flatten(2)
        self.key_sq[:, slot] = memory_key_sq(self.keys[:, :, slot].float())
        self.values[:, slot, :, : value.shape[1]] = value.flatten(3).permute(0, 3, 1, 2)
        self.values[:, slot, :, value.shape[1]:] = 0
        if slot == len(self.slot_frame):
            self.slot_frame.append(frame)
        else:
            self.slot_frame[slot] = frame

    def _free_slot(self, key: Tensor, value: Tensor) -> int:
        used = len(self.slot_frame)
        if self.keys is None:
            b, ck = key.shape[:2]
            p = key.shape[-2] * key.shape[-1]
            cap = self.initial_capacity if self.max_frames is None else min(self.initial_capacity, self.max_frames)
            self.keys = key.new_zeros(b, ck, cap, p, dtype=self.dtype or key.dtype)
            self.key_sq = self.keys.new_zeros(b, cap, p, dtype=torch.float32)  # in float whatever the keys' dtype
            self.values = value.new_zeros(b, cap, p, max(value.shape[1], 1), value.shape[2],
                                          dtype=self.dtype or value.dtype)
            return 0
        limit = self.max_frames
        if limit is not None:
            # Prompt frames are never evicted; when they alone fill the limit, one more slot holds the newest frame.
            allowed = max(limit, len(self.pinned) + 1)  # self.pinned already counts the frame being added
            evictable = [s for s, f in enumerate(self.slot_frame) if f not in self.pinned]
            if used + 1 > allowed and evictable:
                return min(evictable, key=lambda s: self.slot_frame[s])  # the oldest unpinned frame goes
        if used == self.capacity:
            grow = self.capacity * 2
            if limit is not None:
                grow = max(min(grow, limit), used + 1)
            self._resize(frames=grow)
        return used

    def _resize(self, frames: int | None = None, objects: int | None = None) -> None:
        """Reallocate to `frames` slots / `objects` object rows, copying what is held (rare: geometric growth)."""
        t = frames or self.keys.shape[2]
        n = objects or self.values.shape[3]
        keys = self.keys.new_zeros(*self.keys.shape[:2], t, self.keys.shape[3])
        values = self.values.new_zeros(self.values.shape[0], t, self.values.shape[2], n, self.values.shape[4])
        used = len(self.slot_frame)
        keys[:, :, :used] = self.keys[:, :, :used]
        key_sq = self.key_sq.new_zeros(self.key_sq.shape[0], t, self.key_sq.shape[2])
        key_sq[:, :used] = self.key_sq[:, :used]
        self.key_sq = key_sq
        values[:, :used, :, : self.values.shape[3]] = self.values[:, :used]
        self.keys, self.values = keys, values

    # --- local memory --------------------------------------------------------------------------------------------

    def set_local(self, frame: int, keys: dict[int, Tensor], values: dict[int, Tensor]) -> None:
        """The previous frame: keys {r: B x Ck x Hr x Wr} (its query encoding), values {r: B x N x Cv_r x Hr x Wr}."""
        self.local_frame = frame
        self.local_keys = dict(keys)
        self.local_values = dict(values)

    # --- reads ---------------------------------------------------------------------------------------------------

    def group_slots(self, group: ObjectGroup) -> list[int]:
        """Slots a group may read: frames from its start on."""
        return [s for s, f in enumerate(self.slot_frame) if f >= group.start]

    def memory_for(self, group: ObjectGroup) -> MemoryInput:
        """What the objects of `group` read: global frames >= group.start, and the local memory, their rows only."""
        slots = self.group_slots(group)
        if not slots:
            raise RuntimeError(f"objects first given at frame {group.start} have no memory frame")
        objects = slice(group.first, group.last)
        if slots == list(range(slots[0], slots[-1] + 1)):
            # Consecutive slots: views of the buffers (flatten merges T and P without copying).
            window = slice(slots[0], slots[-1] + 1)
            keys = self.keys[:, :, window]
            key_sq = self.key_sq[:, window]
            values = self.values[:, window, :, objects]
        else:
            index = torch.tensor(slots, device=self.keys.device)
            keys = self.keys.index_select(2, index)
            key_sq = self.key_sq.index_select(1, index)
            values = self.values[:, :, :, objects].index_select(1, index)
        values = values.permute(0, 3, 4, 1, 2).flatten(3)  # B x N x Cv4 x M: a view of the position-major rows
        local_values = {r: v[:, objects] for r, v in self.local_values.items()}
        return MemoryInput(keys.flatten(2), values, self.local_keys, local_values, global_key_sq=key_sq.flatten(1))

    def nbytes(self) -> int:
        """Bytes held by the global buffers (not counting the local memory, which is one frame)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.key_sq, self.values) if t is not None)
