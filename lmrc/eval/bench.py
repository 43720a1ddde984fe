"""`lmrc bench`: time every stage of the streaming `Segmenter` (the real inference path) frame by frame.

    lmrc bench --model lmrc-lite --setting F --size 480 --frames 40
    lmrc bench --model lmrc-r50 --compare A F --json
    lmrc bench --max-memory-frames 10 --frames 2000 --size 240     # time and memory stay flat
    lmrc bench --compare A F --macs                                # + multiply-adds: the ratio's arithmetic floor
    lmrc bench --runtime onnxruntime                               # the same model in torch and in onnxruntime

The video is synthetic (moving textured shapes generated in memory, 854 x 480 like DAVIS) unless `--input` names
one. Without `--weights` the model is randomly initialised: speed does not depend on the weights' values.
Times are wall-clock medians over the frames after `--warmup`; each frame's stages are timed by
the segmenter's `StageTimer` (`lmrc.utils.timing`), `other` is the rest of the frame (resizing, aggregation, glue).
Per-stage figures are medians over frames, so a stage that runs on some frames only (value encoding in setting A,
every `--mem-every`-th frame) can show 0; `ms_per_frame_mean` / `fps` include it.
With `--compare A F` both settings run in one process on the same frames, alternating which goes first, so a
load change on a shared machine hits both alike; `ratio` is the second setting's mean frame time over the first's.
With `--macs` the multiply-adds of each setting are counted too (`multiply_adds_per_frame`): a machine-independent
figure, and with `--compare` the ratio of the two settings' arithmetic, which is the cost ratio an implementation
running both at equal efficiency gets. They are attributed to the timed stages, so each stage gets its rate
(GMAC/s = its multiply-adds per frame / its mean time per frame) and the fraction of the machine's peak
(`lmrc.eval.peak`, whose derivation is printed).
With `--runtime onnxruntime` one setting runs twice side by side in the same way: in PyTorch (the optimized
inference copy) and as the exported ONNX graphs in onnxruntime (`lmrc export`, or `--onnx DIR`), with the same
number of threads; `ratio` is onnxruntime's mean frame time over torch's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from lmrc.config import ABLATION_SETTINGS, MODEL_PRESETS, model_config
from lmrc.inference.config import (
    add_inference_arguments,
    check_runtime_options,
    inference_config_from_args,
    onnx_runtime_overrides,
)
from lmrc.utils import timing
from lmrc.utils.device import cpu_info
from lmrc.utils.errors import LmrcError

CHECKPOINTS = (200, 500, 1000, 2000, 5000, 10000)
DEFAULT_SIZE = (480, 854)  # H x W of the synthetic video (DAVIS 480p)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="lmrc-lite", help="model size (default: lmrc-lite)")
    parser.add_argument("--setting", choices=sorted(ABLATION_SETTINGS), default="F",
                        help="ablation setting of Table 4 (default: F, the full model)")
    parser.add_argument("--frames", type=int, default=40, metavar="N", help="frames to segment (default: 40)")
    parser.add_argument("--warmup", type=int, default=5, metavar="N", help="first frames left out of the medians (default: 5)")
    parser.add_argument("--objects", type=int, default=2, metavar="N", help="objects in the synthetic video (default: 2)")
    parser.add_argument("--weights", metavar="FILE", help="weights file (default: random initialisation)")
    parser.add_argument("--input", metavar="VIDEO_OR_FOLDER", help="segment this video instead of the synthetic one")
    parser.add_argument("--mask", metavar="PNG", help="first-frame mask for --input (default: an ellipse in the middle)")
    add_inference_arguments(parser)  # --mem-every, --max-memory-frames, --size, --precision, --top-k, --flip, --device
    parser.add_argument("--compare", nargs=2, metavar=("A", "F"), choices=sorted(ABLATION_SETTINGS),
                        help="run two settings side by side (alternating per frame) and print the cost ratio")
    parser.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                        help="onnxruntime: run the setting in torch and as ONNX graphs in onnxruntime side by side "
                             "(alternating per frame) and print the cost ratio")
    parser.add_argument("--onnx", metavar="DIR", help="with --runtime onnxruntime: graphs written by `lmrc export` "
                                                       "(default: export the benchmarked model first)")
    parser.add_argument("--checkpoints", metavar="N,N,...",
                        help="frames at which to print time per frame and memory (default: 200,500,1000,2000,... up to --frames)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch threads (default: torch's own choice)")
    parser.add_argument("--no-optimize", action="store_true",
                        help="run the model as trained (no BatchNorm folding / inference preparation), for comparison")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the encoders and decoder (slow first frames; see docs/PERFORMANCE.md)")
    parser.add_argument("--macs", action="store_true",
                        help="also count multiply-adds per frame over one memory cycle (slow: runs a cycle in "
                             "PyTorch's FLOP counter after the timing)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


# --- inputs --------------------------------------------------------------------------------------------------------

def synthetic_video(frames: int, size: tuple[int, int] = DEFAULT_SIZE, objects: int = 2,
                    seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(rgb H x W x 3 uint8, mask H x W uint8 ids or None) per frame: textured ellipses drifting over a textured
    background; the mask is given on the first frame only. Generated lazily (long videos take no memory)."""
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    background = (rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
                  .repeat(8, 0).repeat(8, 1)[:h, :w] // 2 + 64).astype(np.uint8)
    colours = rng.integers(64, 256, (objects, 3))
    radius = np.stack([rng.uniform(0.08, 0.18, objects) * h, rng.uniform(0.08, 0.18, objects) * w], 1)
    centre = np.stack([rng.uniform(0.3, 0.7, objects) * h, rng.uniform(0.3, 0.7, objects) * w], 1)
    phase = rng.uniform(0, 2 * np.pi, objects)
    for t in range(frames):
        rgb = background.copy()
        ids = np.zeros((h, w), np.uint8)
        for k in range(objects):
            cy = centre[k, 0] + 0.2 * h * np.sin(0.05 * t + phase[k])
            cx = centre[k, 1] + 0.25 * w * np.cos(0.03 * t + phase[k])
            inside = ((yy - cy) / radius[k, 0]) ** 2 + ((xx - cx) / radius[k, 1]) ** 2 <= 1
            rgb[inside] = colours[k]
            ids[inside] = k + 1
        yield rgb, (ids if t == 0 else None)


def video_frames(path: str, mask_path: str | None, frames: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Frames of a real video (at most `frames`), the mask on the first frame: `mask_path` or a central ellipse."""
    from lmrc.data.masks import read_mask
    from lmrc.data.video import open_frames

    source = open_frames(path)
    for count, frame in enumerate(source):
        if count >= frames:
            return
        mask = None
        if count == 0:
            h, w = frame.rgb.shape[:2]
            if mask_path is not None:
                mask = read_mask(mask_path)
                if mask.shape != (h, w):
                    raise LmrcError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}, the video is {w}x{h}")
            else:
                yy, xx = np.mgrid[0:h, 0:w]
                mask = ((((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2) <= 1).astype(np.uint8)
        yield frame.rgb, mask


def input_frames(args, count: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """The first `count` frames of the benchmark's input: `--input` (with `--mask`) or the synthetic video."""
    if args.input is not None:
        return video_frames(args.input, args.mask, count)
    return synthetic_video(count, objects=args.objects)


# --- models --------------------------------------------------------------------------------------------------------

def build_model(name: str, setting: str, weights: str | None = None) -> torch.nn.Module:
    """`name` in `setting` with random weights (speed does not depend on them), or loaded from `weights`."""
    from lmrc.model.network import LMRC
    from lmrc.model.weights import load_model

    if weights is not None:
        model = load_model(name, weights)
        if model.config.setting != setting:
            raise LmrcError(f"weights {weights} are setting {model.config.setting}, not {setting}; "
                            f"pass --setting {model.config.setting}")
        return model
    torch.manual_seed(0)
    return LMRC(model_config(name, setting=setting), pretrained_backbone=False).eval()


# --- measurement ---------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Per-frame measurements of one segmenter."""

    label: str
    totals: list[float] = field(default_factory=list)  # seconds per frame
    stages: list[dict[str, float]] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)

    def summary(self, warmup: int, frames: slice | None = None) -> dict:
        totals = self.totals[warmup:] if frames is None else self.totals[frames]
        stages = self.stages[warmup:] if frames is None else self.stages[frames]
        if not totals:
            raise LmrcError(f"no frame measured after {warmup} warm-up frames; pass more --frames or fewer --warmup")
        names = list(timing.STAGES)  # every stage, 0 where a setting does not run it
        per_stage = {s: 1000 * statistics.median(d.get(s, 0.0) for d in stages) for s in names}
        per_stage["other"] = 1000 * statistics.median(t - sum(d.values()) for t, d in zip(totals, stages))
        ms = 1000 * statistics.median(totals)
        mean_stage = {s: 1000 * statistics.fmean(d.get(s, 0.0) for d in stages) for s in names}
        mean_stage["other"] = 1000 * statistics.fmean(t - sum(d.values()) for t, d in zip(totals, stages))
        return {
            "frames_measured": len(totals),
            "ms_per_frame": round(ms, 2),
            "ms_per_frame_mean": round(1000 * statistics.fmean(totals), 2),
            "fps": round(len(totals) / sum(totals), 3),
            "stages_ms": {k: round(v, 2) for k, v in per_stage.items()},
            "stages_ms_mean": {k: round(v, 3) for k, v in mean_stage.items()},
        }


def rss_mb() -> float:
    """Current resident set size of this process in MB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(segmenters: dict[str, "Segmenter"], frames: Iterator[tuple[np.ndarray, np.ndarray | None]],  # noqa: F821
            warmup: int, checkpoints: tuple[int, ...] = (), on_checkpoint=None) -> dict[str, Run]:
    """Step every segmenter through the same frames; with several, the order alternates every frame.
    At each frame number in `checkpoints`: median time per frame since the previous checkpoint and memory in use,
    also handed to `on_checkpoint(label, point)` as they happen (long runs show progress)."""
    runs = {label: Run(label) for label in segmenters}
    order = list(segmenters)
    last = {label: warmup for label in segmenters}
    for index, (rgb, mask) in enumerate(frames):
        for label in order if index % 2 == 0 else order[::-1]:
            with segmenters[label].timer.record() as times:
                start = time.perf_counter()
                segmenters[label].step(rgb, mask)
                total = time.perf_counter() - start
            run = runs[label]
            run.totals.append(total)
            run.stages.append(times)
            if index + 1 in checkpoints:
                window = slice(min(last[label], index), index + 1)
                run.checkpoints.append({
                    "frame": index + 1,
                    "ms_per_frame": round(1000 * statistics.median(run.totals[window]), 2),
                    "rss_mb": round(rss_mb(), 1),
                    "memory_bank_mb": round(segmenters[label].memory.nbytes() / 2**20, 2),
                    "memory_frames": len(segmenters[label].memory_frames),
                })
                last[label] = index + 1
                if on_checkpoint is not None:
                    on_checkpoint(label, run.checkpoints[-1])
    return runs


def _packed_convolution_flops() -> dict:
    """FLOP formulas for oneDNN's fused convolutions (`lmrc.inference.packed_conv`), which PyTorch's counter does not
    know: those of a plain convolution of the same shapes (a kernel enlarged to absorb padding counts its zeros:
    they are computed)."""
    from torch.utils.flop_counter import conv_flop_count

    pointwise = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)
    if pointwise is None:
        return {}

    def flops(*args, out_shape=None, **kwargs) -> int:  # unary (X, W, B, ...: 10 args) or binary (X, other, W, ...)
        x_shape, w_shape = args[0], args[1] if len(args) == 10 else args[2]
        return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)

    def in_place_flops(*args, out_shape=None, **kwargs) -> int:  # binary in place (other, X, W, ...)
        return conv_flop_count(args[1], args[2], out_shape, transposed=False)

    formulas = {pointwise: flops}  # the counter looks formulas up by overload packet
    in_place = getattr(torch.ops.mkldnn, "_convolution_pointwise_", None)
    if in_place is not None:
        formulas[in_place] = in_place_flops
    return formulas


def multiply_adds_per_frame(segmenter: "Segmenter", frames: Iterator[tuple[np.ndarray, np.ndarray | None]]  # noqa: F821
                            ) -> dict | None:
    """Mean multiply-adds per frame, in GMAC, over the frames after the first (which takes the mask). PyTorch's
    FLOP counter counts the convolutions and matrix products; the native kernels run outside PyTorch and count
    their nominal multiply-adds themselves (`lmrc.ops._native.count_multiply_adds`): `local_window` (the local
    reads), the native convolution is added to `convolution`, the global read's product on AMX tiles counts as the
    matrix product it replaces; `total` is all of them. `stages`: the same split
    by the stage of the segmenter's `timer` they ran in, `other` for what ran outside every stage. Pass `mem_every` + 1 frames so each kind of frame counts as often as in a
    long video. Resets the segmenter. None when there is no frame after the first."""
    from torch.utils.flop_counter import FlopCounterMode

    from lmrc.ops._native import count_multiply_adds

    segmenter.reset()
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        return None
    segmenter.step(*first)
    counted = 0
    by_stage: dict[str, float] = {}
    started: dict[str, float] = {}
    with FlopCounterMode(display=False, custom_mapping=_packed_convolution_flops()) as counter, \
            count_multiply_adds() as native:
        def so_far() -> float:  # multiply-adds counted until now
            return counter.get_total_flops() / 2 + sum(native.values())

        def listener(name: str, entering: bool) -> None:
            if entering:
                started[name] = so_far()
            else:
                by_stage[name] = by_stage.get(name, 0.0) + so_far() - started.pop(name)

        with segmenter.timer.record(listener=listener):
            for rgb, mask in frames:
                segmenter.step(rgb, mask)
                counted += 1
    segmenter.reset()
    if not counted:
        return None
    flops = counter.get_flop_counts().get("Global", {})
    convolution = sum(v for op, v in flops.items() if "convolution" in str(op))
    scale = 1e9 * counted
    total = counter.get_total_flops() / 2 + sum(native.values())
    by_stage["other"] = total - sum(by_stage.values())

    def gmac(v: float) -> float:  # 9 significant digits: exact for small test cases, short in JSON
        return float(f"{v / scale:.9g}")

    return {"total": gmac(total), "convolution": gmac(convolution / 2 + native["convolution"]),
            "local_window": gmac(native["local_window"]),
            "stages": {name: gmac(v) for name, v in by_stage.items()}}


def stage_rates(gmac_per_frame: dict[str, float], ms_per_frame: dict[str, float], peak) -> dict[str, dict]:
    """Per stage with both multiply-adds and time: GMAC/s (GMAC per frame / mean seconds per frame) and the fraction
    of `peak` (GMAC/s: the fp32 or bf16 figure of a `lmrc.eval.peak.Peak`)."""
    out = {}
    for name, gmac in gmac_per_frame.items():
        ms = ms_per_frame.get(name, 0.0)
        if gmac > 0 and ms > 0:
            rate = gmac / (ms / 1000)
            out[name] = {"gmac_per_second": round(rate, 2), "fraction_of_peak": round(rate / peak, 4)}
    return out


def cpu_description() -> dict[str, str]:
    """The CPU's model name and the vector instructions PyTorch uses on it (e.g. AVX2, AVX512)."""
    name = cpu_info().get("model name") or platform.processor() or platform.machine()
    return {"name": name, "capability": torch.backends.cpu.get_cpu_capability()}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(args) -> int:
    from lmrc.inference.segmenter import Segmenter

    if args.frames < 1 or args.warmup < 0 or args.frames <= args.warmup:
        raise LmrcError(f"--frames ({args.frames}) must exceed --warmup ({args.warmup})")
    if args.objects < 1:
        raise LmrcError("--objects must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise LmrcError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    settings = list(args.compare) if args.compare else [args.setting]
    if args.compare and args.weights:
        raise LmrcError("--compare builds both settings with random weights; drop --weights")
    if args.compare and args.compare[0] == args.compare[1]:
        raise LmrcError("--compare needs two different settings")
    runtimes = args.runtime == "onnxruntime"
    if runtimes and (args.compare or args.macs or args.no_optimize or args.compile):
        raise LmrcError("--runtime onnxruntime compares fp32 torch with onnxruntime for one setting: drop --compare, "
                        "--macs, --no-optimize and --compile")
    check_runtime_options(args)

    from lmrc.utils.device import half_precision_warning

    config = inference_config_from_args(args, **onnx_runtime_overrides(args))
    onnx_model = None
    if runtimes:
        from lmrc.inference.onnx_runtime import open_onnx_model

        if args.onnx:
            onnx_model = open_onnx_model(args.onnx)
            if onnx_model.config.setting != args.setting:
                raise LmrcError(f"the graphs in {args.onnx} are setting {onnx_model.config.setting}; "
                                f"pass --setting {onnx_model.config.setting}")
            if args.top_k is None:  # not asked for: the graphs' own, for both runtimes
                config = dataclasses.replace(config, top_k=onnx_model.read_top_k)
    segmenters = {}
    for setting in settings:
        model = build_model(args.model, setting, args.weights)
        segmenters[setting] = Segmenter(model, config, optimize=not args.no_optimize, compile=args.compile)
    if runtimes:  # the same setting in torch and in onnxruntime, side by side
        if onnx_model is None:
            onnx_model = open_onnx_model(None, model, read_top_k=config.top_k)
        segmenters = {"torch": segmenters[args.setting], "onnxruntime": Segmenter(onnx_model, config)}
    first = next(iter(segmenters.values()))
    warning = half_precision_warning(first.precision) if first.device.type == "cpu" else None
    if warning:
        print(f"lmrc bench: warning: {warning}", file=sys.stderr)
    frames = input_frames(args, args.frames)
    load_before = _loadavg()
    start = time.perf_counter()
    if args.checkpoints:
        try:
            checkpoints = tuple(sorted({int(c) for c in args.checkpoints.split(",") if c.strip()}))
        except ValueError:
            raise LmrcError(f"--checkpoints takes frame numbers separated by commas, got {args.checkpoints!r}") from None
    else:
        checkpoints = tuple(c for c in CHECKPOINTS if c <= args.frames)
    runs = measure(segmenters, frames, args.warmup, checkpoints, on_checkpoint=_print_checkpoint)
    wall = time.perf_counter() - start
    process_size = list(first.process_size or ())  # before --macs resets the segmenters

    results = {label: {**runs[label].summary(args.warmup), "checkpoints": runs[label].checkpoints} for label in runs}
    peak = None
    if args.macs:
        from lmrc.eval.peak import estimate_peak

        peak = estimate_peak(torch.get_num_threads(), measure=False)
        peak_precision = "bf16" if first.precision == "bf16" else "fp32"  # the precision chosen ("auto" resolved)
        peak_gmacs = peak.bf16_gmacs if peak_precision == "bf16" else peak.fp32_gmacs
        for label, result in results.items():
            macs = multiply_adds_per_frame(segmenters[label], input_frames(args, args.mem_every + 1))
            if macs is None:
                raise LmrcError(f"--macs needs at least 2 frames of {args.input}")
            result["gmac_per_frame"] = macs
            result["gmac_per_second"] = round(macs["total"] / (result["ms_per_frame_mean"] / 1000), 2)
            result["stage_rates"] = stage_rates(macs["stages"], result["stages_ms_mean"], peak_gmacs)
    main_label = list(segmenters)[-1]
    report = {
        "model": args.model,
        "setting": settings[-1],
        "runtime": "torch vs onnxruntime" if runtimes else "torch",
        "weights": args.weights or "random (speed does not depend on the weights)",
        "precision": first.precision,
        "precision_reason": first.precision_reason,
        "device": str(first.device),
        "flip": config.flip,
        "size": config.size,
        "process_size": process_size,
        "input": args.input or f"synthetic {DEFAULT_SIZE[1]}x{DEFAULT_SIZE[0]}, {args.objects} objects",
        "frames": len(runs[main_label].totals),
        "warmup": args.warmup,
        "max_memory_frames": args.max_memory_frames,
        "global_read_top_k": config.top_k,
        "threads": torch.get_num_threads(),
        "cpu": cpu_description(),
        "optimized": not args.no_optimize,
        "compiled": bool(args.compile),
        "load_average": {"before": load_before, "after": _loadavg()},
        "wall_seconds": round(wall, 1),
        **{k: v for k, v in results[main_label].items()},
        "peak_memory_mb": round(peak_rss_mb(), 1),
        "torch": torch.__version__,
    }
    if peak is not None:
        report["peak"] = {"fp32_gmac_per_second": round(peak.fp32_gmacs, 1),
                          "bf16_gmac_per_second": round(peak.bf16_gmacs, 1),
                          "used": peak_precision, "derivation": peak.describe()}
    if args.compare or runtimes:
        a, f = list(segmenters)
        report["runs"] = results
        # Mean frame time (= 1/throughput): setting A encodes values only on memory frames (every mem_every-th),
        # a cost a median frame does not show; the ratio of medians is given too.
        report["ratio"] = round(results[f]["ms_per_frame_mean"] / results[a]["ms_per_frame_mean"], 3)
        report["ratio_of_medians"] = round(results[f]["ms_per_frame"] / results[a]["ms_per_frame"], 3)
        if args.macs:
            report["arithmetic_ratio"] = round(results[f]["gmac_per_frame"]["total"] / results[a]["gmac_per_frame"]["total"], 3)
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(report, results)
    return 0


def _print_checkpoint(label: str, c: dict) -> None:
    print(f"  [{label}] frame {c['frame']:>6}: {c['ms_per_frame']:8.1f} ms/frame, RSS {c['rss_mb']:8.1f} MB, "
          f"memory bank {c['memory_bank_mb']:7.2f} MB ({c['memory_frames']} frames), load {_loadavg()}",
          file=sys.stderr, flush=True)


def _print_table(report: dict, results: dict[str, dict]) -> None:
    out = sys.stdout
    load = report["load_average"]
    print(f"lmrc bench: {report['model']}, {report['precision']} ({report['precision_reason']}), processed at "
          f"{'x'.join(map(str, report['process_size'][::-1]))} (padded to 16), {report['threads']} thread(s), "
          f"{'optimized' if report['optimized'] else 'unoptimized'}{', compiled' if report['compiled'] else ''}, "
          f"global read top-k {report['global_read_top_k'] or 'all'}{', test-time flip' if report['flip'] else ''}",
          file=out)
    print(f"  weights: {report['weights']}; input: {report['input']}; cpu: {report['cpu']['name']} "
          f"({report['cpu']['capability']})", file=out)
    print(f"  {report['frames']} frames, medians over the last {report['frames'] - report['warmup']}; "
          f"load average {load['before']} -> {load['after']}", file=out)
    labels = list(results)
    present = {s for r in results.values() for s in r["stages_ms"]}
    stages = [s for s in (*timing.STAGES, "other") if s in present]
    width = max(len(s) for s in stages + ["ms per frame"]) + 2
    print("  " + "stage (ms)".ljust(width) + "".join(f"{'setting ' + l if l in ABLATION_SETTINGS else l:>12}" for l in labels), file=out)
    for s in stages:
        print("  " + s.ljust(width) + "".join(f"{results[l]['stages_ms'].get(s, 0.0):12.1f}" for l in labels), file=out)
    print("  " + "ms per frame".ljust(width) + "".join(f"{results[l]['ms_per_frame']:12.1f}" for l in labels), file=out)
    print("  " + "  (mean)".ljust(width) + "".join(f"{results[l]['ms_per_frame_mean']:12.1f}" for l in labels), file=out)
    print("  " + "frames/s".ljust(width) + "".join(f"{results[l]['fps']:12.2f}" for l in labels), file=out)
    if "gmac_per_frame" in results[labels[0]]:
        print("  " + "GMAC per frame".ljust(width)
              + "".join(f"{results[l]['gmac_per_frame']['total']:12.2f}" for l in labels), file=out)
        print("  " + "GMAC/s".ljust(width) + "".join(f"{results[l]['gmac_per_second']:12.1f}" for l in labels), file=out)
        peak = report["peak"]
        print(f"  per stage: GMAC per frame, GMAC/s (its multiply-adds / its mean time), % of the {peak['used']} peak "
              f"of {peak[peak['used'] + '_gmac_per_second']:.1f} GMAC/s", file=out)
        for s in stages:
            cells = []
            for l in labels:
                gmac = results[l]["gmac_per_frame"]["stages"].get(s, 0.0)
                rate = results[l]["stage_rates"].get(s)
                cells.append(f"{gmac:7.3f} {rate['gmac_per_second']:6.1f} {rate['fraction_of_peak']:5.0%}" if rate
                             else f"{gmac:7.3f} {'-':>6} {'-':>5}")
            print("  " + s.ljust(width) + "".join(f"{c:>22}" for c in cells), file=out)
        for line in peak["derivation"]:
            print(f"  {line}", file=out)
    print(f"  peak memory (process RSS): {report['peak_memory_mb']:.0f} MB", file=out)
    if "ratio" in report:
        a, f = labels
        print(f"  cost ratio {f}/{a}: {report['ratio']:.3f} (mean frame times; ratio of medians {report['ratio_of_medians']:.3f})",
              file=out)
    if "arithmetic_ratio" in report:
        print(f"  arithmetic ratio {f}/{a}: {report['arithmetic_ratio']:.3f} (multiply-adds per frame over a memory "
              f"cycle, the native local reads included)", file=out)
    for label in labels:
        for c in results[label]["checkpoints"]:
            print(f"  [{label}] frame {c['frame']:>6}: {c['ms_per_frame']:8.1f} ms/frame, RSS {c['rss_mb']:8.1f} MB, "
                  f"memory bank {c['memory_bank_mb']:7.2f} MB ({c['memory_frames']} frames)", file=out)
