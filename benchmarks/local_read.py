"""Benchmark of the local memory read (LMR, eq. 4-5) at 1/4, 1/8 and 1/16 of 480p, d = 2, batch 1.

Methods: `fast` (lmrc.ops.local_window.local_attention, native kernels), `shifted` (the plain PyTorch ops of
local_window.py: one shifted view per offset), `unfold` (F.unfold of keys and values), `dense` (the literal
HW x HW reference). "plain" below is the faster of shifted and unfold at each scale.

Time: median of several runs after warm-up, at torch.get_num_threads() threads. forward runs under no_grad
(inference); forward+backward makes q, k, v leaves and back-propagates a fixed random readout gradient.

Multiply-adds (GMAC/s, and the fraction of the machine's peak from lmrc.eval.peak, whose derivation is printed
first): LMR forward = H W (2d+1)^2 (Ck + Cv) (similarity and readout; the softmax is not counted), backward twice
that (two gradients of each product), so forward+backward = 3x forward. The same nominal count is used for every
method (a method doing redundant work is just slower). The inference kernels (`lw_attention_inf`: LMR with the
comparator's top-5; `lw_wsum_inf`: SLMR's eq. 6-7 reorganisation of key and value from half-size weights) count
H W (2d+1)^2 (Ck + Cv) too. `--baseline-rev REV` also builds the kernels of git revision REV (as that revision
built them) and times them alternating with this tree's, side by side; a kernel whose C arguments changed since REV
is shown n/a (this tree's wrappers cannot call it).

`--inference` times instead the local reads of one setting-F frame (LMR at 1/4, 1/8, 1/16, SLMR at 1/4 and 1/8,
2 objects, with the memory comparator's weighting up to the decoder's input, no_grad) on the pre-issue-#7 path and on the model's inference path, alternating in one
process, and prints both and their ratio.

Memory: every allocation and free of torch's CPU allocator is recorded by torch.profiler (profile_memory)
during one run; the running sum gives the peak beyond what was live before the call (the inputs). The native
kernels allocate nothing themselves, so this covers them completely; scratch space that MKL/oneDNN take
outside torch's allocator (unfold, dense matmuls) is not counted. Columns:
  peak     = peak bytes beyond the inputs during the call
  results  = bytes still live when the call returns (outputs; for fwd+bwd also the input gradients)
  extra    = peak - results: working memory the op needs beyond what it must hand back
All three are given relative to the readout tensor's size.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from lmrc.eval.peak import estimate_peak
from lmrc.ops import _native
from lmrc.ops import local_window as lw
from lmrc.ops.reference import local_memory_read_reference
from lmrc.utils.workspace import Workspace

SCALES = {  # name: (H, W, value channels) at 1/4, 1/8, 1/16 of 480 x 864
    "quarter": (120, 216, 64),
    "eighth": (60, 108, 128),
    "sixteenth": (30, 54, 256),
}
KEY_CHANNELS, RADIUS = 64, 2


def attention_fast(q, k, v, radius, scale):
    if os.environ.get("LMRC_LOCAL_WINDOW"):
        raise SystemExit("unset LMRC_LOCAL_WINDOW to benchmark the native kernels")
    return lw.local_attention(q, k, v, radius, 1, scale)


def attention_shifted(q, k, v, radius, scale):
    sim = lw.local_similarity_plain(q, k, radius, 1, scale)
    aff = torch.softmax(sim, 1)
    return lw.local_weighted_sum_plain(aff, v, radius, 1), sim, aff


def attention_unfold(q, k, v, radius, scale):
    """LMR with F.unfold: keys and values unfolded to B x C x (2d+1)^2 x HW."""
    b, ck, h, w = q.shape
    n, side = (2 * radius + 1) ** 2, 2 * radius + 1
    unfold = lambda t: F.unfold(t, side, padding=radius).view(t.shape[0], t.shape[1], n, h * w)  # noqa: E731
    q_flat = q.reshape(b, ck, 1, h * w)
    # ||q - k||^2 = |q|^2 - 2 q.k + |k|^2, with |k|^2 unfolded as one map instead of squaring the unfolded keys
    dot = (q_flat * unfold(k)).sum(1)
    k_sq = unfold(k.pow(2).sum(1, keepdim=True))[:, 0]
    sim = -scale * (q_flat.pow(2).sum(1) - 2 * dot + k_sq)
    inside = unfold(torch.ones(1, 1, h, w, dtype=q.dtype))[:, 0] > 0
    sim = sim.masked_fill(~inside, float("-inf"))
    aff = torch.softmax(sim, 1)
    readout = (aff[:, None] * unfold(v)).sum(2).view(b, v.shape[1], h, w)
    return readout, sim.view(b, n, h, w), aff.view(b, n, h, w)


def attention_dense(q, k, v, radius, scale):
    return local_memory_read_reference(q, k, v, radius, scale)


METHODS = {"fast": attention_fast, "shifted": attention_shifted, "unfold": attention_unfold, "dense": attention_dense}


def make_inputs(h, w, cv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, KEY_CHANNELS, h, w, generator=g)
    k = q + 0.5 * torch.randn(1, KEY_CHANNELS, h, w, generator=g)
    v = torch.randn(1, cv, h, w, generator=g)
    grad = torch.randn(1, cv, h, w, generator=g)
    return q, k, v, grad


def run_once(fn, inputs, backward):
    """One call; returns what the caller would keep (outputs, and gradients for fwd+bwd)."""
    q, k, v, grad = inputs
    if not backward:
        with torch.no_grad():
            return fn(q, k, v, RADIUS, KEY_CHANNELS ** -0.5)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    outputs = fn(*leaves, RADIUS, KEY_CHANNELS ** -0.5)
    outputs[0].backward(grad)
    return outputs, [t.grad for t in leaves]


def time_ms(fn, inputs, backward, repeats):
    run_once(fn, inputs, backward)  # warm-up (also builds the native library on the first call)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run_once(fn, inputs, backward)
        times.append((time.perf_counter() - start) * 1e3)
        del result
    return statistics.median(times)


def memory_bytes(fn, inputs, backward):
    """(peak, results) in bytes beyond what was allocated before the call, from the profiler's allocator events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run_once(fn, inputs, backward)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    del result
    return peak, live


# --- inference: the reads of one setting-F frame, old path vs the no-grad kernels ---------------------------------------

OBJECTS = 2
VALUE_DIMS = {2: 64, 3: 128, 4: 256}  # per object, lmrc-lite
STAGE_SIZES = {2: (120, 216), 3: (60, 108), 4: (30, 54)}  # 854x480 padded to 864x480


def frame_inputs(seed=0):
    """Keys (query and local memory) and the N objects' local values per stage, as the segmenter passes them."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for r, (h, w) in STAGE_SIZES.items():
        q = torch.randn(1, KEY_CHANNELS, h, w, generator=g)
        k = q + 0.5 * torch.randn(1, KEY_CHANNELS, h, w, generator=g)
        out[r] = (q, k, torch.randn(1, OBJECTS * VALUE_DIMS[r], h, w, generator=g))
    return out


def frame_comparator(k=5):
    """Memory-comparator reliability weights for L2-4 and S2-3 (random, as in an untrained model) and a global top-k."""
    from lmrc.model.comparator import MemoryComparator, upsample_global_top_k

    torch.manual_seed(0)
    comparator = MemoryComparator(["L2", "L3", "L4", "S2", "S3"], k, alpha=1.0).eval()
    g = torch.Generator().manual_seed(1)
    global_top = torch.randn(1, k, *STAGE_SIZES[4], generator=g).sort(1, descending=True).values
    return comparator, upsample_global_top_k(global_top)


def frame_reads_old(inputs, comparator, global_top, k=5, scale=KEY_CHANNELS ** -0.5):
    """Before issue #7: autograd kernels under no_grad, torch.topk of the similarity, eq. 6 and 7 as two sums over an
    upsampled affinity copy, the comparator's weighed copy of each readout, one concatenation per stage."""
    from lmrc.model.memory_reads import top_k_similarities

    parts, aff = {r: [] for r in STAGE_SIZES}, {}

    def weigh(name, read, sim):
        r = int(name[1:])
        parts[r].append(comparator(name, read, top_k_similarities(sim, k), global_top[r])[0])

    for r in (4, 3, 2):
        q, key, v = inputs[r]
        read, sim, aff[r] = lw.local_attention(q, key, v, RADIUS, 1, scale)
        weigh(f"L{r}", read, sim)
    for r in (3, 2):
        q, key, v = inputs[r]
        w = F.interpolate(aff[r + 1], size=q.shape[-2:], mode="nearest")
        sk, sv = lw.local_weighted_sum(w, key, RADIUS, 2), lw.local_weighted_sum(w, v, RADIUS, 2)
        read, sim, _ = lw.local_attention(q, sk, sv, RADIUS, 1, scale)
        weigh(f"S{r}", read, sim)
    return {r: torch.cat([p.view(1, OBJECTS, -1, *p.shape[-2:]) for p in ps], 2) for r, ps in parts.items()}


WORKSPACE = Workspace()  # the benchmark's own reused buffers, as an inference copy keeps its own


def frame_reads_new(inputs, comparator, global_top, k=5, scale=KEY_CHANNELS ** -0.5):
    """The inference fast path's reads (`lmrc.inference.fast_path`): one kernel per read computes the readout, the
    top-k and the comparator's weight and writes the weighed readout into its place in the decoder's input; eq. 6-7
    in one pass on the coarse affinity."""
    from lmrc.inference.fast_path import fast_local_memory_read, fast_sequential_local_memory_read

    stage, aff = {}, {}

    def fused(name, r):
        module = comparator.weights[name]
        return global_top[r], module.conv.weight.reshape(-1), float(module.conv.bias), module.alpha

    for r in (4, 3, 2):
        q, key, v = inputs[r]
        half = v.shape[1] // OBJECTS
        stage[r] = WORKSPACE.buffer(f"bench_stage{r}", (1, OBJECTS, 2 * half, *v.shape[-2:]), torch.float32)
        res = fast_local_memory_read(q, key, v, RADIUS, scale, comparator_top_k=k, keep_affinity=r > 2,
                                     out=stage[r][:, :, :half], reliability=fused(f"L{r}", r))
        aff[r] = res.affinity
    for r in (3, 2):
        q, key, v = inputs[r]
        half = v.shape[1] // OBJECTS
        fast_sequential_local_memory_read(q, key, v, aff[r + 1], RADIUS, scale, WORKSPACE, comparator_top_k=k,
                                          out=stage[r][:, :, half:], reliability=fused(f"S{r}", r))
    # stage 4 holds L4 only (its other part, the global read's readout, is not part of this benchmark)
    return {r: stage[r][:, :, : inputs[r][2].shape[1] // OBJECTS] if r == 4 else stage[r] for r in stage}


def inference_main(repeats: int) -> int:
    if os.environ.get("LMRC_LOCAL_WINDOW"):
        raise SystemExit("unset LMRC_LOCAL_WINDOW to benchmark the native kernels")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one setting-F frame's local reads at 854x480 "
          f"(LMR at stages 2-4, SLMR at 2-3) and their memory-comparator weighting, {OBJECTS} objects, d={RADIUS}, "
          f"top-5, no_grad")
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    inputs = frame_inputs()
    comparator, global_top = frame_comparator()
    with torch.inference_mode():
        old, new = frame_reads_old(inputs, comparator, global_top), frame_reads_new(inputs, comparator, global_top)
        err = max((old[r] - new[r]).abs().max().item() for r in old)
        del old, new
        times = {"old": [], "new": []}
        for i in range(repeats):  # alternating, so both see the same machine load
            for label in (("old", "new") if i % 2 == 0 else ("new", "old")):
                fn = frame_reads_old if label == "old" else frame_reads_new
                start = time.perf_counter()
                result = fn(inputs, comparator, global_top)
                times[label].append((time.perf_counter() - start) * 1e3)
                del result
    old_ms, new_ms = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"max |old - new| over the weighed readouts (the decoder's input): {err:.1e}")
    print(f"per frame (median of {repeats}): old {old_ms:.1f} ms, new {new_ms:.1f} ms, old/new x{old_ms / new_ms:.2f}")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    print(f"local_read inference old_ms={old_ms:.1f} new_ms={new_ms:.1f} ratio={old_ms / new_ms:.2f}")
    return 0


def lmr_gmac(h, w, cv, radius=RADIUS):
    """Multiply-adds of one LMR forward (eq. 4-5) at this size, in GMAC."""
    return h * w * (2 * radius + 1) ** 2 * (KEY_CHANNELS + cv) / 1e9


def inference_attention(q, k, v):
    return lw.local_attention_inference(q, k, v, RADIUS, 1, KEY_CHANNELS ** -0.5, top_k=5)


def inference_wsum(weights, k, v):
    return lw.local_weighted_sums_inference(weights, [k, v], RADIUS, 2, upsample=2)


def channels_last_value(v, objects=2):
    """v's channels as `objects` objects' channel groups of a channels-last bf16 value, as the fast path's value
    encoder leaves stages 2-3 (B x N x C x H x W, each pixel's channels contiguous), and a channels-last float32
    decoder sum of one object's width with its bf16 ReLU buffer."""
    b, c, h, w = v.shape
    value = v.bfloat16().reshape(b * objects, c // objects, h, w).contiguous(memory_format=torch.channels_last)
    total = torch.zeros(b * objects, c // objects, h, w).contiguous(memory_format=torch.channels_last)
    activated = torch.empty_like(total, dtype=torch.bfloat16)
    per_object = lambda t: t.view(b, objects, c // objects, h, w)
    return per_object(value), per_object(total), per_object(activated)


def inference_attention_into_sum(q, k, value, total, activated):
    return lw.local_attention_inference(q, k, value, RADIUS, 1, KEY_CHANNELS ** -0.5, top_k=5, out=total,
                                        accumulate=True, relu_out=activated)


def baseline_library(rev: str):
    """The float32 kernels of git revision `rev`, compiled as that revision did: -O3 -march=native -fopenmp before
    the per-ISA builds, else with the flags of the ISA variant this tree picks."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def show(path):
        return subprocess.run(["git", "-C", str(root), "show", f"{rev}:{path}"], check=True, capture_output=True).stdout

    names = subprocess.run(["git", "-C", str(root), "ls-tree", "--name-only", rev, "lmrc/ops/"], check=True,
                           capture_output=True, text=True).stdout.split()
    out = Path(tempfile.mkdtemp(prefix="lmrc-baseline-"))
    try:
        for name in names:
            if name.endswith((".c", ".h")):
                (out / Path(name).name).write_bytes(show(name))
        if b"ISA_VARIANTS" in show("lmrc/ops/_native.py"):
            isa = _native.chosen_isa()
            isa_flags, vector_bytes, _ = _native.ISA_VARIANTS[isa]
            flags = ["-O3", "-fopenmp", *isa_flags, f"-DLW_VBYTES={vector_bytes}", "-DLW_BF16_INPUTS=1"]
        else:
            flags = ["-O3", "-march=native", "-fopenmp"]
        subprocess.run(["cc", "-std=gnu11", "-shared", "-fPIC", *flags, "-DLW_REAL=float", "-DLW_SUFFIX=_f32",
                        *(str(p) for p in sorted(out.glob("*.c"))), "-o", str(out / "baseline.so"), "-lm"], check=True)
        lib = _native.NativeLibrary(out / "baseline.so", "_f32", flags, isa=f"git {rev}")
        ours = kernel_arguments(b"".join(p.read_bytes() for p in (*_native.SOURCES, *_native.HEADERS)))
        theirs = kernel_arguments(b"".join(p.read_bytes() for p in sorted(out.glob("*.[ch]"))))
        # a kernel whose arguments changed since REV would be called with this tree's arguments: not comparable
        lib.changed = {name for name in ours if theirs.get(name) != ours[name]}
        return lib
    finally:
        shutil.rmtree(out)  # the loaded library stays mapped


def kernel_arguments(source: bytes) -> dict[str, str]:
    """The parameter list of each exported local-window kernel in C source, whitespace-normalised."""
    import re

    text = source.decode()
    found = {}
    for name in ("lw_attention_fwd", "lw_attention_bwd", "lw_attention_inf", "lw_wsum_inf"):
        match = re.search(r"\b" + name + r"\)+\s*\(([^{]*)\)\s*\{", text)
        if match:
            found[name] = " ".join(match.group(1).split())
    return found


# the C kernels each benchmark case calls
CASE_KERNELS = {"LMR fwd": ("lw_attention_fwd",), "LMR fwd+bwd": ("lw_attention_fwd", "lw_attention_bwd"),
                "lw_attention_inf": ("lw_attention_inf",), "lw_wsum_inf (SLMR)": ("lw_wsum_inf",),
                "lw_attention_inf bf16": ("lw_attention_inf",), "lw_wsum_inf bf16": ("lw_wsum_inf",),
                "lw_attention_inf c-last": ("lw_attention_inf",), "lw_wsum_inf c-last": ("lw_wsum_inf",)}


def with_library(lib, fn):
    """fn run with `lib` in place of this tree's float32 kernels (None: this tree's)."""
    if lib is None:
        return fn()
    saved = _native.load
    _native.load = lambda dtype, isa=None: lib if dtype == torch.float32 else saved(dtype, isa)
    try:
        return fn()
    finally:
        _native.load = saved


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def kernel_rates(peak, repeats, baseline=None, clock="wall"):
    """GMAC/s of the native kernels per scale: forward, forward+backward and the inference kernels, this tree's (and
    the baseline's, alternating). Returns {(scale, kernel, build): ms}."""
    builds = {"this tree": None} if baseline is None else {"this tree": None, baseline.isa: baseline}
    out = {}
    print(f"\nnative kernels, median of {repeats}, {clock} clock" + (
        " (CPU time of this process: other processes' share of the machine left out; spinning OpenMP threads count, "
        "so with several threads the rate is understated)" if clock == "cpu" else ""))
    print(f"{'scale':>9} {'kernel':>22} {'build':>14} {'ms':>8} {'GMAC/s':>8} {'of peak':>8}   (fp32 peak: bf16 "
          f"inputs are computed in fp32)")
    for scale_name, (h, w, cv) in SCALES.items():
        inputs = make_inputs(h, w, cv)
        q, k, v, _ = inputs
        g = torch.Generator().manual_seed(2)
        weights = torch.softmax(torch.randn(1, (2 * RADIUS + 1) ** 2, h // 2, w // 2, generator=g), 1)
        gmac = lmr_gmac(h, w, cv)
        qh, kh, vh = q.bfloat16(), k.bfloat16(), v.bfloat16()
        value_cl, total, activated = channels_last_value(v)
        cases = {
            "LMR fwd": (lambda: run_once(attention_fast, inputs, False), gmac),
            "LMR fwd+bwd": (lambda: run_once(attention_fast, inputs, True), 3 * gmac),
            "lw_attention_inf": (lambda: inference_attention(q, k, v), gmac),
            "lw_wsum_inf (SLMR)": (lambda: inference_wsum(weights, k, v), gmac),
            # bf16 inputs (bf16 autocast): read as bf16 by this tree's kernels, copied to float32 by older ones
            "lw_attention_inf bf16": (lambda: inference_attention(qh, kh, vh), gmac),
            "lw_wsum_inf bf16": (lambda: inference_wsum(weights, kh, vh), gmac),
            # the fast path's stages 2-3: float32 keys, a channels-last bf16 value of 2 objects, the readout added
            # into the decoder's channels-last sum with its bf16 ReLU (no layout pass before or after)
            "lw_attention_inf c-last": (lambda: inference_attention_into_sum(q, k, value_cl, total, activated), gmac),
            "lw_wsum_inf c-last": (lambda: inference_wsum(weights, k, value_cl), gmac),
        }
        for kernel, (fn, macs) in cases.items():
            changed = baseline is not None and set(CASE_KERNELS[kernel]) & baseline.changed
            if changed:
                print(f"{scale_name:>9} {kernel:>22} {baseline.isa:>14}   n/a: {', '.join(sorted(changed))} takes other "
                      f"arguments there")
            case_builds = {"this tree": None} if changed else builds
            times = {label: [] for label in case_builds}
            with torch.inference_mode(kernel not in ("LMR fwd+bwd",)):
                for label, lib in case_builds.items():
                    with_library(lib, fn)  # warm-up
                for i in range(repeats):  # alternating, so every build sees the same machine load
                    for label, lib in (case_builds.items() if i % 2 == 0 else reversed(case_builds.items())):
                        start = CLOCKS[clock]()
                        with_library(lib, fn)
                        times[label].append(CLOCKS[clock]() - start)
            for label in case_builds:
                sec = statistics.median(times[label])
                out[(scale_name, kernel, label)] = sec * 1e3
                print(f"{scale_name:>9} {kernel:>22} {label:>14} {sec * 1e3:8.2f} {macs / sec:8.1f} "
                      f"{peak.fraction(macs / sec):8.1%}", flush=True)
            if len(case_builds) > 1:
                ratio = out[(scale_name, kernel, baseline.isa)] / out[(scale_name, kernel, "this tree")]
                print(f"{'':>9} {'':>22} {'speedup':>14} {ratio:8.2f}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dense-quarter", action="store_true", help="also run the dense reference at 1/4 (~5 GB)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case (median reported)")
    parser.add_argument("--baseline-rev", metavar="REV",
                        help="also time the native kernels of git revision REV, alternating with this tree's")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="time the native kernels' table by wall clock (default) or by this process's CPU time "
                             "(a busy shared machine: measures the kernels rather than their share of the CPUs)")
    parser.add_argument("--kernels-only", action="store_true",
                        help="only the native kernels' GMAC/s table (no plain methods, memory or last line)")
    parser.add_argument("--inference", action="store_true",
                        help="only the reads of one setting-F frame (2 objects, no_grad): the old path vs the inference "
                             "kernels, alternating, with their time ratio")
    args = parser.parse_args(argv)
    if args.inference:
        return inference_main(max(args.repeats, 3))

    if os.environ.get("LMRC_LOCAL_WINDOW"):
        raise SystemExit("unset LMRC_LOCAL_WINDOW to benchmark the native kernels")
    from lmrc.utils.memory import reuse_freed_memory

    reuse_freed_memory()  # as the CLI does: fresh outputs would otherwise fault in their pages on every call
    torch.manual_seed(0)
    lib = _native.load(torch.float32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d={RADIUS}, keys {KEY_CHANNELS} ch, batch 1; "
          f"native kernels: {lib.isa if lib else 'not built'} ({lib.path.name if lib else '-'})")
    # wall-clock medians are only comparable on an idle machine: show how busy it was
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    machine = estimate_peak()
    print("\n".join(machine.describe()))
    baseline = baseline_library(args.baseline_rev) if args.baseline_rev else None
    kernel_rates(machine, args.repeats, baseline, args.clock)
    if args.kernels_only:
        print(f"load average at end: {os.getloadavg()[0]:.1f}")
        return 0
    print()
    rows, summary = [], {}
    print(
        f"{'scale':>9} {'HxW':>7} {'Cv':<4} {'method':>7} {'pass':>7} {'ms':>10} {'GMAC/s':>7} {'of peak':>7} "
        f"{'peak/R':>8} {'result/R':>8} {'extra/R':>8}   {'peak MiB':>9} {'vs fast':>9}"
    )
    for scale_name, (h, w, cv) in SCALES.items():
        inputs = make_inputs(h, w, cv)
        readout_bytes = inputs[2].numel() * 4
        reference_readout = None
        for method, fn in METHODS.items():
            if method == "dense" and scale_name == "quarter" and not args.dense_quarter:
                continue
            repeats = 3 if method == "dense" else args.repeats
            # the outputs agree across methods (sanity check of what is being timed)
            readout = run_once(fn, inputs, False)[0]
            if reference_readout is None:
                reference_readout = readout
            err = (readout - reference_readout).abs().max().item()
            del readout
            for backward in (False, True):
                ms = time_ms(fn, inputs, backward, repeats)
                peak, results = memory_bytes(fn, inputs, backward)
                pass_name = "fwd+bwd" if backward else "fwd"
                summary[(scale_name, method, pass_name)] = (ms, peak, results)
                rate = lmr_gmac(h, w, cv) * (3 if backward else 1) / (ms / 1e3)
                rows.append(
                    f"{scale_name:>9} {h:>3}x{w:<3} v{cv:<3} {method:>7} {pass_name:>7} {ms:10.2f} {rate:7.1f} "
                    f"{machine.fraction(rate):7.1%} "
                    f"{peak / readout_bytes:8.2f} {results / readout_bytes:8.2f} {(peak - results) / readout_bytes:8.2f}"
                    f"   {peak / 2**20:9.1f} {err:9.1e}"
                )
                print(rows[-1], flush=True)

    print("\nR = readout size; peak, result and extra as defined in the module docstring.")
    print("speedups of fast (time ratio) and memory of fast vs plain (plain = faster of shifted and unfold):")
    for scale_name in SCALES:
        for pass_name in ("fwd", "fwd+bwd"):
            fast = summary[(scale_name, "fast", pass_name)]
            plain_name = min(("shifted", "unfold"), key=lambda m: summary[(scale_name, m, pass_name)][0])
            plain = summary[(scale_name, plain_name, pass_name)]
            line = (
                f"  {scale_name:>9} {pass_name:>7}: plain={plain_name:<7} speedup x{plain[0] / fast[0]:6.2f}, "
                f"peak memory plain/fast x{plain[1] / max(fast[1], 1):6.2f}"
            )
            if (scale_name, "dense", pass_name) in summary:
                line += f", speedup vs dense x{summary[(scale_name, 'dense', pass_name)][0] / fast[0]:8.1f}"
            print(line)

    quarter = "quarter", "fwd+bwd"
    fast = summary[(*quarter[:1], "fast", quarter[1])]
    plain = min(summary[(quarter[0], m, quarter[1])][0] for m in ("shifted", "unfold"))
    readout_bytes = SCALES["quarter"][0] * SCALES["quarter"][1] * SCALES["quarter"][2] * 4
    print(
        f"(last line: quarter scale, forward+backward; extra_memory_vs_output = (peak - results) / readout; "
        f"peak beyond inputs alone is {fast[1] / readout_bytes:.2f} x readout)"
    )
    gmacs = 3 * lmr_gmac(*SCALES["quarter"]) / (fast[0] / 1e3)
    print(f"load average at end: {os.getloadavg()[0]:.1f}; quarter-scale forward+backward {gmacs:.1f} GMAC/s = "
          f"{machine.fraction(gmacs):.1%} of the fp32 peak")
    print(
        f"local_read quarter_scale speedup_vs_plain={plain / fast[0]:.2f} "
        f"extra_memory_vs_output={(fast[1] - fast[2]) / readout_bytes:.2f} gmac_per_s={gmacs:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
