"""The decoder's x4 upsampling and the objects' soft aggregation in one native pass (lmrc/ops/aggregate.c) against
F.interpolate and `soft_aggregate` (the training path's softmax of clamped log-odds)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmrc.model.aggregate import soft_aggregate, upsample_soft_aggregate
from lmrc.ops import _native
from lmrc.ops.aggregate import upsample4_soft_aggregate_native


def reference(low, valid=None):
    logits = F.interpolate(low.double(), scale_factor=4, mode="bilinear", align_corners=False)
    return logits, soft_aggregate(logits, valid)[1].double()


@pytest.mark.parametrize("isa", _native.supported_isas())
@pytest.mark.parametrize("shape", [(1, 2, 30, 54), (2, 3, 5, 7), (1, 1, 1, 1), (1, 4, 3, 1)])
@pytest.mark.parametrize("padding_object", [False, True])
def test_native_pass_is_interpolate_and_soft_aggregate(native_kernels, monkeypatch, isa, shape,
                                                       padding_object):
    """Every ISA variant; borders (the clamped sample positions), one-pixel sides, a row narrower than a vector,
    1-4 objects, an invalid (padding) object of a batch, logits far into both tails of the sigmoid."""
    monkeypatch.setenv("LMRC_LOCAL_WINDOW_ISA", isa)
    g = torch.Generator().manual_seed(sum(shape))
    low = torch.randn(shape, generator=g) * 6
    valid = torch.ones(shape[:2])
    if padding_object:
        valid[-1, -1] = 0
    got = upsample4_soft_aggregate_native(low, valid if padding_object else None)
    assert got is not None
    logits, probs = got
    wanted_logits, wanted_probs = reference(low, valid if padding_object else None)
    b, n, h, w = shape
    assert logits.shape == (b, n, 4 * h, 4 * w) and probs.shape == (b, n + 1, 4 * h, 4 * w)
    torch.testing.assert_close(logits.double(), wanted_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs.double(), wanted_probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(probs.sum(1), torch.ones(b, 4 * h, 4 * w), rtol=1e-5, atol=1e-5)
    if padding_object:
        assert probs[-1, -1].abs().max() == 0


def test_known_values(native_kernels):
    """One object with logit 0 everywhere: p = 1/2, background 1/2; two objects with logit 0: background 1/4, odds
    1/3 against 1 and 1, so 1/7 and 3/7 each."""
    _, probs = upsample4_soft_aggregate_native(torch.zeros(1, 1, 2, 3))
    torch.testing.assert_close(probs, torch.full((1, 2, 8, 12), 0.5))
    _, probs = upsample4_soft_aggregate_native(torch.zeros(1, 2, 2, 3))
    torch.testing.assert_close(probs[0, :, 3, 5], torch.tensor([1 / 7, 3 / 7, 3 / 7]))
    low = torch.arange(4.0).view(1, 1, 1, 4)  # along x: 0 1 2 3, sampled at (X + 0.5) / 4 - 0.5, clamped
    logits, _ = upsample4_soft_aggregate_native(low)
    wanted = torch.tensor([0, 0, 0.125, 0.375, 0.625, 0.875, 1.125, 1.375, 1.625, 1.875, 2.125, 2.375, 2.625,
                           2.875, 3, 3])
    torch.testing.assert_close(logits[0, 0, 0], wanted)


def test_fallbacks(native_kernels, monkeypatch):
    """Autograd, LMRC_LOCAL_WINDOW=plain and more objects than the kernel takes run PyTorch; the public function
    gives the same either way."""
    low = torch.randn(1, 2, 6, 8)
    native_result = upsample_soft_aggregate(low)
    assert upsample4_soft_aggregate_native(low.clone().requires_grad_()) is None
    assert upsample4_soft_aggregate_native(torch.randn(1, 17, 2, 2)) is None
    monkeypatch.setenv("LMRC_LOCAL_WINDOW", "plain")
    assert upsample4_soft_aggregate_native(low) is None
    for got, wanted in zip(upsample_soft_aggregate(low), native_result):
        torch.testing.assert_close(got, wanted, rtol=1e-4, atol=1e-5)
