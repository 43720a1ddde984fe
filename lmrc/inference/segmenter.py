"""`Segmenter`: segment a video frame by frame (streaming), with objects given at any frame.

    seg = Segmenter(load_model("lmrc-lite"), InferenceConfig(mem_every=5, size=480))
    for i, rgb in enumerate(frames):                      # H x W x 3 uint8
        probs = seg.step(rgb, mask if i == 0 else None)   # (N+1) x H x W, channel 0 = background
        ids = seg.probs_to_ids(probs)                     # H x W uint8 object ids

Schedule (paper, Section III-E-2, as STCN): a frame given a mask enters the global memory; after the first such
frame (the start), every frame whose position relative to the start is a multiple of `mem_every` enters it too;
the previous frame is always the local memory. A frame's memory value is encoded from its predicted probabilities
(merged with the mask where one is given). Each frame is encoded by the key encoder once: its keys serve as the
query, then as the local memory of the next frame, and (stage 4) as its global-memory key.

Frames are processed with the shorter side resized to `size` (aspect kept), padded to a multiple of 16 (evenly
split), and the probabilities are cropped and resized back to the input's own size.

Test-time flip (`flip=True`): every frame is also processed mirrored left-right, with a memory of its own; the
two predictions are averaged (the mirrored one flipped back) and both memories are written from the average
(mirrored for the mirrored one).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lmrc.inference.config import InferenceConfig
from lmrc.inference.fast_path import prepare_for_inference
from lmrc.inference.memory_bank import MemoryBank
from lmrc.model.aggregate import soft_aggregate_probabilities
from lmrc.model.network import FrameEncoding, crop_padding, pad_to_multiple
from lmrc.utils.device import choose_device, choose_precision
from lmrc.utils.errors import LmrcError
from lmrc.utils.timing import StageTimer


class Segmenter:
    """Streaming LMRC inference for one video at a time; `reset()` starts the next with the same inference copy.

    model: an `LMRC` (e.g. from `lmrc.load_model`); it is not changed (not moved, retyped or put in eval mode):
    the segmenter builds its own inference copy once, on the config's device. Or a network another runtime runs
    (`lmrc.inference.onnx_runtime.OnnxModel`): used as it is. config: `InferenceConfig`;
    keyword `settings` replace its fields (`Segmenter(model, size=240)`). optimize: the inference fast path
    (`lmrc.inference.fast_path`: same results up to float rounding); False runs the plain network, the reference.
    compile: also torch.compile its encoders and decoder (slow first frames).
    `object_ids` lists the ids in channel order (order of first appearance; ids given together are sorted);
    `precision` / `precision_reason`: the precision chosen (for "auto": from the hardware) and why;
    `timer`: the `StageTimer` of every stage (`lmrc bench` records it).
    """

    def __init__(self, model: torch.nn.Module, config: InferenceConfig | None = None, *, optimize: bool = True,
                 compile: bool = False, **settings) -> None:
        self.config = dataclasses.replace(config or InferenceConfig(), **settings)
        self.device = choose_device(self.config.device)
        if isinstance(model, torch.nn.Module):
            self._build_inference_copy(model, optimize, compile)
        else:
            self._use_runtime(model)
        self.reset()

    def _build_inference_copy(self, model: torch.nn.Module, optimize: bool, compile: bool) -> None:
        choice = choose_precision(self.config.precision, self.device)
        self.precision, self.precision_reason = choice.name, choice.reason
        self._autocast_dtype = choice.autocast_dtype
        self.timer = StageTimer()
        if optimize or compile:
            self.model = prepare_for_inference(model, fold=optimize, channels_last=optimize, project_values=optimize,
                                               compile=compile, device=self.device, dtype=self._autocast_dtype,
                                               timer=self.timer)
        else:  # the plain network, on a copy: the caller's model stays as it is
            self.model = copy.deepcopy(model).to(self.device).eval().requires_grad_(False)

    def _use_runtime(self, model) -> None:
        """A network run by another runtime behind the same methods (`lmrc.inference.onnx_runtime.OnnxModel`): used
        as given (not copied; optimize / compile do not apply), in the one precision it computes in (its
        `precision`), timed by its own `timer`."""
        fixed = model.precision
        if self.config.precision not in ("auto", fixed):
            raise LmrcError(f"{model.runtime} runs the {fixed} graphs only: use precision {fixed} (or auto), "
                            f"not {self.config.precision}")
        if self.config.device == "auto":
            self.device = torch.device(model.device)
        self.model = model.to(self.device)  # LmrcError on a device the runtime does not run on
        model.check_read_top_k(self.config.top_k)  # LmrcError if the graphs keep another top-k
        self.precision, self.precision_reason = fixed, f"{model.runtime} runs the exported {fixed} graphs"
        self._autocast_dtype = None
        self.timer = model.timer

    def reset(self) -> None:
        """Forget the video: memory, objects and frame counter (the inference copy is kept)."""
        cap = self.config.max_memory_frames
        # one memory per view: the frame, and with flip its mirror image
        # the global memory in the precision the network computes in (the fast path's keys leave it as float32)
        self.memories = [MemoryBank(cap, dtype=self._autocast_dtype) for _ in range(2 if self.config.flip else 1)]
        self.object_ids: list[int] = []
        self.frame_index = 0  # frames stepped so far; the schedule counts in these
        self.start: int | None = None  # frame index of the first mask
        self.input_size: tuple[int, int] | None = None
        self.process_size: tuple[int, int] | None = None
        self._reliability: tuple[dict[str, Tensor], tuple[int, int, int, int], tuple[int, int]] | None = None
        workspace = getattr(self.model, "workspace", None)
        if workspace is not None:
            workspace.clear()

    @property
    def memory(self) -> MemoryBank:
        """The memory of the frames as given (with flip, `memories[1]` is the mirrored view's)."""
        return self.memories[0]

    @property
    def memory_frames(self) -> list[int]:
        """Frame indices (0 = first frame stepped) in the global memory, in time order."""
        return self.memory.frames

    @property
    def reliability(self) -> dict[str, Tensor]:
        """The memory comparator's reliability maps H (eq. 10) of the last stepped frame, {"L4": H x W, ...} at
        the input's size (of the first object group, and the unmirrored view); empty without a comparator."""
        return self.reliability_at(self.input_size)

    def reliability_at(self, size: tuple[int, int]) -> dict[str, Tensor]:
        """`reliability` at another size (H, W); `process_size` holds all their detail without a resize."""
        if self._reliability is None:
            return {}
        maps, pads, padded = self._reliability
        return {name: self._resize(crop_padding(F.interpolate(h.float(), size=padded, mode="bilinear",
                                                              align_corners=False), pads), size)[0, 0]
                for name, h in maps.items()}

    def probs_to_ids(self, probs: Tensor | np.ndarray) -> np.ndarray:
        """(N+1) x H x W probabilities of this video (channel 0 background) -> H x W uint8 object ids (argmax)."""
        return output_prob_to_mask(probs, self.object_ids)

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
        timer = self.timer

        with torch.inference_mode():
            # Resizing stays in fp32 outside autocast; only the network runs in reduced precision.
            x, pads = pad_to_multiple(self._resize(image, self.process_size))
            views = [x, x.flip(-1)] if self.config.flip else [x]
            with self._autocast(), timer.stage("key_encoding"):
                queries = [self.model.encode_key(view) for view in views]
            probs = None
            if self.object_ids:
                with self._autocast():
                    predictions = [self._predict(query, memory) for query, memory in zip(queries, self.memories)]
                probs = predictions[0][0] if len(views) == 1 else (predictions[0][0] + predictions[1][0].flip(-1)) / 2
                self._reliability = (predictions[0][1], pads, tuple(x.shape[-2:]))
            if given is not None:
                listed, hard = given
                new = [o for o in listed if o not in self.object_ids]
                if new:
                    for memory in self.memories:
                        memory.add_objects(len(new), index)
                    self.object_ids.extend(new)
                probs = self._merge(probs, pad_to_multiple(self._resize(hard, self.process_size))[0], listed)

            to_global = given is not None or (index - self.start) % self.config.mem_every == 0
            stages = set(self.model.config.local_read_stages) | ({4} if to_global else set())
            if stages:
                probs_per_view = [probs, probs.flip(-1)] if self.config.flip else [probs]
                for view, query, memory, view_probs in zip(views, queries, self.memories, probs_per_view):
                    self._memorise(index, view, query, memory, view_probs, tuple(sorted(stages)), to_global,
                                   pinned=given is not None)

            out = self._resize(crop_padding(probs, pads), self.input_size)
            if given is not None:  # the given mask itself, exact at the input's resolution
                out = self._merge(out, given[1], given[0])
        return out[0]

    def _memorise(self, index: int, image: Tensor, query: FrameEncoding, memory: MemoryBank, probs: Tensor,
                  stages: tuple[int, ...], to_global: bool, pinned: bool) -> None:
        """Encode the frame's value from its probabilities and write it into `memory` (global and/or local)."""
        with self._autocast(), self.timer.stage("value_encoding"):
            values = self.model.encode_value(image, query, probs[:, 1:], stages=stages)
        with self.timer.stage("memory"):
            if to_global:
                memory.add_global(index, query.keys[4], self.model.global_memory_value(values[4]), pinned=pinned)
            memory.set_local(index, query.keys, values)

    def _predict(self, query: FrameEncoding, bank: MemoryBank) -> tuple[Tensor, dict[str, Tensor]]:
        """Each object group reads its own memory; logits are then softly aggregated over all objects.
        -> (1 x (N+1) x h x w fp32 probabilities, the first group's reliability maps)."""
        logits, reliability = [], {}
        for group in bank.groups:
            with self.timer.stage("memory"):
                memory = bank.memory_for(group)
            result = self.model.read_and_decode(query, memory, self.config.top_k)
            if len(bank.groups) == 1:
                return result.probs.float(), result.reliability
            reliability = reliability or result.reliability
            logits.append(result.logits)
        return soft_aggregate_probabilities(torch.cat(logits, 1)), reliability

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
        image = image.float().div_(255) if image.dtype == torch.uint8 else image.float()
        size = tuple(image.shape[-2:])
        if self.input_size is None:
            self.input_size = size
            self.process_size = self._process_size(size)
        elif size != self.input_size:
            raise ValueError(f"frame {self.frame_index} is {size[1]}x{size[0]}, the video is "
                             f"{self.input_size[1]}x{self.input_size[0]}; call reset() for another video")
        return image[None]

    def _process_size(self, size: tuple[int, int]) -> tuple[int, int]:
        if self.config.size is None:
            return size
        h, w = size
        scale = self.config.size / min(h, w)
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
        # antialiasing only matters when shrinking; enlarging with it gives the same values 3x slower (1080p output)
        shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)

    def _autocast(self):
        dtype = self._autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


def output_prob_to_mask(probs: Tensor | np.ndarray, object_ids: Sequence[int]) -> np.ndarray:
    """(N+1) x H x W probabilities (channel 0 background) -> H x W uint8 object ids (argmax; 0 = background)."""
    if isinstance(probs, np.ndarray):
        probs = torch.from_numpy(probs)
    if probs.shape[0] != len(object_ids) + 1:
        raise ValueError(f"probs has {probs.shape[0]} channels, expected {len(object_ids) + 1} (background + objects)")
    lookup = torch.tensor([0, *object_ids], dtype=torch.uint8)
    # max(0).indices, not argmax(0): the same first-maximum index, but argmax over the outer dim of a few channels
    # took 78 ms at 480p here (half of `lmrc segment`'s time per frame) against 1.3 ms
    return lookup[probs.max(0).indices.cpu()].numpy()
