"""`lmrc segment INPUT --mask MASK | --box X0,Y0,X1,Y1`: segment a video (file, frame folder or DAVIS/YouTube-VOS
sequence), forward and, when an object's first mask is after frame 0, backward.

Every check that can fail (input, masks, options, device, weights, output folder, overlay name) runs before the
first output file is written; problems are reported as one `lmrc segment: error: ...` line naming the fix.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

from lmrc.errors import LmrcError

MODELS = ("lmrc-lite", "lmrc-r50")
PRECISIONS = ("fp32", "bf16", "fp16")
OUT_SUFFIX = "_lmrc"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  lmrc segment clip.mp4 --mask first.png --overlay clip_overlay.mp4\n"
        "  lmrc segment frames/ --mask masks/ --out results/ --precision bf16   (sparse masks: objects may start late)\n"
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
    parser.add_argument("--mem-every", type=int, default=5, metavar="N",
                        help="add every N-th frame to the global memory (default: 5, as the paper)")
    parser.add_argument("--max-memory-frames", type=int, metavar="N",
                        help="keep at most N global-memory frames: the frames with masks plus the most recent "
                             "ones, so memory stays flat on long videos (default: keep all)")
    parser.add_argument("--top-k", type=int, metavar="K",
                        help="global read: keep only the K best memory matches per pixel (default: 20, as STCN; "
                             "0 keeps all, eq. (2) of the paper exactly)")
    parser.add_argument("--size", type=int, default=480, metavar="PIXELS",
                        help="process frames with their shorter side resized to this (default: 480; 0 = the "
                             "input's own size); results are always at the input's size")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32, or bf16/fp16 autocast: faster on GPUs (and bf16 on recent CPUs)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (default: auto = cuda when available, else cpu)")
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
    device = resolve_device(args.device, args.precision)

    from lmrc.data.video import open_frames
    from lmrc.inference.io import load_prompts
    from lmrc.inference.run import check_overlay_path, segment_sequence
    from lmrc.model.weights import load_model

    source = open_frames(args.input, skip_bad_frames=args.skip_bad_frames)
    if args.box:
        from lmrc.inference.prompts import prompts_from_boxes

        prompts = prompts_from_boxes(source, [parse_box(b) for b in args.box], args.prompt_frame)
    else:
        prompts = load_prompts(args.mask, source)
    out_dir = Path(args.out) if args.out else default_out_dir(source)
    if args.overlay:
        check_overlay_path(args.overlay, args.overwrite or args.resume)
    model = load_model(args.model, args.weights, device, global_read_top_k=args.top_k)  # no weights -> LmrcError, before any output exists

    stats = segment_sequence(
        model, source, prompts, out_dir,
        overwrite=args.overwrite, resume=args.resume, save_probs=args.save_probs, overlay=args.overlay,
        progress=True, backward=not args.forward_only,
        mem_every=args.mem_every, max_memory_frames=args.max_memory_frames,
        size=args.size or None, precision=args.precision, device=device,
    )
    kept = f", {stats.frames - stats.written} kept from the previous run" if args.resume else ""
    skipped = f", skipped unreadable frames {stats.skipped}" if stats.skipped else ""
    print(f"segmented {stats.frames} frames ({len(prompts.object_ids)} objects) in {stats.seconds:.1f} s = "
          f"{stats.fps:.2f} frames/s on {device}, peak memory {stats.peak_memory_mb:.0f} MB{kept}{skipped}")
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
    if args.mem_every < 1:
        raise LmrcError(f"--mem-every must be >= 1, got {args.mem_every}")
    if args.max_memory_frames is not None and args.max_memory_frames < 2:
        raise LmrcError(f"--max-memory-frames must be >= 2 (the first frame and one recent frame), "
                        f"got {args.max_memory_frames}")
    if args.size and args.size < 16:
        raise LmrcError(f"--size must be 0 (the input's own size) or >= 16 pixels, got {args.size}")


def resolve_device(name: str, precision: str = "fp32") -> str:
    """'auto' | 'cpu' | 'cuda' -> a usable device name, or LmrcError saying why not."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            raise LmrcError(f"--device cuda: PyTorch ({build}) sees no CUDA GPU on this machine; "
                            "use --device cpu (or auto)")
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise LmrcError("--precision bf16: this GPU has no bfloat16 support; use --precision fp16 or fp32")
    else:
        message = half_precision_warning(precision)
        if message:
            from lmrc.data.video import LmrcWarning

            warnings.warn(message, LmrcWarning, stacklevel=2)
    return name


def half_precision_warning(precision: str) -> str | None:
    """Why `precision` will be slow on this CPU, or None. Without native 16-bit float units the CPU converts every
    operand: bf16 measured 20-70x slower than fp32 on an AVX2 CPU (docs/PERFORMANCE.md)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if precision == "fp32" or "AVX512" in capability.upper():
        return None
    return f"--precision {precision} on this CPU ({capability}, no native 16-bit float math) is slower than fp32; use fp32 here"


def default_out_dir(source) -> Path:
    """./<video stem or frame folder name>_lmrc"""
    name = getattr(source, "sequence", None) or Path(source.path).stem
    return Path.cwd() / f"{name}{OUT_SUFFIX}"


@contextlib.contextmanager
def _short_warnings():
    """Show repairs (LmrcWarning) as one line each, as errors are, instead of Python's file:line form."""
    from lmrc.data.video import LmrcWarning

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
