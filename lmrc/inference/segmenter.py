"""`Segmenter`: segment a video frame by frame (streaming), with objects given at any frame.

    seg = Segmenter(load_model("lmrc-lite"), mem_every=5, size=480)
    for i, rgb in enumerate(frames):                      # H x W x 3 uint8
        probs = seg.step(rgb, mask if i == 0 else None)   # (N+1) x H x W, channel 0 = background
        ids = output_prob_to_mask(probs, seg.object_ids)  # H x W uint8 object ids

Schedule (paper, Section III-E-2, as STCN): a frame given a mask enters the global memory; after the first such
frame (the start), every frame whose position relative to the start is a multiple of `mem_every` enters it too;
the previous frame is always the local memory. A frame's memory value is encoded from its predicted probabilities
(merged with the mask where one is given). Each frame is encoded by the key encoder once: its keys serve as the
query, then as the local memory of the next frame, and (stage 4) as its global-memory key.

Frames are processed with the shorter side resized to `size` (aspect kept), padded to a multiple of 16 (evenly
split), and the probabilities are cropped and resized back to the input's own size.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lmrc.inference.memory_bank import MemoryBank
from lmrc.inference.timing import stage
from lmrc.model.aggregate import soft_aggregate
from lmrc.model.network import crop_padding, pad_to_multiple

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Segmenter:
    """Streaming LMRC inference for one video at a time (`reset()` starts the next).

    model: an `LMRC` (e.g. from `lmrc.model.weights.load_model`); mem_every: global-memory interval;
    max_memory_frames: None keeps every memory frame, else the prompt frames plus the most recent ones, that many in
    all (>= 2); size: shorter side during processing (None: the input's own); precision: "fp32", "bf16" or "fp16"
    (autocast); device: where to run (default: the model's device; the model is moved there); optimize: run an
    inference copy of the model with BatchNorm folded into the convolutions (same results up to float rounding, see
    `lmrc.model.inference`); compile: also torch.compile its encoders and decoder (slow first frames).
    `object_ids` lists the ids in channel order (order of first appearance; ids given together are sorted).
    """

    def __init__(self, model: torch.nn.Module, *, mem_every: int = 5, max_memory_frames: int | None = None,
                 size: int | None = 480, precision: str = "fp32", device: str | torch.device | None = None,
                 optimize: bool = True, compile: bool = False) -> None:
        if mem_every < 1:
            raise ValueError("mem_every must be >= 1")
        if max_memory_frames is not None and max_memory_frames < 2:
            raise ValueError("max_memory_frames must be >= 2 (the first frame and one recent frame)")
        if size is not None and size < 16:
            raise ValueError("size must be >= 16 pixels (or None for the input's own size)")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        if optimize or compile:
            from lmrc.model.inference import prepare_for_inference

            # A copy: the caller's model (e.g. one being trained) keeps its modules and state-dict keys.
            self.model = prepare_for_inference(self.model, fold=optimize, channels_last=optimize,
                                               project_values=optimize, compile=compile)
        self.mem_every = mem_every
        self.max_memory_frames = max_memory_frames
        self.size = size
        self.precision = precision
        self.reset()

    def reset(self) -> None:
        """Forget the video: memory, objects and frame counter."""
        self.memory = MemoryBank(self.max_memory_frames)
        self.object_ids: list[int] = []
        self.frame_index = 0  # frames stepped so far; the schedule counts in these
        self.start: int | None = None  # frame index of the first mask
        # APP-MINIMAL (until the refactor's `Segmenter.reliability` merges): the comparator's H maps of the last
        # predicted frame, {name: 1 x 1 x h x w} at the padded processing size / stride, and that frame's padding.
        self.last_reliability: dict[str, Tensor] = {}
        self.last_pads: tuple[int, int, int, int] = (0, 0, 0, 0)
        self.input_size: tuple[int, int] | None = None
        self.process_size: tuple[int, int] | None = None

    @property
    def memory_frames(self) -> list[int]:
        """Frame indices (0 = first frame stepped) in the global memory, in time order."""
        return self.memory.frames

    # --- one frame -----------------------------------------------------------------------------------------------

    def step(self, frame: np.ndarray | Tensor, mask: np.ndarray | Tensor | None = None,
             objects: Sequence[int] | None = None) -> Tensor:
        """Segment the next frame; returns (N+1) x H x W float32 probabilities on `device` at the input's size.

        frame: H x W x 3 uint8 RGB (numpy) or 3 x H x W float tensor in [0, 1].
        mask: H x W object ids for the objects in `objects` (default: every non-zero id in the mask): new objects
        start there, known ones are replaced by it; other known objects keep their prediction outside the mask.
        Before the first mask there is nothing to track: the result is 1 x H x W background.
        """
        image = self._image(frame)
        index = self.frame_index
        self.frame_index += 1
        given = self._given(mask, objects, image.shape[-2:]) if mask is not None else None
        if not self.object_ids and given is None:
            return torch.ones(1, *image.shape[-2:], device=self.device)
        if self.start is None:
            self.start = index

        with torch.inference_mode():
            # Resizing stays in fp32 outside autocast; only the network runs in reduced precision.
            x, pads = pad_to_multiple(self._resize(image, self.process_size))
            self.last_pads = pads  # APP-MINIMAL
            with self._autocast():
                with stage("key_encoding"):
                    query = self.model.encode_key(x)
                probs = self._predict(query) if self.object_ids else None  # 1 x (N_old+1) x h x w, fp32
            if given is not None:
                listed, hard = given
                new = [o for o in listed if o not in self.object_ids]
                if new:
                    self.memory.add_objects(len(new), index)
                    self.object_ids.extend(new)
                probs = self._merge(probs, pad_to_multiple(self._resize(hard, self.process_size))[0], listed)

            to_global = given is not None or (index - self.start) % self.mem_every == 0
            stages = set(self.model.config.local_read_stages) | ({4} if to_global else set())
            if stages:
                with self._autocast(), stage("value_encoding"):
                    values = self.model.encode_value(x, query, probs[:, 1:], stages=tuple(sorted(stages)))
                with stage("memory"):
                    if to_global:
                        self.memory.add_global(index, query.keys[4], self.model.global_memory_value(values[4]),
                                               pinned=given is not None)
                    self.memory.set_local(index, query.keys, values)

            out = self._resize(crop_padding(probs, pads), self.input_size)
            if given is not None:  # the given mask itself, exact at the input's resolution
                out = self._merge(out, given[1], given[0])
        return out[0]

    def _predict(self, query) -> Tensor:
        """Each object group reads its own memory; logits are then softly aggregated over all objects."""
        logits = []
        for group in self.memory.groups:
            with stage("memory"):
                memory = self.memory.memory_for(group)
            result = self.model.read_and_decode(query, memory)
            if not logits:  # APP-MINIMAL: keys are shared by all groups; keep the first group's maps
                self.last_reliability = result.reliability
            if len(self.memory.groups) == 1:
                return result.probs.float()
            logits.append(result.logits)
        return soft_aggregate(torch.cat(logits, 1))[1].float()

    def _merge(self, probs: Tensor | None, given: Tensor, listed: list[int]) -> Tensor:
        """Put the given masks (1 x K x h x w, objects `listed`) over the prediction (1 x (N_old+1) x h x w) -> 1 x
        (N+1) x h x w in `object_ids` order: listed objects take the mask, the others are cut where it has an object."""
        n = len(self.object_ids)
        objects = given.new_zeros(1, n, *given.shape[-2:])
        if probs is not None:
            old = probs.shape[1] - 1
            covered = given.sum(1, keepdim=True).clamp(0, 1)
            objects[:, :old] = probs[:, 1:].to(given.dtype) * (1 - covered)
        for k, object_id in enumerate(listed):
            objects[:, self.object_ids.index(object_id)] = given[:, k]
        background = (1 - objects.sum(1, keepdim=True)).clamp(0, 1)
        return torch.cat([background, objects], 1)

    # --- inputs --------------------------------------------------------------------------------------------------

    def _image(self, frame: np.ndarray | Tensor) -> Tensor:
        """-> 1 x 3 x H x W float32 in [0, 1] on the device; fixes the sizes at the first frame."""
        if isinstance(frame, np.ndarray):
            if frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(f"frame must be H x W x 3 RGB, got shape {frame.shape}")
            image = torch.tensor(frame).permute(2, 0, 1)  # a copy: decoders hand out read-only arrays
        elif isinstance(frame, Tensor):
            if frame.ndim != 3 or frame.shape[0] != 3:
                raise ValueError(f"frame tensor must be 3 x H x W, got shape {tuple(frame.shape)}")
            image = frame
        else:
            raise TypeError(f"frame must be a numpy array or a tensor, got {type(frame).__name__}")
        image = image.to(self.device)
        image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
        size = tuple(image.shape[-2:])
        if self.input_size is None:
            self.input_size = size
            self.process_size = self._process_size(size)
        elif size != self.input_size:
            raise ValueError(f"frame {self.frame_index} is {size[1]}x{size[0]}, the video is "
                             f"{self.input_size[1]}x{self.input_size[0]}; call reset() for another video")
        return image[None]

    def _process_size(self, size: tuple[int, int]) -> tuple[int, int]:
        if self.size is None:
            return size
        h, w = size
        scale = self.size / min(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))

    def _given(self, mask: np.ndarray | Tensor, objects: Sequence[int] | None,
               size: tuple[int, int]) -> tuple[list[int], Tensor]:
        """-> (listed ids, 1 x K x H x W float one-hot of them)."""
        ids = (mask if isinstance(mask, Tensor) else torch.tensor(np.asarray(mask))).to(self.device)
        if ids.ndim != 2 or tuple(ids.shape) != tuple(size):
            raise ValueError(f"mask must be H x W = {tuple(size)} like its frame, got {tuple(ids.shape)}")
        ids = ids.long()
        present = [int(i) for i in torch.unique(ids).tolist() if i != 0]
        listed = sorted(present) if objects is None else [int(o) for o in objects]
        if len(set(listed)) != len(listed) or any(o <= 0 for o in listed):
            raise ValueError(f"objects must be distinct positive ids, got {listed}")
        missing = [o for o in listed if o not in present and o not in self.object_ids]
        if missing:
            raise ValueError(f"new object(s) {missing} have no pixel in their first mask")
        if not listed:
            raise ValueError("the mask holds no object (only background); pass mask=None for a frame without one")
        onehot = torch.stack([ids == o for o in listed]).float()[None]
        return listed, onehot

    def _resize(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


def output_prob_to_mask(probs: Tensor | np.ndarray, object_ids: Sequence[int]) -> np.ndarray:
    """(N+1) x H x W probabilities (channel 0 background) -> H x W uint8 object ids (argmax; 0 = background)."""
    if isinstance(probs, np.ndarray):
        probs = torch.from_numpy(probs)
    if probs.shape[0] != len(object_ids) + 1:
        raise ValueError(f"probs has {probs.shape[0]} channels, expected {len(object_ids) + 1} (background + objects)")
    lookup = torch.tensor([0, *object_ids], dtype=torch.uint8)
    return lookup[probs.argmax(0).cpu()].numpy()
