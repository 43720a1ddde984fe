"""`InferenceConfig`: every inference setting in one place, and its command-line arguments, declared once for
`lmrc segment`, `lmrc eval --run`, `lmrc bench`, `lmrc app` (and any other front end).

    parser = argparse.ArgumentParser(); add_inference_arguments(parser)
    config = inference_config_from_args(parser.parse_args())   # LmrcError naming the flag on bad values
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from lmrc.utils.device import PRECISIONS
from lmrc.utils.errors import LmrcError


@dataclass(frozen=True)
class InferenceConfig:
    """How a video is segmented (not part of the weights).

    mem_every: every N-th frame enters the global memory (paper: 5). max_memory_frames: None keeps every memory
    frame, else the prompt frames plus the most recent ones, that many in all (>= 2). size: shorter side during
    processing (None: the input's own). precision: "auto" (bf16 where the hardware computes it natively, else
    fp32; see `lmrc.utils.device`), "fp32", "bf16" or "fp16" (autocast). top_k: the global read keeps each
    pixel's K best memory matches (STCN's inference: 20; None reads every position, eq. (2) exactly). flip: also
    segment every frame mirrored left-right, with its own memory, and average the two predictions. device:
    "auto" (cuda when available), "cpu", "cuda"."""

    mem_every: int = 5
    max_memory_frames: int | None = None
    size: int | None = 480
    precision: str = "auto"
    top_k: int | None = 20
    flip: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.mem_every < 1:
            raise ValueError(f"mem_every (--mem-every) must be >= 1, got {self.mem_every}")
        if self.max_memory_frames is not None and self.max_memory_frames < 2:
            raise ValueError("max_memory_frames (--max-memory-frames) must be >= 2 (the first frame and one recent "
                             f"frame), got {self.max_memory_frames}")
        if self.size is not None and self.size < 16:
            raise ValueError(f"size (--size) must be >= 16 pixels (or None / 0: the input's own size), got {self.size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision (--precision) must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k (--top-k): the global read's top-k must be >= 1, or 0 on the command line (None "
                             f"here) to keep every memory match, got {self.top_k}")


def add_inference_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                            device: bool = True, flip: bool = True) -> None:
    """The InferenceConfig options: --mem-every, --max-memory-frames, --size, --precision, --top-k, --flip, --device."""
    d = InferenceConfig()
    parser.add_argument("--mem-every", type=int, default=d.mem_every, metavar="N",
                        help=f"add every N-th frame to the global memory (default: {d.mem_every}, as the paper)")
    parser.add_argument("--max-memory-frames", type=int, metavar="N",
                        help="keep at most N global-memory frames: the frames with masks plus the most recent "
                             "ones, so memory stays flat on long videos (default: keep all)")
    parser.add_argument("--size", type=int, default=d.size, metavar="PIXELS",
                        help=f"process frames with their shorter side resized to this (default: {d.size}; 0 = the "
                             "input's own size); results are always at the input's size")
    parser.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                        help="auto (default): bf16 where the CPU (AVX512_BF16 or AMX) or GPU computes it natively, "
                             "else fp32; or fp32, or bf16/fp16 autocast")
    parser.add_argument("--top-k", type=int, metavar="K",
                        help=f"global read: keep only the K best memory matches per pixel (default: {d.top_k}, as "
                             "STCN; 0 keeps all, eq. (2) of the paper exactly)")
    if flip:
        parser.add_argument("--flip", action="store_true",
                            help="test-time flip: also segment each frame mirrored left-right (its own memory) and "
                                 "average the two predictions (about 2x the time)")
    if device:
        parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device,
                            help="where to run (default: auto = cuda when available, else cpu)")


def inference_config_from_args(args: argparse.Namespace, **overrides) -> InferenceConfig:
    """The InferenceConfig of parsed arguments (options a command does not declare keep their defaults)."""
    d = InferenceConfig()
    top_k = getattr(args, "top_k", None)
    values = dict(
        mem_every=getattr(args, "mem_every", d.mem_every),
        max_memory_frames=getattr(args, "max_memory_frames", d.max_memory_frames),
        size=getattr(args, "size", d.size) or None,
        precision=getattr(args, "precision", d.precision),
        top_k=d.top_k if top_k is None else (top_k or None),
        flip=bool(getattr(args, "flip", d.flip)),
        device=getattr(args, "device", d.device),
    )
    values.update(overrides)
    try:
        return InferenceConfig(**values)
    except ValueError as exc:
        raise LmrcError(str(exc)) from None


def check_runtime_options(args: argparse.Namespace) -> None:
    """--runtime / --onnx against the inference options (`lmrc segment` and `lmrc bench`): one LmrcError."""
    if args.onnx and args.runtime != "onnxruntime":
        raise LmrcError("--onnx names exported graphs: add --runtime onnxruntime")
    if args.runtime == "onnxruntime":
        wrong = ([f"--precision {args.precision}"] if args.precision not in ("auto", "fp32") else []) + (
            [f"--device {args.device}"] if args.device == "cuda" else [])
        if wrong:
            raise LmrcError(f"--runtime onnxruntime runs the fp32 graphs on the CPU: drop {' and '.join(wrong)} "
                            "(or use the torch runtime)")


def onnx_runtime_overrides(args: argparse.Namespace) -> dict:
    """InferenceConfig fields the onnxruntime runtime fixes: fp32 on the CPU (precision and device "auto" become
    those quietly; anything else was refused by `check_runtime_options`)."""
    return {"precision": "fp32", "device": "cpu"} if args.runtime == "onnxruntime" else {}
