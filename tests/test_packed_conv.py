"""Convolutions packed for oneDNN (lmrc/inference/packed_conv.py): the same function as the modules they replace."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmrc.config import model_config
from lmrc.inference.fast_path import prepare_for_inference
from lmrc.inference.packed_conv import (PackedConv2d, PackedDecoderStage, PackedResidualBlock, PointwiseFusionNCHW,
                                        _absorb_padding, pack_convolutions, packed_convolutions_available)
from lmrc.model.decoder import DecoderStage, ResidualBlock
from lmrc.model.encoders import contiguous_nchw
from lmrc.model.network import LMRC
from lmrc.model.transforms import ReadoutGroupSum

needs_onednn = pytest.mark.skipif(not packed_convolutions_available(torch.device("cpu")),
                                  reason="this PyTorch build has no oneDNN")
CL = torch.channels_last


def _reference(conv: nn.Conv2d, x: torch.Tensor, activation: str, residual=None) -> torch.Tensor:
    y = conv(x) if residual is None else conv(x) + residual
    return {"none": y, "relu": F.relu(y), "relu6": F.relu6(y)}[activation]


@pytest.mark.parametrize("left,right,top,bottom,k",
                         [(0, 1, 0, 1, 3), (1, 2, 1, 2, 5), (0, 0, 1, 2, 3), (2, 2, 0, 0, 3)])
@pytest.mark.parametrize("stride", [1, 2])
def test_absorbed_padding_is_the_padded_convolution(left, right, top, bottom, k, stride):
    """Symmetric padding and zero rows/columns prepended to the kernel compute conv(pad(x)) exactly (float64)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, k, k, generator=g, dtype=torch.float64)
    for h, w in ((17, 24), (16, 25)):  # odd and even sizes
        x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
        wanted = F.conv2d(F.pad(x, (left, right, top, bottom)), weight, stride=stride)
        shifted, padding = _absorb_padding(weight, left, right, top, bottom)
        torch.testing.assert_close(F.conv2d(x, shifted, stride=stride, padding=padding), wanted, rtol=0, atol=1e-12)


@needs_onednn
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
@pytest.mark.parametrize("cin,cout,k,stride,groups,bias", [
    (16, 96, 1, 1, 1, True), (24, 64, 3, 1, 1, True), (96, 96, 3, 2, 96, True), (32, 32, 5, 1, 32, False),
    (3, 32, 3, 2, 1, True),
])
def test_packed_conv_is_the_convolution_and_its_activation(cin, cout, k, stride, groups, bias, activation):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias).eval()
    packed = PackedConv2d(conv, torch.float32, activation)
    with torch.no_grad():
        for shape in ((1, cin, 40, 56), (3, cin, 23, 31)):  # a second size gets its own packed weight
            for layout in (CL, torch.contiguous_format):
                x = torch.randn(shape).contiguous(memory_format=layout) * 4  # beyond ReLU6's clip
                torch.testing.assert_close(packed(x), _reference(conv, x, activation), rtol=1e-5, atol=1e-5)
        assert len(packed._packed) == 2
        if stride == 1 and cin == cout:  # the residual sum, added before the activation
            residual = torch.randn(2, cout, 20, 24).contiguous(memory_format=CL)
            x = torch.randn(2, cin, 20, 24).contiguous(memory_format=CL)
            torch.testing.assert_close(packed(x, residual), _reference(conv, x, activation, residual),
                                       rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packed_conv_in_bf16_is_autocasts_convolution():
    """bf16: the same products as autocast's convolution (weights and inputs rounded to bf16, fp32 accumulation)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 144, 1).eval()
    x = torch.randn(1, 24, 30, 54).contiguous(memory_format=CL)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        wanted = F.relu6(conv(x))
    got = PackedConv2d(conv, torch.bfloat16, "relu6")(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), wanted.float(), rtol=1e-2, atol=1e-2)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_into_sums_inside_the_convolution(dtype):
    """out += conv(x) in place (the value encoder's stage-2/3 fusion: each object's term onto the frame term)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 64, 1).eval()
    x = torch.randn(2, 16, 12, 20).contiguous(memory_format=CL)
    out = torch.randn(2, 64, 12, 20).to(dtype).contiguous(memory_format=CL)
    with torch.no_grad():  # in bf16: the products of bf16-rounded inputs and weights, summed in float
        rounded = [t.to(dtype).float() for t in (x, conv.weight, conv.bias)]
        wanted = out.float() + F.conv2d(*rounded)
    got = PackedConv2d(conv, dtype).add_into(out, x)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), wanted, rtol=tolerance, atol=tolerance)
    with pytest.raises(ValueError, match="activation"):
        PackedConv2d(conv, dtype, "relu").add_into(out, x)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_block_gives_the_relu_of_its_output(dtype):
    """`activated_output`: relu(x + conv2(relu(conv1(relu(x))))) in the convs' dtype, the sum and the ReLU inside
    conv2 (the decoder's last stage, read only through its ReLU)."""
    torch.manual_seed(2)
    block = ResidualBlock(16).eval()
    x = torch.randn(2, 16, 10, 14).contiguous(memory_format=CL)
    packed = PackedResidualBlock(block, dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        wanted = F.relu(block(x)).float()
        got = packed.activated_output(x)
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2  # bf16: x rounded before the sum, the result rounded
    torch.testing.assert_close(got.float(), wanted, rtol=tolerance, atol=tolerance)
    assert (got == 0).any() and (got > 0).any()
    with pytest.raises(ValueError, match="activation"):
        PackedConv2d(block.conv1, dtype, "relu").sum_relu(x, x)


@needs_onednn
def test_padding_module_is_absorbed_or_kept():
    """EfficientNet's TF-style stride-2 padding goes into the kernel; padding the trick cannot express stays."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, stride=2, groups=8).eval()
    conv.static_padding = nn.ZeroPad2d((0, 1, 0, 1))
    packed = PackedConv2d(conv, torch.float32)
    assert isinstance(packed.pad, nn.Identity) and packed.weight.shape[-2:] == (4, 4)  # a zero row and column first
    conv.static_padding = nn.ZeroPad2d((1, 0, 1, 0))  # more on the left than on the right
    kept = PackedConv2d(conv, torch.float32)
    assert kept.pad is conv.static_padding
    x = torch.randn(1, 8, 32, 48).contiguous(memory_format=CL)
    with torch.no_grad():
        for module, pad in ((packed, (0, 1, 0, 1)), (kept, (1, 0, 1, 0))):
            torch.testing.assert_close(module(x), conv(F.pad(x, pad)), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("readouts", ["groups", "conv", "none"])
@pytest.mark.parametrize("coarser", [True, False])
def test_packed_decoder_stage_is_the_stage(readouts, coarser):
    torch.manual_seed(0)
    stage = DecoderStage(24, 64 if readouts != "none" else 0, 16 if coarser else 0, 32).eval()
    if readouts == "groups":
        stage.readout_conv = ReadoutGroupSum(2)  # two readouts projected to 32 channels each
    b, n, h, w = 1, 3, 20, 28
    frame = torch.randn(b, 24, h, w).contiguous(memory_format=CL)
    reads = torch.randn(b * n, 64, h, w) if readouts != "none" else None
    coarse = torch.randn(b * n, 16, h // 2, w // 2).contiguous(memory_format=CL) if coarser else None
    with torch.no_grad():
        wanted = stage(frame, reads, coarse, n)
        got = PackedDecoderStage(stage, torch.float32)(frame, reads, coarse, n)
    assert got.shape == wanted.shape
    torch.testing.assert_close(got, wanted, rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("setting,value_trunk", [("A", "mask"), ("F", "mask"), ("F", "image_and_mask")])
def test_packed_network_is_the_folded_network(setting, value_trunk):
    """Every convolution of lmrc-lite's encoders and decoder packed: the inference copy gives the same keys, values
    and logits as the copy without packing (fp32); the image-and-mask value trunk's input built channels-last, the
    mask-only trunk's first conv computed from the masks (`lmrc.ops.mask_conv`), the stage-2/3 fusion summed inside
    the convolution (`PackedConv2d.add_into`)."""
    torch.manual_seed(0)
    config = model_config("lmrc-lite", setting=setting, value_trunk=value_trunk)
    model = LMRC(config, pretrained_backbone=False).eval()
    plain = prepare_for_inference(model, pack=False)
    packed = prepare_for_inference(model, pack=True, dtype=torch.float32)
    for part in ("key_encoder", "value_encoder", "decoder"):
        assert not [m for m in getattr(packed, part).modules() if isinstance(m, nn.Conv2d)], part
    trunk = packed.value_encoder.trunk
    assert plain.value_encoder.trunk.input_dtype is None and plain.value_encoder.trunk.stem_from_masks_dtype is None
    assert (trunk.input_dtype, trunk.stem_from_masks_dtype) == ((torch.float32, None) if trunk.reads_image
                                                                else (None, torch.float32))
    image = torch.rand(1, 3, 96, 160)
    masks = torch.rand(1, 2, 96, 160)
    with torch.no_grad():
        frames = [m.encode_key(image) for m in (plain, packed)]
        # the copy makes only the keys its reads take (A: the global read's), the model every stage's (eq. 12)
        assert set(frames[1].keys) == ({4} if setting == "A" else {2, 3, 4})
        assert set(model.encode_key(image).keys) == {2, 3, 4}
        torch.testing.assert_close(frames[1].keys[4], model.encode_key(image).keys[4], rtol=1e-4, atol=1e-4)
        for r in frames[0].keys:
            torch.testing.assert_close(frames[1].keys[r], frames[0].keys[r], rtol=1e-4, atol=1e-4)
            assert frames[1].keys[r].is_contiguous()  # NCHW for the memory reads
        if setting == "F":
            values = [m.encode_value(image, f, masks) for m, f in zip((plain, packed), frames)]
            for r in values[0]:
                torch.testing.assert_close(values[1][r], values[0][r], rtol=1e-4, atol=1e-4)
            # the 1x1 fusion as products into NCHW (float32 copies) against the model's own convolutions
            assert packed.value_encoder.fuse_to_nchw is not None  # lmrc-lite fuses with 1x1 convolutions
            copy = prepare_for_inference(model, project_values=False)
            got = copy.encode_value(image, copy.encode_key(image), masks)
            for r, wanted in model.encode_value(image, model.encode_key(image), masks).items():
                torch.testing.assert_close(got[r], wanted, rtol=1e-4, atol=1e-4)
    assert pack_convolutions(nn.Sequential(nn.Linear(2, 2)), torch.float32) == 0  # nothing it does not know


@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_fusion_writes_the_nchw_value(bias):
    """conv_e(e) + conv_f(f) per object (ValueEncoder's 1x1 fusion), as products writing a contiguous NCHW value."""
    torch.manual_seed(3)
    conv_e, conv_f = nn.Conv2d(5, 8, 1, bias=bias), nn.Conv2d(7, 8, 1, bias=False)
    e = torch.randn(6, 5, 6, 9).contiguous(memory_format=torch.channels_last)  # B = 2 images x N = 3 objects
    f = torch.randn(2, 7, 6, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        wanted = conv_e(e).view(2, 3, 8, 6, 9) + conv_f(f).unsqueeze(1)
        got = PointwiseFusionNCHW(conv_e, conv_f)(e, f, 2, 3)
    assert got.is_contiguous() and got.dtype == torch.float32
    torch.testing.assert_close(got, wanted, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # float32 inside a caller's autocast too
        torch.testing.assert_close(PointwiseFusionNCHW(conv_e, conv_f)(e, f, 2, 3), got, rtol=0, atol=0)
    with pytest.raises(ValueError, match="1x1"):
        PointwiseFusionNCHW(nn.Conv2d(5, 8, 3), conv_f)


def test_float32_copies_only_fuse_by_products():
    model = LMRC(model_config("lmrc-lite", setting="F"), pretrained_backbone=False).eval()
    assert prepare_for_inference(model, dtype=torch.float32).value_encoder.fuse_to_nchw is not None
    assert prepare_for_inference(model, dtype=torch.bfloat16).value_encoder.fuse_to_nchw is None
    assert prepare_for_inference(model, dtype=torch.bfloat16, value_products=True).value_encoder.fuse_to_nchw is not None
    assert prepare_for_inference(model, value_products=False).value_encoder.fuse_to_nchw is None
    assert model.value_encoder.fuse_to_nchw is None and "fuse_to_nchw" not in "".join(model.state_dict())
    fused3x3 = LMRC(model_config("lmrc-lite", setting="F", value_fusion_kernel=3), pretrained_backbone=False).eval()
    assert prepare_for_inference(fused3x3, dtype=torch.float32).value_encoder.fuse_to_nchw is None


def test_contiguous_nchw_is_contiguous():
    for shape in ((2, 64, 120, 216), (1, 8, 5, 7)):  # the tiled path and the small one
        x = torch.randn(shape)
        for t in (x, x.contiguous(memory_format=CL), x.bfloat16().contiguous(memory_format=CL)):
            out = contiguous_nchw(t)
            assert out.is_contiguous() and torch.equal(out, t.contiguous())


@needs_onednn
@pytest.mark.parametrize("precision,backend", [(torch.float32, "auto"), (torch.bfloat16, "auto"),
                                               (torch.float32, "plain")])
def test_readouts_are_added_into_the_decoders_channels_last_sums(precision, backend, monkeypatch):
    """The CPU copy keeps the local reads' values channels-last and adds each readout into its decoder stage's
    channels-last sum: the same logits as NCHW values and readouts transposed on the way (and, in fp32, as the
    network as trained); the stage-2/3 values and readouts take no layout pass. Without native kernels (plain)
    the comparator weighs each readout before it enters the sum."""
    import lmrc.inference.fast_path as fast_path
    from lmrc.model.network import MemoryInput

    monkeypatch.setenv("LMRC_LOCAL_WINDOW", backend)
    torch.manual_seed(0)
    model = LMRC(model_config("lmrc-lite", setting="F"), pretrained_backbone=False).eval()
    into = prepare_for_inference(model, dtype=precision)
    apart = prepare_for_inference(model, dtype=precision, readouts_into_decoder=False)
    assert into.value_encoder.channels_last_stages == (2, 3) and apart.value_encoder.channels_last_stages == ()
    g = torch.Generator().manual_seed(2)
    image, masks = torch.rand(1, 3, 96, 160, generator=g), torch.rand(1, 2, 96, 160, generator=g)
    added = []
    original = fast_path.add_nchw_groups_to_nhwc
    monkeypatch.setattr(fast_path, "add_nchw_groups_to_nhwc",
                        lambda out, groups, act=None: (added.append(out.shape[-2:]), original(out, groups, act)))
    results = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == torch.bfloat16):
        for copy in (into, apart, model):
            frame = copy.encode_key(image)
            values = copy.encode_value(image, frame, masks)
            memory = MemoryInput(frame.keys[4].flatten(2), copy.global_memory_value(values[4]).flatten(3),
                                 frame.keys, values)
            results.append((values, copy.read_and_decode(frame, memory).logits.float()))
    (values_into, into_logits), (values_apart, apart_logits), (_, trained_logits) = results
    for r in (2, 3):
        assert values_into[r].stride(2) == 1 and values_apart[r].is_contiguous()
    if backend == "auto":  # stage 4 only (G4 and L4, NCHW): stage 3 and 2 readouts went in directly
        assert added == [(6, 10), (6, 10)]
    tolerance = 1e-4 if precision == torch.float32 else 5e-2
    torch.testing.assert_close(into_logits, apart_logits, rtol=tolerance, atol=tolerance)
    if precision == torch.float32:
        torch.testing.assert_close(into_logits, trained_logits, rtol=1e-4, atol=1e-4)
