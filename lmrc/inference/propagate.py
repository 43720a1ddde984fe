"""Propagate masks given on any frames to the whole video, forward and backward.

    for index, ids in propagate(load_model("lmrc-lite"), open_frames("clip.mp4"), {40: mask_at_40}, size=480):
        ...                                               # every frame 0..end, in order; ids H x W uint8

Rule. Each object is tracked over the whole video by two passes of the streaming `Segmenter`:
- the forward pass runs from the earliest prompt frame to the end; objects join at their prompt frames (a later
  prompt of a known object replaces its prediction there, as in `lmrc segment`);
- the backward pass (only when some object's first prompt is after the first frame) runs over the frames in
  reverse, from the latest *first* prompt frame B = max over objects of their first prompt, down to frame 0; the
  prompt masks on frames <= B enter in reverse order.
For frame t and object o the forward result is used when t >= o's first prompt frame (that frame lies after o's
nearest prompt going forward), else the backward one (t lies after o's first prompt going backward). Objects are
then combined by argmax over [background, objects]: where every object comes from the same pass that pass's own
background channel is used (a video whose prompts are all on frame 0 gives exactly the forward-only result); where
the passes mix, background = max(0, 1 - sum of the objects' probabilities).

Memory. Frames are decoded once, in order. The frames up to B and the backward results for frames before B are
kept until the forward pass reaches them (frames H x W x 3 uint8, results as uint8 probabilities, one map per
object that needs it); past `buffer_bytes` (default 1 GiB) further ones go to a temporary folder as .npy files and
are read back when needed, so a long video with a late prompt does not fill the RAM. An indexable sequence of
frames (a list of arrays) is read directly, without a buffer. Frames after B stream through, one at a time.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from lmrc.data.video import Frame, FrameSource
from lmrc.utils.errors import LmrcError
from lmrc.inference.segmenter import Segmenter, output_prob_to_mask

BUFFER_BYTES = 1 << 30


@dataclass
class PropagatedFrame:
    """One frame's result: `frame` (index, name, rgb), `ids` H x W uint8 object ids, `probs` (N+1) x H x W float32
    CPU tensor (channel 0 background, then `object_ids` in order), `direction` "forward", "backward" or "both"
    (which pass the objects' results came from)."""

    frame: Frame
    ids: np.ndarray
    probs: Tensor
    object_ids: list[int]
    direction: str

    @property
    def index(self) -> int:
        return self.frame.index


def propagate(model: torch.nn.Module | Callable[[], Segmenter], frames: FrameSource | Sequence[np.ndarray],
              prompts: Mapping[int, np.ndarray], **options: Any) -> Iterator[tuple[int, np.ndarray]]:
    """Segment every frame of `frames` from the object-id masks `prompts` (frame index -> H x W ids, 0 background),
    forward and backward (the module docstring states the rule); yields (frame index, H x W uint8 ids) in frame
    order, frame 0 first.

    model: an `LMRC` model, or a function returning a fresh `Segmenter`. frames: a `FrameSource`
    (`lmrc.data.video.open_frames`) or a sequence of H x W x 3 uint8 RGB arrays. options: `Segmenter` options
    (mem_every, max_memory_frames, size, precision, device) and those of `propagate_frames` (buffer_bytes,
    on_step).
    """
    for result in propagate_frames(model, frames, prompts, **options):
        yield result.index, result.ids


def propagate_frames(model: torch.nn.Module | Callable[[], Segmenter], frames: FrameSource | Sequence[np.ndarray],
                     prompts: Mapping[int, np.ndarray], *, backward: bool = True, buffer_bytes: int = BUFFER_BYTES,
                     on_step: Callable[[int, int | None], None] | None = None,
                     **segmenter_options: Any) -> Iterator[PropagatedFrame]:
    """As `propagate`, yielding `PropagatedFrame`s (the frame, ids, combined probabilities).

    backward: False skips the backward pass: frames before an object's first prompt leave it out (the YouTube-VOS
    protocol, where objects enter the scene at their first mask).
    on_step(done, total): called after every frame the network segments (total: frames both passes will segment,
    None when the video's length is unknown); raise from it to cancel. Stopping the iteration early also stops.
    """
    prompts = {int(k): np.asarray(v) for k, v in prompts.items()}
    if not prompts:
        raise LmrcError("no prompt: give at least one frame's mask (or a box) to propagate")
    first: dict[int, int] = {}
    for index in sorted(prompts):
        if index < 0:
            raise LmrcError(f"prompt frame {index} is negative; frames are numbered from 0")
        for object_id in np.unique(prompts[index]).tolist():
            if object_id:
                first.setdefault(int(object_id), index)
    if not first:
        raise LmrcError("the prompt masks hold no object (only background); draw at least one object")
    object_ids = sorted(first)
    start = min(prompts)  # forward pass starts here
    turn = max(first.values()) if backward else 0  # backward pass starts here (B); 0: no backward pass
    factory = callable(model) and not isinstance(model, torch.nn.Module)
    segmenter = model() if factory else Segmenter(model, **segmenter_options)
    reader = _Reader(frames, buffer_bytes)
    count = reader.count
    total = None if count is None else (turn + 1 if turn > 0 else 0) + count - start
    done = 0

    def stepped() -> None:
        nonlocal done
        done += 1
        if on_step is not None:
            on_step(done, total)

    with tempfile.TemporaryDirectory(prefix="lmrc-propagate-") as spill_dir:
        backward = _Store(buffer_bytes, Path(spill_dir) / "backward")
        if turn > 0:
            head = reader.read_until(turn, Path(spill_dir) / "frames")  # frames 0..B, decoded once
            _check_prompt_frames(prompts, head, turn, reader)
            segmenter.reset()
            for frame in reversed(head):
                probs = segmenter.step(frame.rgb, prompts.get(frame.index))
                stepped()
                if frame.index < turn:
                    needed = [o for o in segmenter.object_ids if first[o] > frame.index]
                    channels = [0] + [1 + segmenter.object_ids.index(o) for o in needed]
                    backward.put(frame.index, (needed, _quantise(probs[channels])))
            head_frames = head
        else:
            head_frames = []

        segmenter.reset()
        pending = sorted(k for k in prompts if k >= start)
        last_index = -1
        for frame in reader.rest(head_frames):
            last_index = frame.index
            if pending and pending[0] < frame.index:
                raise LmrcError(f"frame {pending[0]} carries a mask but could not be decoded; repair the frame or "
                                "draw the mask on another frame")
            forward = None
            if frame.index >= start:
                mask = prompts.get(frame.index)
                if mask is not None:
                    pending.pop(0)
                forward = segmenter.step(frame.rgb, mask)
                stepped()
            yield _combine(frame, object_ids, first, forward, segmenter.object_ids,
                           backward.pop(frame.index) if frame.index < turn else None)
        if pending:
            raise LmrcError(f"a mask names frame {pending[0]}, but the video ends at frame {last_index}")


def _combine(frame: Frame, object_ids: list[int], first: dict[int, int], forward: Tensor | None,
             forward_ids: list[int], backward: tuple[list[int], np.ndarray] | None) -> PropagatedFrame:
    """One frame's objects from the pass the rule picks for each -> combined probabilities and ids."""
    h, w = frame.rgb.shape[:2]
    t = frame.index
    from_backward = [o for o in object_ids if first[o] > t] if backward is not None else []
    forward = forward.float().cpu() if forward is not None else None
    if not from_backward:
        # Every object from the forward pass: its own channels, reordered to sorted ids.
        if forward is None:
            probs = torch.ones(1, h, w)
            probs = torch.cat([probs, torch.zeros(len(object_ids), h, w)])
        else:
            probs = torch.cat([forward[:1], _channels(forward, forward_ids, object_ids, h, w)])
        direction = "forward"
    else:
        back_ids, back_probs = backward if backward is not None else ([], np.zeros((1, h, w), np.uint8))
        back = torch.from_numpy(back_probs.astype(np.float32) / 255)
        if len(from_backward) == len(object_ids):
            probs = torch.cat([back[:1], _channels(back, back_ids, object_ids, h, w)])
            direction = "backward"
        else:
            objects = torch.zeros(len(object_ids), h, w)
            for k, o in enumerate(object_ids):
                source, ids = (back, back_ids) if o in from_backward else (forward, forward_ids)
                if source is not None and o in ids:
                    objects[k] = source[1 + ids.index(o)]
            probs = torch.cat([(1 - objects.sum(0, keepdim=True)).clamp(min=0), objects])
            direction = "both"
    return PropagatedFrame(frame, output_prob_to_mask(probs, object_ids), probs, object_ids, direction)


def _channels(probs: Tensor, ids: list[int], wanted: list[int], h: int, w: int) -> Tensor:
    """The object channels of `probs` (channel 0 background, then `ids`) in the order `wanted` (zeros for an object
    the pass has not met yet)."""
    out = torch.zeros(len(wanted), h, w)
    for k, o in enumerate(wanted):
        if o in ids:
            out[k] = probs[1 + ids.index(o)]
    return out


def _quantise(probs: Tensor) -> np.ndarray:
    return (probs.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def _check_prompt_frames(prompts: Mapping[int, np.ndarray], head: list[Frame], turn: int, reader: "_Reader") -> None:
    present = {f.index for f in head}
    for index in sorted(k for k in prompts if k <= turn):
        if index not in present:
            if head and head[-1].index >= index:
                raise LmrcError(f"frame {index} carries a mask but could not be decoded; repair the frame or draw "
                                "the mask on another frame")
            raise LmrcError(f"a mask names frame {index}, but {reader.where} ends after {len(head)} frames")


class _Store:
    """index -> value, held in memory up to `limit` bytes, then in .npy files under `folder`."""

    def __init__(self, limit: int, folder: Path):
        self.limit = limit
        self.folder = folder
        self.held = 0
        self.memory: dict[int, Any] = {}
        self.on_disk: dict[int, tuple[Any, Path]] = {}

    def put(self, key: int, value: tuple[Any, np.ndarray]) -> None:
        meta, array = value
        if self.held + array.nbytes <= self.limit:
            self.memory[key] = value
            self.held += array.nbytes
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{key}.npy"
        np.save(path, array)
        self.on_disk[key] = (meta, path)

    def pop(self, key: int) -> tuple[Any, np.ndarray] | None:
        if key in self.memory:
            value = self.memory.pop(key)
            self.held -= value[1].nbytes
            return value
        if key in self.on_disk:
            meta, path = self.on_disk.pop(key)
            array = np.load(path)
            path.unlink()
            return meta, array
        return None


class _Reader:
    """Frames in order from a FrameSource or a sequence of arrays; the first ones buffered for the backward pass."""

    def __init__(self, frames: FrameSource | Sequence[np.ndarray], buffer_bytes: int):
        self.buffer_bytes = buffer_bytes
        if isinstance(frames, FrameSource):
            self.source, self.array = frames, None
            self.count = frames.num_frames
            self.where = str(frames.path)
            self._iterator: Iterator[Frame] | None = None
        elif isinstance(frames, Sequence) or hasattr(frames, "__getitem__") and hasattr(frames, "__len__"):
            self.source, self.array = None, frames
            self.count = len(frames)
            self.where = "the frames given"
        else:
            raise TypeError(f"frames must be a FrameSource or a sequence of H x W x 3 arrays, got "
                            f"{type(frames).__name__}")

    def _frame(self, index: int) -> Frame:
        return Frame(index, f"{index:05d}", np.asarray(self.array[index]))

    def read_until(self, last: int, spill: Path) -> "_FrameList":
        """Frames with index <= last (fewer when the video ends first)."""
        if self.array is not None:
            return _FrameList([self._frame(i) for i in range(min(last + 1, self.count))], lazy=False)
        store = _FrameList([], lazy=True, limit=self.buffer_bytes, folder=spill)
        self._iterator = iter(self.source)
        for frame in self._iterator:
            store.append(frame)
            if frame.index >= last:
                break
        return store

    def rest(self, head: "_FrameList | list") -> Iterator[Frame]:
        """All frames in order: the buffered head first (released as it goes), then the rest of the source."""
        if self.array is not None:
            for index in range(self.count):
                yield self._frame(index)
            return
        if self._iterator is None:
            self._iterator = iter(self.source)
        if head:
            yield from head.drain()
        yield from self._iterator


class _FrameList:
    """Decoded frames in order, in memory up to `limit` bytes and in .npy files after that."""

    def __init__(self, frames: list[Frame], *, lazy: bool, limit: int = 0, folder: Path | None = None):
        self.frames: list[Frame | tuple[int, str, Path]] = list(frames)
        self.lazy = lazy
        self.limit = limit
        self.folder = folder
        self.held = sum(f.rgb.nbytes for f in frames)

    def append(self, frame: Frame) -> None:
        if self.held + frame.rgb.nbytes <= self.limit:
            self.frames.append(frame)
            self.held += frame.rgb.nbytes
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{frame.index}.npy"
        np.save(path, frame.rgb)
        self.frames.append((frame.index, frame.name, path))

    def _load(self, item) -> Frame:
        if isinstance(item, Frame):
            return item
        index, name, path = item
        return Frame(index, name, np.load(path))

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, k: int) -> Frame:
        return self._load(self.frames[k])

    def __iter__(self) -> Iterator[Frame]:
        for item in self.frames:
            yield self._load(item)

    def __reversed__(self) -> Iterator[Frame]:
        for item in reversed(self.frames):
            yield self._load(item)

    def drain(self) -> Iterator[Frame]:
        """Iterate once in order, dropping each frame (and its file) once handed out."""
        while self.frames:
            item = self.frames.pop(0)
            frame = self._load(item)
            if not isinstance(item, Frame):
                item[2].unlink(missing_ok=True)
            yield frame
