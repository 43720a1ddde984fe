"""The network side of `lmrc app`: propagate a session's prompts over its cached frames, frame by frame.

One model is loaded per server and shared by every session (inference only, read-only weights). A propagation
takes a `Segmenter` of its own from a pool (reset for it, returned when it ends): sessions never share memory
banks or an inference copy's buffers, and an idle inference copy is reused instead of being built again.
"""
from __future__ import annotations

import dataclasses
import threading
import weakref

import numpy as np
import torch

from lmrc.app.session import Job, Session
from lmrc.data.video import FolderSource
from lmrc.inference.config import InferenceConfig
from lmrc.inference.propagate import propagate_frames
from lmrc.inference.segmenter import Segmenter


class Engine:
    """model: an LMRC from `load_model` (left as it is: each segmenter builds its inference copy on
    `config.device`); config: how frames are segmented (`InferenceConfig`: size, precision, mem_every, ...);
    keyword `settings` replace its fields (`Engine(model, size=240)`)."""

    def __init__(self, model: torch.nn.Module, config: InferenceConfig | None = None, **settings) -> None:
        self.model = model
        self.config = dataclasses.replace(config or InferenceConfig(), **settings)
        self._idle: list[_MapKeeper] = []
        self._lock = threading.Lock()

    def propagate(self, session: Session, job: Job) -> None:
        """Propagate the session's prompts forward and backward over its cached frames (`lmrc.inference.propagate`
        states the rule); writes each frame's ids and the comparator's maps of the pass that finished it."""
        frames = CachedFrames(session)
        with self._lock:
            segmenter = self._idle.pop() if self._idle else None
        if segmenter is None:
            segmenter = _MapKeeper(self.model, self.config)
        segmenter.attach(frames, session)

        def on_step(done: int, total: int | None) -> None:
            job.done, job.total = done, total or job.total
            if job.cancel.is_set():
                raise _Cancelled

        try:
            for result in propagate_frames(lambda: segmenter, frames, session.prompts(), on_step=on_step):
                session.write_ids(result.index, result.ids)
        except _Cancelled:
            pass
        finally:
            segmenter.attach(None, None)
            segmenter.reset()  # an idle segmenter keeps no video's memory
            with self._lock:
                self._idle.append(segmenter)


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

    frames: CachedFrames | None = None  # the propagation it serves (`attach`)
    session: Session | None = None

    def attach(self, frames: CachedFrames | None, session: Session | None) -> None:
        self.frames, self.session = frames, session

    def step(self, frame, mask=None, objects=None):
        predicted = bool(self.object_ids)  # before the first mask nothing is predicted (no maps)
        probs = super().step(frame, mask, objects)
        known = predicted and self.frames is not None and isinstance(frame, np.ndarray)
        index = self.frames.index_of(frame) if known else None
        maps = reliability_maps(self) if index is not None else {}
        if maps:
            np.savez_compressed(self.session.reliability_path(index), **maps)
        return probs


def reliability_maps(segmenter: Segmenter) -> dict[str, np.ndarray]:
    """The comparator's H maps (eq. 10) of the segmenter's last frame as uint8 (H * 255) at the processing size,
    where they carry all their detail (smaller on disk than at the frame's size): {readout name: h x w}. Empty when
    the model has no comparator or no frame was predicted yet."""
    return {name: (weight.clamp(0, 1) * 255).round().byte().cpu().numpy()
            for name, weight in segmenter.reliability_at(segmenter.process_size).items()}
