"""Segment any video: `Segmenter` (streaming, one frame at a time), `segment_sequence` (a whole sequence to a
results folder), `lmrc segment` (`command.py`). Imported lazily so that `import lmrc.inference.io` stays light."""
from __future__ import annotations

__all__ = ["Segmenter", "output_prob_to_mask", "segment_sequence", "SegmentStats", "MemoryBank"]


def __getattr__(name: str):
    if name in ("Segmenter", "output_prob_to_mask"):
        from lmrc.inference import segmenter

        return getattr(segmenter, name)
    if name in ("segment_sequence", "SegmentStats"):
        from lmrc.inference import run

        return getattr(run, name)
    if name == "MemoryBank":
        from lmrc.inference.memory_bank import MemoryBank

        return MemoryBank
    raise AttributeError(f"module 'lmrc.inference' has no attribute {name!r}")
