"""The network side of `lmrc app`: propagate a session's prompts over its cached frames, frame by frame.

One model is loaded per server and shared by every session (inference only, read-only weights); each propagation
makes its own `Segmenter`, so sessions never share memory banks.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lmrc.app.session import Job, Session
from lmrc.inference.segmenter import Segmenter, output_prob_to_mask
from lmrc.model.network import crop_padding


class Engine:
    """model: an LMRC from `load_model`; size: shorter side while segmenting (smaller is faster, coarser)."""

    def __init__(self, model: torch.nn.Module, size: int = 480, mem_every: int = 5) -> None:
        self.model = model
        self.size = size
        self.mem_every = mem_every

    def segmenter(self) -> Segmenter:
        return Segmenter(self.model, size=self.size, mem_every=self.mem_every)

    def propagate(self, session: Session, job: Job) -> None:
        """Forward from the first prompt frame to the end and backward from the last one to frame 0, every prompt
        frame's mask given on the way; writes each frame's ids and reliability maps to the session's cache."""
        video = session.video
        prompts = session.prompts()
        first, last = min(prompts), max(prompts)
        job.total = (video.frames - first) + first  # every frame once
        # TEMP until lmrc.inference.propagate merges: frames before the first prompt come from the backward pass.
        passes = [(range(first, video.frames), lambda i: True),
                  (range(last, -1, -1), lambda i: i < first)]
        for order, keep in passes:
            segmenter = self.segmenter()
            for index in order:
                if job.cancel.is_set():
                    return
                segmenter.last_reliability = {}
                probs = segmenter.step(session.frame_rgb(index), prompts.get(index))
                if not keep(index):
                    continue
                session.write_ids(index, output_prob_to_mask(probs, segmenter.object_ids))
                maps = reliability_maps(segmenter)
                if maps:
                    np.savez_compressed(session.reliability_path(index), **maps)
                job.done += 1


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
