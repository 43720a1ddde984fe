"""`lmrc bench` and the inference optimisations it measures: JSON keys, stage timing, --compare, flat memory with a
cap, and optimised models giving the unoptimised model's outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from lmrc.cli import main as cli_main
from lmrc.config import model_config
from lmrc.eval.bench import build_model, measure, multiply_adds_per_frame, stage_rates, synthetic_video
from lmrc.inference.fast_path import ReusedZeroPad2d, prepare_for_inference
from lmrc.inference.packed_conv import PackedConv2d
from lmrc.inference.segmenter import Segmenter
from lmrc.model.transforms import fold_batch_norms
from lmrc.utils.timing import StageTimer
from lmrc.utils.workspace import Workspace
from lmrc.model.memory_reads import global_memory_read, memory_key_sq
from lmrc.model.network import LMRC, MemoryInput



def run_json(capsys, *argv: str) -> dict:
    assert cli_main(["bench", "--threads", "1", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_has_the_keys_and_says_weights_are_random(capsys):
    report = run_json(capsys, "--size", "32", "--frames", "6", "--warmup", "2")
    for key in ("fps", "ms_per_frame", "peak_memory_mb", "stages_ms", "load_average", "process_size"):
        assert key in report
    assert report["fps"] > 0 and report["ms_per_frame"] > 0 and report["peak_memory_mb"] > 0
    assert report["weights"].startswith("random")
    for stage in ("key_encoding", "value_encoding", "global_read", "local_reads", "sequential_local_reads",
                  "comparator", "decoder", "other"):
        assert stage in report["stages_ms"]


def test_table_output(capsys):
    assert cli_main(["bench", "--threads", "1", "--size", "32", "--frames", "4", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "random" in out and "ms per frame" in out and "load average" in out


def test_stages_sum_to_the_frame_time():
    torch.manual_seed(0)
    seg = Segmenter(build_model("lmrc-lite", "F"), size=64)
    run = measure({"F": seg}, synthetic_video(6, (64, 96)), warmup=1)["F"]
    for total, stages in zip(run.totals[1:], run.stages[1:]):
        covered = sum(stages.values())
        assert covered <= total
        assert covered >= 0.6 * total  # the rest: resizing, aggregation, Python glue
    summary = run.summary(1)
    assert sum(summary["stages_ms"].values()) == pytest.approx(summary["ms_per_frame"], rel=0.3)


def test_timing_is_a_no_op_unless_recording():
    timing = StageTimer()
    assert not timing.enabled()
    with timing.stage("decoder"):
        pass
    with timing.record() as times:
        assert timing.enabled()
        with timing.stage("decoder"):
            pass
        with timing.stage("decoder"):
            pass
    assert set(times) == {"decoder"} and times["decoder"] >= 0
    assert not timing.enabled()


def test_stage_listener_sees_each_boundary_only_while_recording():
    timer, calls = StageTimer(), []
    with timer.stage("memory"):
        pass
    with timer.record(listener=lambda name, entering: calls.append((name, entering))):
        with timer.stage("decoder"):
            calls.append("inside")
        with timer.record():  # a nested record without a listener silences it, then restores it
            with timer.stage("memory"):
                pass
        with timer.stage("comparator"):
            pass
    with timer.stage("decoder"):
        pass
    assert calls == [("decoder", True), "inside", ("decoder", False), ("comparator", True), ("comparator", False)]
    assert timer.listener is None


def test_compare_gives_a_ratio(capsys):
    report = run_json(capsys, "--size", "32", "--frames", "6", "--warmup", "2", "--compare", "A", "F")
    assert set(report["runs"]) == {"A", "F"}
    assert report["ratio"] > 0 and report["ratio_of_medians"] > 0
    assert report["runs"]["A"]["stages_ms"].get("local_reads", 0.0) == 0.0
    assert report["runs"]["F"]["stages_ms"]["local_reads"] > 0


def test_memory_stays_flat_with_a_cap(capsys):
    report = run_json(capsys, "--size", "32", "--frames", "100", "--warmup", "2", "--mem-every", "1",
                      "--max-memory-frames", "4", "--checkpoints", "25,50,75,100")
    points = report["checkpoints"]
    assert [p["frame"] for p in points] == [25, 50, 75, 100]
    assert {p["memory_frames"] for p in points} == {4}
    assert len({p["memory_bank_mb"] for p in points}) == 1
    assert points[-1]["rss_mb"] < points[0]["rss_mb"] + 50  # no growth beyond allocator noise


def test_bad_arguments_are_reported(capsys):
    assert cli_main(["bench", "--frames", "3", "--warmup", "5"]) == 2
    assert "--frames" in capsys.readouterr().err


def _randomise_batch_norms(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.uniform_(-0.2, 0.2, generator=g)


# lmrc-lite's first value encoder (image and masks, 3x3 fusion) is what older weights files hold
@pytest.mark.parametrize("name, overrides", [
    ("lmrc-lite", {}), ("lmrc-r50", {}), ("lmrc-lite", dict(value_trunk="image_and_mask", value_fusion_kernel=3))])
def test_prepared_model_gives_the_same_outputs(name, overrides):
    # float64: the comparison sees the optimisations' own error, not fp32 rounding amplified by random weights.
    torch.manual_seed(0)
    model = LMRC(model_config(name, setting="F", **overrides), pretrained_backbone=False).eval()
    _randomise_batch_norms(model)
    model = model.double()  # folded in float64 too
    keys_before = list(model.state_dict())
    fast = prepare_for_inference(model)
    assert list(model.state_dict()) == keys_before  # the original is untouched: saved weights keep their keys
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    image = torch.rand(1, 3, 64, 96, dtype=torch.float64)
    masks = torch.rand(1, 2, 64, 96, dtype=torch.float64)
    with torch.inference_mode():
        outs = []
        for m in (model, fast):
            frame = m.encode_key(image)
            values = m.encode_value(image, frame, masks)
            memory = MemoryInput(frame.keys[4].flatten(2), m.global_memory_value(values[4]).flatten(3), frame.keys,
                                 values)
            outs.append((frame, values, m.read_and_decode(frame, memory)))
    (f0, v0, o0), (f1, v1, o1) = outs
    for r in (2, 3, 4):
        torch.testing.assert_close(f1.keys[r], f0.keys[r], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(f1.features[r], f0.features[r], atol=1e-4, rtol=1e-4)
        # the fast copy's values are the decoder's readout projections of the model's, one group per read
        conv = getattr(model.decoder, f"stage{r}").readout_conv
        groups = conv.weight.shape[1] // v0[r].shape[2]
        projections = conv.weight.reshape(conv.out_channels, groups, -1).transpose(0, 1)
        expected = torch.einsum("goc,bnchw->bngohw", projections, v0[r]).flatten(2, 3)
        torch.testing.assert_close(v1[r], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o1.probs, o0.probs, atol=1e-4, rtol=0)
    torch.testing.assert_close(o1.logits, o0.logits, atol=1e-6, rtol=1e-6)


def test_fold_batch_norms_counts_every_trunk_bn():
    model = LMRC(model_config("lmrc-r50"), pretrained_backbone=False).eval()
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert fold_batch_norms(model) == bns


def test_optimised_segmenter_matches_unoptimised():
    torch.manual_seed(0)
    model = build_model("lmrc-lite", "F")
    _randomise_batch_norms(model)
    plain, fast = Segmenter(model, size=64, optimize=False, precision="fp32"), Segmenter(model, size=64, precision="fp32")
    for rgb, mask in synthetic_video(6, (64, 96)):
        torch.testing.assert_close(fast.step(rgb, mask), plain.step(rgb, mask), atol=1e-4, rtol=0)


def test_global_read_with_kept_key_norms_and_chunks_matches():
    torch.manual_seed(0)
    q, mk, mv = torch.randn(1, 8, 6, 5), torch.randn(1, 8, 90), torch.randn(1, 4, 90)
    ref = global_memory_read(q, mk, mv, 0.3, comparator_top_k=5)
    kept = global_memory_read(q, mk, mv, 0.3, comparator_top_k=5, memory_sq=memory_key_sq(mk), chunk_size=7)
    torch.testing.assert_close(kept.readout, ref.readout)
    torch.testing.assert_close(kept.similarity_top_k, ref.similarity_top_k)


@pytest.mark.parametrize("opt_out", [False, True])
def test_cli_keeps_freed_memory_for_the_next_frame(opt_out):
    """After `reuse_freed_memory`, a loop that allocates and frees two 40 MB tensors per step (as a 480p frame does)
    settles on pages it already has: after a few steps most do not fault (an odd step may, when the kernel or another
    thread moves the heap). glibc's default maps each one afresh and unmaps it on free, so the kernel faults in all
    2 x 10240 pages again every step. LMRC_KEEP_MALLOC=1 opts out."""
    import os
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt tuning is glibc-only")
    env = {k: v for k, v in os.environ.items() if k != "LMRC_KEEP_MALLOC"}
    if opt_out:
        env["LMRC_KEEP_MALLOC"] = "1"
    code = """
import resource, torch
from lmrc.cli import reuse_freed_memory
print(reuse_freed_memory())
faults = []
for step in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(40 << 20, dtype=torch.uint8)
    y = x + 1
    del x, y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    applied, *faults = out.split()
    assert applied == str(not opt_out)
    faulting = [int(f) > 10000 for f in faults[4:]]  # each of the 12 steps after warm-up: did it fault its pages in?
    # kept memory: most steps fault nothing (a few may when the host reclaims pages: more than 2 of 12 did once, on a
    # VM whose kernel runs DAMON pageout, in the full suite); glibc's default: every step
    assert all(faulting) if opt_out else sum(faulting) <= len(faulting) // 2, " ".join(faults)


def test_reused_zero_padding_pads_like_zero_pad_2d_call_after_call():
    pad = ReusedZeroPad2d((0, 1, 2, 1), Workspace(), "pad")
    for layout in (torch.contiguous_format, torch.channels_last, torch.channels_last):
        for shape in ((1, 3, 5, 7), (2, 3, 4, 6)):  # a new shape replaces the kept buffer
            x = torch.randn(shape).contiguous(memory_format=layout)
            out = pad(x)
            assert torch.equal(out, torch.nn.ZeroPad2d((0, 1, 2, 1))(x))
            assert out.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("optimize", [True, False])
def test_multiply_adds_count_every_convolution(optimize, monkeypatch):
    """The counted convolutions (PyTorch's FLOP counter, the native mask conv's own count) equal a count from the
    shapes of every convolution the frames ran through: modules, a packed conv's in-place and ReLU sums, the native
    first conv of the value trunk."""
    import lmrc.model.encoders as encoders

    seg = Segmenter(build_model("lmrc-lite", "F"), size=64, mem_every=3, optimize=optimize)
    frames = list(synthetic_video(4, (64, 96)))
    by_shape = []
    counting = [False]

    def record(output, weight):  # a packed convolution's weight as it runs (one that absorbed padding is larger)
        if counting[0]:
            by_shape.append(output.numel() * weight.shape[1] * weight.shape[2] * weight.shape[3])
        return output

    def count(module, inputs, output):
        record(output, module.weight)

    for name in ("add_into", "sum_relu"):  # sums inside a packed conv, called as methods, not through forward
        method = getattr(PackedConv2d, name)
        monkeypatch.setattr(PackedConv2d, name,
                            lambda self, a, b, method=method: record(method(self, a, b), self.weight))
    stem = encoders.mask_stem_conv
    monkeypatch.setattr(encoders, "mask_stem_conv", lambda masks, weight, *rest: record(stem(masks, weight, *rest), weight))
    seg.step(*frames[0])
    counting[0] = True
    hooks = [m.register_forward_hook(count) for m in seg.model.modules() if isinstance(m, (nn.Conv2d, PackedConv2d))]
    assert hooks
    for frame in frames[1:]:
        seg.step(*frame)
    counting[0] = False
    for hook in hooks:
        hook.remove()
    macs = multiply_adds_per_frame(seg, frames)
    assert macs["convolution"] > 0 and macs["convolution"] == pytest.approx(sum(by_shape) / 3 / 1e9, rel=1e-4)
    assert macs["total"] > macs["convolution"]  # the global read's matrix products
    assert seg.frame_index == 0 and not seg.memory_frames  # counting leaves the segmenter reset


def test_multiply_adds_count_the_global_read_on_amx_tiles(monkeypatch):
    """A bf16 global read whose product and top-k run on AMX tiles counts the multiply-adds of the product it
    replaces: the global read stage's count equals the count with the matrix product."""
    from lmrc.model import memory_reads
    from lmrc.ops.top_k import amx_library

    if amx_library() is None:
        pytest.skip("no AMX tiles on this CPU")
    frames = list(synthetic_video(4, (64, 96)))
    seg = Segmenter(build_model("lmrc-lite", "F"), size=64, mem_every=3, precision="bf16")
    called = []
    fused = memory_reads.matmul_top_k
    monkeypatch.setattr(memory_reads, "matmul_top_k", lambda *a: called.append(1) or fused(*a))
    on_tiles = multiply_adds_per_frame(seg, frames)["stages"]["global_read"]
    assert called
    monkeypatch.setattr(memory_reads, "matmul_top_k", lambda *a: None)
    product = multiply_adds_per_frame(seg, frames)["stages"]["global_read"]
    assert on_tiles > 0 and on_tiles == pytest.approx(product, rel=1e-6)


def test_macs_option_reports_the_arithmetic_ratio(capsys):
    report = run_json(capsys, "--size", "32", "--frames", "4", "--warmup", "1", "--compare", "A", "F", "--macs",
                      "--mem-every", "2")
    a, f = (report["runs"][s]["gmac_per_frame"]["total"] for s in "AF")
    assert f > a > 0  # F adds the per-frame value encoding at three scales and the decoder's readout inputs
    assert report["arithmetic_ratio"] == pytest.approx(f / a, abs=1e-3)
    assert report["gmac_per_second"] > 0 and report["cpu"]["capability"]


def test_bench_warns_about_emulated_half_precision(capsys, monkeypatch):
    import lmrc.utils.device

    monkeypatch.setattr(lmrc.utils.device, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert cli_main(["bench", "--threads", "1", "--size", "32", "--frames", "2", "--warmup", "1",
                     "--precision", "bf16", "--json"]) == 0
    assert "no native 16-bit float math" in capsys.readouterr().err
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert cli_main(["bench", "--threads", "1", "--size", "32", "--frames", "2", "--warmup", "1",
                     "--precision", "bf16", "--json"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_values_are_projected_only_where_the_decoder_is_narrower():
    """Stages whose decoder width is not below C^v_r keep their values; the others read projected groups; the
    segmenter gives the unoptimised model's probabilities either way (mixed stages, objects added mid-video)."""
    torch.manual_seed(0)
    model = LMRC(model_config("lmrc-lite", setting="F", decoder_dims=(32, 128, 128)), pretrained_backbone=False).eval()
    fast = prepare_for_inference(model)
    assert fast.projected_stages == {2, 4} and [fast.read_value_channels(r) for r in (2, 3, 4)] == [32, 128, 128]
    plain, seg = Segmenter(model, size=64, optimize=False, precision="fp32"), Segmenter(model, size=64, precision="fp32")
    seg.model = fast
    for index, (rgb, mask) in enumerate(synthetic_video(6, (64, 96), objects=3)):
        if index == 2:  # a third object joins: a second object group with its own memory
            mask = (np.arange(96)[None, :] < 20).repeat(64, 0).astype(np.uint8) * 3
        elif mask is not None:
            mask = np.where(mask == 3, 0, mask)
        torch.testing.assert_close(seg.step(rgb, mask), plain.step(rgb, mask), atol=1e-4, rtol=0)
    assert seg.memory.values.shape[-1] == 128  # the global memory keeps the global read's group only


class _CountableSegmenter:
    """Stands in for a Segmenter: each step runs ops whose multiply-adds are counted by hand, in known stages."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.image = torch.randn(1, 3, 8, 10, generator=g)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.q, self.k, self.v = (torch.randn(1, c, 6, 7, generator=g) for c in (5, 5, 6))
        self.steps = 0
        self.timer = StageTimer()

    def reset(self):
        self.steps = 0

    def step(self, rgb, mask):
        from lmrc.ops import local_window as lw

        self.steps += 1
        with torch.no_grad():
            with self.timer.stage("key_encoding"):
                self.conv(self.image)  # 8*10 pixels x 4 outputs x 3 inputs x 9 taps = 8640
            with self.timer.stage("local_reads"):
                # native or plain: 6*7 pixels x 9 window positions x (5 key + 6 value channels) = 4158
                lw.local_attention_inference(self.q, self.k, self.v, 1, 1, 1.0, top_k=2)
            torch.ones(3, 4) @ torch.ones(4, 5)  # outside every stage: 3*4*5 = 60
            if self.steps % 2 == 0:
                with self.timer.stage("local_reads"):  # every other frame: 6*7 x 9 x 6 = 2268
                    lw.local_weighted_sum(torch.ones(1, 9, 6, 7), self.v, 1)


def test_multiply_adds_are_attributed_to_the_stage_they_ran_in():
    frames = [(None, None)] * 5  # the first is not counted; the 4 others: 2 with the extra weighted sum
    macs = multiply_adds_per_frame(_CountableSegmenter(), frames)
    assert macs["stages"]["key_encoding"] == pytest.approx(8640 / 1e9)
    assert macs["stages"]["local_reads"] == pytest.approx((4158 + 2268 / 2) / 1e9)
    assert macs["stages"]["other"] == pytest.approx(60 / 1e9)
    assert macs["convolution"] == pytest.approx(8640 / 1e9)
    assert macs["local_window"] == pytest.approx((4158 + 2268 / 2) / 1e9)
    assert macs["total"] == pytest.approx((8640 + 4158 + 1134 + 60) / 1e9)


def test_stage_rates_divide_multiply_adds_by_time_and_peak():
    rates = stage_rates({"decoder": 2.0, "memory": 0.0, "other": 0.5}, {"decoder": 40.0, "memory": 3.0, "other": 0.0},
                        peak=100.0)
    assert rates == {"decoder": {"gmac_per_second": 50.0, "fraction_of_peak": 0.5}}  # 2 GMAC in 40 ms


def test_macs_option_reports_rates_per_stage(capsys):
    report = run_json(capsys, "--size", "32", "--frames", "3", "--warmup", "1", "--setting", "F", "--macs",
                      "--mem-every", "2", "--threads", "1")
    macs = report["gmac_per_frame"]
    assert sum(macs["stages"].values()) == pytest.approx(macs["total"], rel=1e-6)
    assert macs["local_window"] > 0 and macs["stages"]["local_reads"] > 0 and macs["stages"]["decoder"] > 0
    rates = report["stage_rates"]
    for name in ("key_encoding", "decoder", "local_reads"):
        expected = macs["stages"][name] / (report["stages_ms_mean"][name] / 1000)
        assert rates[name]["gmac_per_second"] == pytest.approx(expected, rel=1e-2, abs=1e-2)
    assert report["peak"]["fp32_gmac_per_second"] > 0 and report["peak"]["derivation"]
