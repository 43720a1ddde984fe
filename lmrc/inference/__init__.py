"""Segment any video: `Segmenter` (streaming, one frame at a time), `segment_sequence` (a whole sequence to a
results folder), `lmrc segment` (`command.py`),
`mask_from_prompts` (a mask from a box, clicks, strokes; `prompts.py`); forward and backward propagation from masks on
any frames: `lmrc.inference.propagate.propagate`. Imported lazily so that `import lmrc.inference.io` stays light."""
from __future__ import annotations

__all__ = ["Segmenter", "output_prob_to_mask", "segment_sequence", "SegmentStats", "MemoryBank", "mask_from_prompts"]


def __getattr__(name: str):
    if name in ("Segmenter", "output_prob_to_mask"):
        from lmrc.inference import segmenter

        return getattr(segmenter, name)
    if name in ("segment_sequence", "SegmentStats"):
        from lmrc.inference import run

        return getattr(run, name)
    if name == "mask_from_prompts":
        from lmrc.inference.prompts import mask_from_prompts

        return mask_from_prompts
    if name == "MemoryBank":
        from lmrc.inference.memory_bank import MemoryBank

        return MemoryBank
    raise AttributeError(f"module 'lmrc.inference' has no attribute {name!r}")
