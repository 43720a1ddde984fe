"""`lmrc segment INPUT --mask MASK | --box X0,Y0,X1,Y1`: segment a video (file, frame folder or DAVIS/YouTube-VOS
sequence), forward and, when an object's first mask is after frame 0, backward.

Every check that can fail (input, masks, options, device, weights, output folder, overlay name) runs before the
first output file is written; problems are reported as one `lmrc segment: error: ...` line naming the fix.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import warnings
from pathlib import Path

from lmrc.inference.config import (
    add_inference_arguments,
    check_runtime_options,
    inference_config_from_args,
    onnx_runtime_overrides,
)
from lmrc.utils.errors import LmrcError, LmrcWarning

MODELS = ("lmrc-lite", "lmrc-r50")
OUT_SUFFIX = "_lmrc"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  lmrc segment clip.mp4 --mask first.png --overlay clip_overlay.mp4\n"
        "  lmrc segment frames/ --mask masks/ --out results/ --precision fp32   (sparse masks: objects may start late)\n"
        "  lmrc segment clip.mp4 --box 120,40,380,300 --box 400,60,520,290 --prompt-frame 30\n"
        "  lmrc segment DAVIS/JPEGImages/480p/bike --mask DAVIS/Annotations/480p/bike/00000.png --save-probs\n"
        "\n"
        "Writes <out>/<frame name>.png for every frame (DAVIS palette, one id per object; frames of a video are\n"
        "named 00000, 00001, ...), and with --save-probs <out>/probs/<frame name>.npz."
    )
    parser.add_argument("input", help="video file (mp4, mov, avi, webm, mkv), folder of jpg/png frames, or a "
                                      "DAVIS/YouTube-VOS sequence folder")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--mask",
                       help="the first frame's mask (palette PNG of object ids, or binary 0/255), or a folder of "
                            "masks named like their frames (objects appearing later get their own mask); masks "
                            "after frame 0 are also propagated backward")
    given.add_argument("--box", action="append", metavar="X0,Y0,X1,Y1",
                       help="instead of --mask: a box around an object (pixels, on --prompt-frame), made a mask with "
                            "GrabCut; repeat for more objects (ids 1, 2, ... in order)")
    parser.add_argument("--prompt-frame", type=int, default=0, metavar="N",
                        help="with --box: the frame the boxes are drawn on (default: 0); frames before it are "
                             "segmented backward from it")
    parser.add_argument("--forward-only", action="store_true",
                        help="do not propagate backward: an object is left out of the frames before its first mask "
                             "(for objects that enter the scene later)")
    parser.add_argument("--out", help=f"results folder (default: <input name>{OUT_SUFFIX} in the current folder, "
                                      "e.g. ./clip_lmrc for clip.mp4)")
    parser.add_argument("--model", choices=MODELS, default="lmrc-lite", help="model size (default: lmrc-lite)")
    parser.add_argument("--weights", help="weights file (.safetensors) for --model (default: its shipped weights)")
    add_inference_arguments(parser)
    parser.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                        help="torch (default), or onnxruntime: the ONNX graphs of `lmrc export` (CPU, fp32), the "
                             "memory bank in Python")
    parser.add_argument("--onnx", metavar="DIR",
                        help="with --runtime onnxruntime: the folder `lmrc export` wrote (default: export --model / "
                             "--weights to a temporary folder first, about a minute)")
    parser.add_argument("--overlay", metavar="VIDEO.mp4", help="also write the masks drawn over the frames as a video")
    parser.add_argument("--save-probs", action="store_true",
                        help="also write soft maps, <out>/probs/<frame>.npz (probs K x H x W uint8, object_ids K)")
    parser.add_argument("--skip-bad-frames", action="store_true",
                        help="skip frames that cannot be decoded (with a warning) instead of stopping")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace results already in --out (and --overlay)")
    existing.add_argument("--resume", action="store_true",
                          help="continue an interrupted run in --out: finished frames are kept, not rewritten")


def main(args: argparse.Namespace) -> int:
    with _short_warnings():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    _check_options(args)
    config = inference_config_from_args(args, **onnx_runtime_overrides(args))
    from lmrc.data.video import open_frames
    from lmrc.inference.io import load_prompts
    from lmrc.inference.run import check_overlay_path, segment_sequence
    from lmrc.inference.segmenter import Segmenter
    from lmrc.model.weights import load_model
    from lmrc.utils.device import choose_device, half_precision_warning

    device = choose_device(config.device)
    warning = half_precision_warning(config.precision) if device.type == "cpu" else None
    if warning:
        warnings.warn(warning, LmrcWarning, stacklevel=2)
    source = open_frames(args.input, skip_bad_frames=args.skip_bad_frames)
    if args.box:
        from lmrc.inference.prompts import prompts_from_boxes

        prompts = prompts_from_boxes(source, [parse_box(b) for b in args.box], args.prompt_frame)
    else:
        prompts = load_prompts(args.mask, source)
    out_dir = Path(args.out) if args.out else default_out_dir(source)
    if args.overlay:
        check_overlay_path(args.overlay, args.overwrite or args.resume)
    if args.runtime == "onnxruntime":
        from lmrc.inference.onnx_runtime import open_onnx_model

        # no weights or graphs -> LmrcError, before any output exists
        model = open_onnx_model(args.onnx, None if args.onnx else load_model(args.model, args.weights),
                                read_top_k=config.top_k)
        if args.top_k is None:  # not asked for: the graphs' own
            config = dataclasses.replace(config, top_k=model.read_top_k)
    else:
        model = load_model(args.model, args.weights)  # no weights -> LmrcError, before any output exists
    segmenter = Segmenter(model, config)

    stats = segment_sequence(segmenter, source, prompts, out_dir, overwrite=args.overwrite, resume=args.resume,
                             save_probs=args.save_probs, overlay=args.overlay, progress=True,
                             backward=not args.forward_only)
    kept = f", {stats.frames - stats.written} kept from the previous run" if args.resume else ""
    skipped = f", skipped unreadable frames {stats.skipped}" if stats.skipped else ""
    print(f"segmented {stats.frames} frames ({len(prompts.object_ids)} objects) in {stats.seconds:.1f} s = "
          f"{stats.fps:.2f} frames/s on {segmenter.device}, peak memory {stats.peak_memory_mb:.0f} MB{kept}{skipped}")
    print(f"precision: {segmenter.precision} ({segmenter.precision_reason})")
    print(f"masks: {out_dir}" + (f"\noverlay: {args.overlay}" if args.overlay else ""))
    return 0


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'X0,Y0,X1,Y1' -> four numbers, or LmrcError."""
    parts = text.replace(" ", "").split(",")
    try:
        if len(parts) != 4:
            raise ValueError
        x0, y0, x1, y1 = (float(p) for p in parts)
    except ValueError:
        raise LmrcError(f"--box {text!r}: give four numbers X0,Y0,X1,Y1 (pixels: left, top, right, bottom), "
                        "e.g. --box 120,40,380,300") from None
    return x0, y0, x1, y1


def _check_options(args: argparse.Namespace) -> None:
    if args.prompt_frame != 0 and not args.box:
        raise LmrcError("--prompt-frame goes with --box; with --mask, name the mask file like its frame instead")
    check_runtime_options(args)
    if args.onnx and args.weights:
        raise LmrcError("--onnx graphs carry their own weights: drop --weights (or export them with "
                        "`lmrc export --weights FILE`)")


def default_out_dir(source) -> Path:
    """./<video stem or frame folder name>_lmrc"""
    name = getattr(source, "sequence", None) or Path(source.path).stem
    return Path.cwd() / f"{name}{OUT_SUFFIX}"


@contextlib.contextmanager
def _short_warnings():
    """Show repairs (LmrcWarning) as one line each, as errors are, instead of Python's file:line form."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, LmrcWarning):
            print(f"lmrc segment: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", LmrcWarning)
        warnings.showwarning = show
        try:
            yield
        finally:
            warnings.showwarning = original
