"""The value trunk's first conv from the objects' masks (lmrc/ops/mask_conv.c) against the convolution written out."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmrc.config import model_config
from lmrc.model.encoders import MaskValueTrunk
from lmrc.ops import _native
from lmrc.ops.mask_conv import mask_stem_conv, mask_stem_conv_plain, mask_stem_input

CL = torch.channels_last


def written_out(masks: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """relu(bias + sum over the 3 x 3 taps of W[:, 0] m_o + W[:, 1] (sum of the other objects' masks)), stride 2,
    zero padding 1, per object, in float64: B*N x C x ceil(H/2) x ceil(W/2)."""
    b, n, h, w = masks.shape
    m = masks.double()
    others = torch.stack([m[:, [j for j in range(n) if j != o]].sum(1) for o in range(n)], 1)
    m, others = F.pad(m, (1, 1, 1, 1)), F.pad(others, (1, 1, 1, 1))
    ho, wo = (h + 1) // 2, (w + 1) // 2
    out = bias.double().view(1, 1, -1, 1, 1).expand(b, n, -1, ho, wo).clone()
    for ky in range(3):
        for kx in range(3):
            tap = (slice(None), slice(None), slice(ky, ky + 2 * ho, 2), slice(kx, kx + 2 * wo, 2))
            for channel, source in enumerate((m, others)):
                out += weight[:, channel, ky, kx].double().view(1, 1, -1, 1, 1) * source[tap].unsqueeze(2)
    return out.relu().flatten(0, 1)


def test_the_input_is_each_mask_and_the_other_objects():
    masks = torch.tensor([[0.5, 0.25], [0.0, 0.25], [0.5, 1.0]]).view(1, 3, 1, 2)  # 3 objects, 2 pixels
    x = mask_stem_input(masks)
    assert x.shape == (3, 2, 1, 2)
    torch.testing.assert_close(x[:, 0], masks[0])
    torch.testing.assert_close(x[:, 1, 0], torch.tensor([[0.5, 1.25], [1.0, 1.25], [0.5, 0.5]]))


@pytest.mark.parametrize("isa", _native.supported_isas())
@pytest.mark.parametrize("shape", [(1, 2, 480 // 8, 864 // 8), (2, 3, 17, 33), (1, 1, 2, 3), (1, 4, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_conv_is_the_convolution_written_out(native_kernels, monkeypatch, isa, shape, dtype):
    """Every ISA variant, odd and even sides (the bottom and right borders), sides smaller than a pixel block, one to
    four objects; the output channels-last in float32, or bf16 rounded once."""
    monkeypatch.setenv("LMRC_LOCAL_WINDOW_ISA", isa)
    g = torch.Generator().manual_seed(sum(shape))
    masks = torch.rand(shape, generator=g)
    weight, bias = torch.randn(16, 2, 3, 3, generator=g), torch.randn(16, generator=g)
    got = mask_stem_conv(masks, weight, bias, dtype)
    wanted = written_out(masks, weight, bias)
    assert got.shape == wanted.shape and got.dtype == dtype and got.is_contiguous(memory_format=CL)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), wanted, rtol=1e-5, atol=1e-5)
    else:  # within bf16's rounding of the float result
        torch.testing.assert_close(got.double(), wanted, rtol=2 ** -8, atol=1e-5)
    assert (got == 0).any() and (got > 0).any()  # the ReLU has cut some, not all


def test_fallbacks_compute_the_same_conv(native_kernels, monkeypatch):
    """Channel counts the kernel does not take (not a multiple of the vector), autograd, and LMRC_LOCAL_WINDOW=plain
    run PyTorch's convolution: the same values, and gradients where asked for."""
    g = torch.Generator().manual_seed(5)
    masks = torch.rand(1, 2, 10, 14, generator=g)
    weight, bias = torch.randn(12, 2, 3, 3, generator=g), torch.randn(12, generator=g)
    torch.testing.assert_close(mask_stem_conv(masks, weight, bias).double(), written_out(masks, weight, bias),
                               rtol=1e-5, atol=1e-5)
    weight16, bias16 = torch.randn(16, 2, 3, 3, generator=g), torch.randn(16, generator=g)
    native_out = mask_stem_conv(masks, weight16, bias16)
    monkeypatch.setenv("LMRC_LOCAL_WINDOW", "plain")
    torch.testing.assert_close(mask_stem_conv(masks, weight16, bias16), native_out, rtol=1e-5, atol=1e-5)
    monkeypatch.delenv("LMRC_LOCAL_WINDOW")
    leaf = weight16.clone().requires_grad_()
    mask_stem_conv(masks, leaf, bias16).sum().backward()
    reference = weight16.clone().requires_grad_()
    mask_stem_conv_plain(masks, reference, bias16, torch.float32).sum().backward()
    torch.testing.assert_close(leaf.grad, reference.grad)


def test_trunk_from_masks_is_the_trunk(native_kernels):
    """`MaskValueTrunk.encode_masks` (the inference copy's) gives forward(None, mask, other objects)."""
    torch.manual_seed(0)
    assert model_config("lmrc-lite").value_trunk == "mask"
    trunk = MaskValueTrunk().eval()
    masks = torch.rand(1, 3, 64, 96)
    others = masks.sum(1, keepdim=True) - masks
    with torch.no_grad():
        wanted = trunk(None, masks.view(3, 1, 64, 96), others.view(3, 1, 64, 96))
        trunk.stem_from_masks_dtype = torch.float32
        got = trunk.encode_masks(masks)
    for r in wanted:
        torch.testing.assert_close(got[r], wanted[r], rtol=1e-4, atol=1e-5)
