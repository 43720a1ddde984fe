"""InferenceConfig: one set of options for every command, the precision chosen for the hardware (and why), and
test-time flip."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmrc.config import model_config
from lmrc.inference.config import InferenceConfig, add_inference_arguments, inference_config_from_args
from lmrc.inference.segmenter import Segmenter
from lmrc.model.aggregate import soft_aggregate
from lmrc.model.network import FrameEncoding, SegmentOutput
from lmrc.utils.device import choose_precision, half_precision_warning
from lmrc.utils.errors import LmrcError

# --- precision: auto = bf16 where the hardware computes it natively -----------------------------------------------

ZEN4 = {"fpu", "sse2", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16"}  # AVX-512 with native bf16
SAPPHIRE_RAPIDS = {"avx2", "avx512f", "amx_tile", "amx_bf16", "amx_int8"}
SKYLAKE_X = {"avx2", "fma", "avx512f", "avx512bw"}  # AVX-512 without bf16
HASWELL = {"avx2", "fma"}


@pytest.mark.parametrize("flags,capability,expected,why", [
    (ZEN4, "AVX512", "bf16", "AVX512_BF16"),
    (SAPPHIRE_RAPIDS, "AVX512", "bf16", "AMX_BF16"),
    (SKYLAKE_X, "AVX512", "fp32", "no native bf16"),
    (HASWELL, "AVX2", "fp32", "no native bf16"),
    (ZEN4, "AVX2", "fp32", "AVX2 kernels"),  # PyTorch dispatching to its AVX2 kernels never uses the bf16 units
    (set(), "DEFAULT", "fp32", "no native bf16"),
])
def test_auto_precision_follows_the_cpu_flags(flags, capability, expected, why):
    choice = choose_precision("auto", "cpu", flags=flags, capability=capability)
    assert choice.name == expected and why in choice.reason and choice.reason.startswith("auto")
    assert choice.autocast_dtype == {"bf16": torch.bfloat16, "fp32": None}[expected]
    assert (half_precision_warning("bf16", flags, capability) is None) == (expected == "bf16")


def test_explicit_precision_is_kept_and_bad_ones_refused():
    for name in ("fp32", "bf16", "fp16"):
        assert choose_precision(name, "cpu", flags=HASWELL, capability="AVX2").name == name
    with pytest.raises(LmrcError, match="precision"):
        choose_precision("int8", "cpu")
    assert half_precision_warning("fp32", HASWELL, "AVX2") is None
    assert "no native 16-bit" in half_precision_warning("fp16", ZEN4, "AVX512")  # bf16 units do not do fp16


def test_segmenter_reports_the_precision_it_chose(monkeypatch):
    import lmrc.utils.device

    model = _stub()
    monkeypatch.setattr(lmrc.utils.device, "cpu_flags", lambda: set(ZEN4))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    seg = Segmenter(model, size=None, optimize=False, device="cpu")
    assert (seg.precision, seg.precision_reason) == ("bf16", "auto: the CPU has native bf16 (AVX512_BF16)")
    monkeypatch.setattr(lmrc.utils.device, "cpu_flags", lambda: set(HASWELL))
    assert Segmenter(model, size=None, optimize=False, device="cpu").precision == "fp32"


# --- the options, declared once -----------------------------------------------------------------------------------

def test_every_command_declares_the_same_inference_options():
    from lmrc.cli import build_parser

    def options(command: str) -> dict[str, argparse.Action]:
        sub = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
        return {o: a for a in sub.choices[command]._actions for o in a.option_strings}

    reference = argparse.ArgumentParser()
    add_inference_arguments(reference)
    shared = {o: a for a in reference._actions for o in a.option_strings if o not in ("-h", "--help")}
    for command in ("segment", "eval", "bench"):
        declared = options(command)
        for option, action in shared.items():
            assert option in declared, (command, option)
            assert (declared[option].default, declared[option].help) == (action.default, action.help), (command, option)
    assert shared["--precision"].default == "auto"


def test_config_from_arguments_and_its_checks():
    parser = argparse.ArgumentParser()
    add_inference_arguments(parser)
    config = inference_config_from_args(parser.parse_args(["--size", "0", "--top-k", "0", "--flip", "--mem-every", "3"]))
    assert config == InferenceConfig(mem_every=3, size=None, top_k=None, flip=True)
    assert inference_config_from_args(parser.parse_args([])) == InferenceConfig()
    for argv, flag in ((["--mem-every", "0"], "--mem-every"), (["--max-memory-frames", "1"], "--max-memory-frames"),
                       (["--size", "8"], "--size"), (["--top-k", "-2"], "--top-k")):
        with pytest.raises(LmrcError, match=flag):
            inference_config_from_args(parser.parse_args(argv))


# --- test-time flip -----------------------------------------------------------------------------------------------

class PixelStub(nn.Module):
    """A stand-in with LMRC's interface: each object's logit is a per-pixel function of the image (so mirroring the
    frame mirrors the output exactly) plus what the global memory holds of that object; `asymmetric` adds the
    pixel's right-hand neighbour, which mirroring turns into the left-hand one."""

    def __init__(self, asymmetric: bool = False) -> None:
        super().__init__()
        self.config = model_config("lmrc-lite", setting="A")  # no local reads: the value is encoded for memory frames
        self.colour = nn.Parameter(torch.tensor([3.0, -2.0, 1.0]))
        self.asymmetric = asymmetric

    def encode_key(self, image):
        key = F.avg_pool2d(image, 16)
        return FrameEncoding({r: key for r in (2, 3, 4)}, {0: image})

    def encode_value(self, image, frame, masks, stages=(2, 3, 4)):
        return {4: F.avg_pool2d(masks, 16).unsqueeze(2)}  # B x N x 1 x H4 x W4

    def global_memory_value(self, value):
        return value

    def read_and_decode(self, query, memory, read_top_k=None):
        image = query.features[0]
        base = (image * self.colour.view(1, 3, 1, 1)).sum(1, keepdim=True) - 0.5
        if self.asymmetric:
            base = base + 4 * F.pad(base[..., 1:], (0, 1))
        n = memory.global_values.shape[1]
        remembered = memory.global_values.float().mean((2, 3))[:, :, None, None]  # B x N x 1 x 1
        logits = base * torch.arange(1, n + 1, dtype=base.dtype).view(1, n, 1, 1) + 4 * remembered
        agg, probs = soft_aggregate(logits, memory.valid_objects)
        return SegmentOutput(logits, agg, probs, {})


def _stub(asymmetric: bool = False) -> PixelStub:
    return PixelStub(asymmetric)


def _video(frames: int = 4, h: int = 32, w: int = 48):
    g = torch.Generator().manual_seed(3)
    video = [torch.rand(3, h, w, generator=g) for _ in range(frames)]
    mask = torch.zeros(h, w, dtype=torch.uint8)
    mask[4:20, 6:30], mask[22:30, 30:44] = 1, 2
    return video, mask


def _run(model, flip: bool):
    seg = Segmenter(model, size=None, optimize=False, precision="fp32", device="cpu", mem_every=1, flip=flip)
    video, mask = _video()
    return seg, [seg.step(f, mask if i == 0 else None) for i, f in enumerate(video)]


def test_flip_changes_nothing_for_a_mirror_equivariant_model():
    plain_seg, plain = _run(_stub(), flip=False)
    flip_seg, flipped = _run(_stub(), flip=True)
    assert len(flip_seg.memories) == 2 and len(plain_seg.memories) == 1
    for a, b in zip(plain, flipped):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    # the mirrored memory holds the mirrored values of the same frames
    frames = [memory.values[0, :4].reshape(4, 2, 3, 2) for memory in flip_seg.memories]  # T x H4 x W4 x N (Cv4 = 1)
    torch.testing.assert_close(frames[1].flip(2), frames[0], atol=1e-6, rtol=0)
    assert frames[0].abs().sum() > 0


def test_flip_averages_the_mirrored_pass_computed_by_hand():
    """An asymmetric model: frame 1's prediction is the mean of the model on the frame and, flipped back, on its
    mirror image, each reading its own memory (frame 0's mask, mirrored for the mirrored memory)."""
    model = _stub(asymmetric=True)
    seg, flipped = _run(model, flip=True)
    _, plain = _run(model, flip=False)
    video, mask = _video()
    onehot = torch.stack([mask == 1, mask == 2]).float()[None]  # 1 x 2 x H x W, frame 0's given masks

    with torch.no_grad():
        frame = video[1][None]
        own = _read(model, frame, video[0][None], onehot)
        mirrored = _read(model, frame.flip(-1), video[0][None].flip(-1), onehot.flip(-1)).flip(-1)
    expected = (own + mirrored)[0] / 2
    torch.testing.assert_close(flipped[1], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(own[0], mirrored[0], atol=1e-3)  # the two passes differ: the mirrored one ran
    assert not torch.allclose(flipped[1], plain[1], atol=1e-3)


def _read(model: PixelStub, frame, memory_frame, memory_masks):
    from lmrc.model.network import MemoryInput

    key = model.encode_key(memory_frame)
    value = model.encode_value(memory_frame, key, memory_masks)[4]
    memory = MemoryInput(key.keys[4].flatten(2), value.flatten(3), {}, {})
    return model.read_and_decode(model.encode_key(frame), memory).probs
