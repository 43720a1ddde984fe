"""lmrc: semi-supervised video object segmentation with the Local Memory Read-and-Comparator.

The public API:

    import lmrc
    model = lmrc.load_model("lmrc-lite")                       # shipped weights (or a .safetensors file)
    config = lmrc.InferenceConfig(size=480, flip=False)        # every inference setting
    for index, ids, probs in lmrc.segment_video("clip.mp4", "first_mask.png", config, model):
        ...                                                     # whole videos, forward and backward from the masks
    mask = lmrc.mask_from_prompts(frame_rgb, box=(x0, y0, x1, y1), points=[(x, y, True)])  # no mask yet: GrabCut
    seg = lmrc.Segmenter(model, config)                        # frame by frame (a camera, a stream)
    probs = seg.step(frame_rgb, mask=first_mask_ids); ids = seg.probs_to_ids(probs)

The names are resolved on first use, so that `import lmrc.<module>` (the command line's help, the evaluation's
scoring workers) does not import PyTorch and the model for parts that need neither.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module defining it
_PUBLIC = {
    "load_model": "lmrc.model.weights",
    "InferenceConfig": "lmrc.inference.config",
    "Segmenter": "lmrc.inference.segmenter",
    "segment_video": "lmrc.inference.run",
    "mask_from_prompts": "lmrc.inference.prompts",
    "LmrcError": "lmrc.utils.errors",
    "LmrcWarning": "lmrc.utils.errors",
    "reuse_freed_memory": "lmrc.utils.memory",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lmrc' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
