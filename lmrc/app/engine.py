"""The network side of `lmrc app`: propagate a session's prompts over its cached frames, frame by frame.

One model is loaded per server and shared by every session (inference only, read-only weights); each propagation
makes its own `Segmenter`, so sessions never share memory banks.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
import torch.nn.functional as F

from lmrc.app.session import Job, Session
from lmrc.data.video import FolderSource
from lmrc.inference.propagate import propagate_frames
from lmrc.inference.segmenter import Segmenter
from lmrc.model.network import crop_padding


class Engine:
    """model: an LMRC from `load_model`; size: shorter side while segmenting (smaller is faster, coarser)."""

    def __init__(self, model: torch.nn.Module, size: int = 480, mem_every: int = 5) -> None:
        self.model = model
        self.size = size
        self.mem_every = mem_every

    def propagate(self, session: Session, job: Job) -> None:
        """Propagate the session's prompts forward and backward over its cached frames (`lmrc.inference.propagate`
        states the rule); writes each frame's ids and the comparator's maps of the pass that finished it."""
        frames = CachedFrames(session)
        segmenter = _MapKeeper(self.model, frames, session, size=self.size, mem_every=self.mem_every)

        def on_step(done: int, total: int | None) -> None:
            job.done, job.total = done, total or job.total
            if job.cancel.is_set():
                raise _Cancelled

        try:
            for result in propagate_frames(lambda: segmenter, frames, session.prompts(), on_step=on_step):
                session.write_ids(result.index, result.ids)
        except _Cancelled:
            pass


class _Cancelled(Exception):
    pass


class CachedFrames(FolderSource):
    """The session's cached JPEG frames as a frame source (decoded lazily; `propagate_frames` buffers what its
    backward pass needs). The arrays it hands out are remembered by identity while they live, so the segmenter can
    tell which frame it steps (a frame the buffer spilled to disk and read back is not recognised: no map then)."""

    def __init__(self, session: Session) -> None:
        folder = session.frame_path(0).parent
        super().__init__(folder, [session.frame_path(i) for i in range(session.video.frames)])
        self.live: dict[int, tuple[int, weakref.ref]] = {}

    def _frames(self):
        for frame in super()._frames():
            key = id(frame.rgb)
            # the entry leaves with its array, so a reused id never names a dead frame
            self.live[key] = (frame.index, weakref.ref(frame.rgb, lambda _, key=key: self.live.pop(key, None)))
            yield frame

    def index_of(self, rgb: np.ndarray) -> int | None:
        entry = self.live.get(id(rgb))
        return entry[0] if entry is not None and entry[1]() is rgb else None


class _MapKeeper(Segmenter):
    """A Segmenter that saves the comparator's maps of every frame it predicts to the session's cache (a later
    pass over the same frame overwrites an earlier one's)."""

    def __init__(self, model: torch.nn.Module, frames: CachedFrames, session: Session, **options) -> None:
        super().__init__(model, **options)
        self.frames, self.session = frames, session

    def step(self, frame, mask=None, objects=None):
        self.last_reliability = {}
        probs = super().step(frame, mask, objects)
        index = self.frames.index_of(frame) if isinstance(frame, np.ndarray) else None
        maps = reliability_maps(self) if index is not None else {}
        if maps:
            np.savez_compressed(self.session.reliability_path(index), **maps)
        return probs


def reliability_maps(segmenter: Segmenter) -> dict[str, np.ndarray]:
    """The comparator's H maps (eq. 10) of the segmenter's last frame as uint8 (H * 255) at the processing size,
    padding removed: {readout name: h x w}. Empty when the frame was not predicted (e.g. the first prompt)."""
    maps = {}
    h, w = segmenter.process_size
    left, right, top, bottom = segmenter.last_pads
    for name, weight in segmenter.last_reliability.items():
        full = F.interpolate(weight.float(), size=(h + top + bottom, w + left + right), mode="bilinear",
                             align_corners=False)
        maps[name] = (crop_padding(full, segmenter.last_pads)[0, 0].clamp(0, 1) * 255).round().byte().cpu().numpy()
    return maps
