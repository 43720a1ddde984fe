"""`lmrc eval`: score a results folder with the official DAVIS protocol, or segment a split first (`--run`).

    lmrc eval --results DIR --gt DAVIS_ROOT [--split val] [--year 2016|2017] [--sequences a,b]
    lmrc eval --run --model lmrc-lite [--weights FILE] --results DIR --gt DAVIS_ROOT ...
    lmrc eval --youtube-vos --results PRED_DIR --gt YTVOS_VALID_ROOT --out DIR [--all]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from lmrc.inference.config import add_inference_arguments, inference_config_from_args
from lmrc.utils.errors import LmrcError

MODELS = ("lmrc-lite", "lmrc-r50")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", required=True, help="results folder: <seq>/<frame>.png (written first with --run)")
    parser.add_argument("--gt", required=True, help="DAVIS root (Annotations/, ImageSets/), or YouTube-VOS valid root")
    parser.add_argument("--split", default="val", help="split file name in ImageSets (default: val)")
    parser.add_argument("--year", type=int, choices=(2016, 2017), help="DAVIS year (default: from the split files)")
    parser.add_argument("--sequences", help="comma-separated subset of the split, e.g. a held-out validation set")
    parser.add_argument("--workers", type=int, help="parallel processes for scoring (default: available cores)")
    run = parser.add_argument_group("segment the split first")
    run.add_argument("--run", action="store_true", help="segment every sequence with --model, then score")
    run.add_argument("--model", choices=MODELS, help="model preset for --run")
    run.add_argument("--weights", help="weights file for --run (default: the preset's)")
    add_inference_arguments(run)  # --mem-every, --size, --precision, --top-k, --flip, ... (used with --run)
    ytvos = parser.add_argument_group("YouTube-VOS submission")
    ytvos.add_argument("--youtube-vos", action="store_true",
                       help="pack --results into a submission zip instead (with --run: segment every video first)")
    ytvos.add_argument("--out", help="with --youtube-vos: folder for Annotations/ and submission.zip")
    ytvos.add_argument("--all", action="store_true", help="with --youtube-vos: keep every predicted frame")


def main(args: argparse.Namespace) -> int:
    if args.youtube_vos:
        return _youtube_vos(args)
    from lmrc.eval.davis import detect_year, evaluate, split_sequences, write_csvs

    year = args.year or detect_year(args.gt, args.split)
    subset = [s for s in (args.sequences or "").split(",") if s]
    run_report = None
    if args.run:
        if not args.model:
            raise LmrcError("--run needs --model (lmrc-lite or lmrc-r50)")
        names = split_sequences(args.gt, args.split, year)
        unknown = [s for s in subset if s not in names]
        if unknown:
            raise LmrcError(f"sequence(s) {', '.join(unknown)} not in the '{args.split}' split of {args.gt}")
        start = time.perf_counter()
        frames = _segment_split(args, subset or names, Path(args.results))
        seconds = time.perf_counter() - start
        run_report = (frames, seconds, _peak_memory_mib())
    elif args.model or args.weights or args.top_k is not None:
        raise LmrcError("--model, --weights and --top-k only apply with --run")

    interactive = sys.stderr.isatty()  # a progress line only where someone watches it, not in logs
    evaluation = evaluate(
        args.results, args.gt, split=args.split, year=year, sequences=subset or None, workers=args.workers,
        progress=_progress if interactive else None,
    )
    if interactive:
        print(file=sys.stderr)
    global_path, per_sequence_path = write_csvs(evaluation, args.results)
    print(format_table(evaluation))
    if run_report:
        frames, seconds, peak = run_report
        print(f"\nsegmentation: {frames} frames in {seconds:.1f} s = {frames / max(seconds, 1e-9):.2f} frames/s; "
              f"peak memory {peak}")
    print(f"\nwrote {global_path} and {per_sequence_path}")
    return 0


def _progress(sequence: str, done: int, total: int) -> None:
    print(f"\rscored {done}/{total}: {sequence:<30}", end="", file=sys.stderr, flush=True)


def format_table(evaluation) -> str:
    """Per-object J, F, J&F means and the global row, as aligned text."""
    rows = [(name, j, f, (j + f) / 2) for name, j, f in evaluation.per_object()]
    width = max([len("Sequence")] + [len(r[0]) for r in rows])
    lines = [f"{'Sequence':<{width}}  {'J-Mean':>7}  {'F-Mean':>7}  {'J&F':>7}"]
    lines += [f"{name:<{width}}  {j:7.3f}  {f:7.3f}  {jf:7.3f}" for name, j, f, jf in rows]
    g = evaluation.global_scores()
    lines.append("")
    lines.append(f"DAVIS {evaluation.year} {evaluation.split}: {len(rows)} objects, {evaluation.frames} scored frames")
    lines.append("  ".join(f"{k:>8}" for k in g))
    lines.append("  ".join(f"{v:8.3f}" for v in g.values()))
    return "\n".join(lines)


def _peak_memory_mib() -> str:
    # ru_maxrss is KiB on Linux: the peak resident size of this process, which holds the model and the memory bank.
    text = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        text += f", {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB CUDA"
    return text


def _segment_split(args: argparse.Namespace, sequences: list[str], out_dir: Path) -> int:
    """Segment every sequence from its first annotated frame into `out_dir/<seq>/<frame>.png`; returns frames done."""
    from lmrc.eval.davis import RESOLUTION, gt_frames
    from lmrc.inference.run import segment_sequence

    root = Path(args.gt)
    segmenter = _segmenter(args)
    frames = 0
    for i, seq in enumerate(sequences, 1):
        print(f"segmenting {i}/{len(sequences)}: {seq}", file=sys.stderr, flush=True)
        # --run writes --results afresh (overwrite): results of an older run must not mix with this one.
        frames += segment_sequence(segmenter, root / "JPEGImages" / RESOLUTION / seq, gt_frames(root, seq)[0],
                                   out_dir / seq, overwrite=True).frames
    return frames


def _segmenter(args: argparse.Namespace):
    """One Segmenter (one inference copy of the model) for every sequence of --run; says its precision."""
    from lmrc.inference.segmenter import Segmenter
    from lmrc.model.weights import load_model

    config = inference_config_from_args(args)
    segmenter = Segmenter(load_model(args.model, args.weights), config)
    print(f"precision: {segmenter.precision} ({segmenter.precision_reason}) on {segmenter.device}", file=sys.stderr)
    return segmenter


def _youtube_vos(args: argparse.Namespace) -> int:
    from lmrc.eval.youtube_vos import prepare_submission, segment_videos

    if not args.out:
        raise LmrcError("--youtube-vos needs --out DIR (where Annotations/ and submission.zip are written)")
    if args.sequences:
        raise LmrcError("--youtube-vos works on every video of meta.json; drop --sequences")
    if args.run:
        if not args.model:
            raise LmrcError("--run needs --model (lmrc-lite or lmrc-r50)")
        start = time.perf_counter()
        segmenter = _segmenter(args)
        frames = segment_videos(segmenter, args.gt, args.results)
        seconds = time.perf_counter() - start
        print(f"segmentation: {frames} frames in {seconds:.1f} s = {frames / max(seconds, 1e-9):.2f} frames/s; "
              f"peak memory {_peak_memory_mib()}")
    zip_path = prepare_submission(args.results, args.gt, args.out, all_frames=args.all)
    print(f"wrote {Path(args.out) / 'Annotations'} and {zip_path}")
    return 0
