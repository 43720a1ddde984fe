"""The training forward pass over a clip of T >= 3 frames, run as inference runs over a video.

Frame 0's ground-truth mask makes the first memory (global and local, as the first frame at inference). Then
for each next frame t: the global memory is frame 0 plus, every `mem_every` frames, earlier frames of the clip
with values encoded from their predictions; the local memory is frame t-1 with its value encoded from the
model's OWN soft prediction (gradients flow through it, as STCN's training does for its second frame). With
T = 3 and no extra global frames this is the paper's sample, exactly `LMRC.forward` (a test checks equality).

It drives the network's three shared methods (`encode_key`, `encode_value`, `read_and_decode`), so training and
inference keep one implementation of every read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmrc.model.encoders import STAGES
from lmrc.model.network import FrameEncoding, MemoryInput, SegmentOutput


@dataclass
class ClipOutput:
    """outputs: the predictions of frames 1..T-1 in order; query_keys: the last frame's keys (scale loss, eq. 12)."""

    outputs: list[SegmentOutput]
    query_keys: dict[int, Tensor]


def clip_forward(model: nn.Module, images: Tensor, first_masks: Tensor, valid_objects: Tensor | None = None, *,
                 mem_every: int | None = None) -> ClipOutput:
    """images B x T x 3 x H x W (T >= 2), first_masks B x N x H x W (frame 0's ground truth), valid_objects B x N.

    mem_every: frame t (1 <= t < T-1) joins the global memory when t % mem_every == 0 (inference's schedule,
    counted from the annotated frame); None keeps frame 0 alone, the paper's training sample.
    """
    b, t = images.shape[:2]
    # One batched pass of the key encoder over every frame (as LMRC.forward: same numbers, fewer calls).
    keys = model.encode_key(images.flatten(0, 1))
    enc = [FrameEncoding({r: x.view(b, t, *x.shape[1:])[:, i] for r, x in keys.keys.items()},
                         {r: x.view(b, t, *x.shape[1:])[:, i] for r, x in keys.features.items()}) for i in range(t)]
    # Without local reads (setting A) only stage 4 of a value is ever read: skip encoding the others.
    stages = STAGES if model.config.local_read_stages else (4,)
    values = model.encode_value(images[:, 0], enc[0], first_masks, stages)
    global_keys, global_values = [enc[0].keys[4].flatten(2)], [values[4].flatten(3)]
    local_keys, local_values = enc[0].keys, values
    outputs = []
    for i in range(1, t):
        memory = MemoryInput(_cat(global_keys), _cat(global_values), local_keys, local_values, valid_objects)
        out = model.read_and_decode(enc[i], memory)
        outputs.append(out)
        if i == t - 1:
            break
        values = model.encode_value(images[:, i], enc[i], out.probs[:, 1:].to(images.dtype), stages)
        local_keys, local_values = enc[i].keys, values
        if mem_every is not None and i % mem_every == 0:
            global_keys.append(enc[i].keys[4].flatten(2))
            global_values.append(values[4].flatten(3))
    return ClipOutput(outputs, enc[-1].keys)


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)  # memory positions are the last dim


class ClipRunner(nn.Module):
    """`clip_forward` as a module's forward, so DistributedDataParallel can wrap it (its hooks need a forward)."""

    def __init__(self, model: nn.Module, mem_every: int | None = None) -> None:
        super().__init__()
        self.model, self.mem_every = model, mem_every

    def forward(self, images: Tensor, first_masks: Tensor, valid_objects: Tensor | None = None) -> ClipOutput:
        return clip_forward(self.model, images, first_masks, valid_objects, mem_every=self.mem_every)
