"""The global read's row top-k (native threshold scan) against torch.topk."""
from __future__ import annotations

import pytest
import torch

from lmrc.ops import _native
from lmrc.ops.top_k import row_top_k

native = pytest.mark.skipif(_native.load(torch.float32) is None, reason="no C compiler: row_top_k is torch.topk")


@native
@pytest.mark.parametrize("isa", _native.supported_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, k", [((3, 200, 1000), 20), ((7, 37), 1), ((5, 37), 37), ((2, 16), 5), ((4, 33), 9)])
def test_row_top_k_equals_torch_topk(monkeypatch, isa, dtype, shape, k):
    monkeypatch.setenv("LMRC_LOCAL_WINDOW_ISA", isa)  # each variant's own mask moves and maxima
    g = torch.Generator().manual_seed(sum(shape) + k)
    x = torch.randn(shape, generator=g, dtype=dtype)
    x[..., ::7] = float("-inf")  # masked entries, as a similarity may hold
    if shape[-1] >= 100:  # ascending rows: every entry beats the running k-th best (the insertion path)
        x[0, 0] = torch.arange(shape[-1], dtype=dtype)
        x[0, 1, -30:] = 100 + torch.arange(30, dtype=dtype)  # the best in the last entries, outside the floor's lanes
    values, indices = row_top_k(x, k)
    expected = x.topk(k, dim=-1)
    assert indices.dtype == torch.int64 and values.shape == expected.values.shape
    torch.testing.assert_close(values, expected.values, rtol=0, atol=0)
    assert torch.equal(x.gather(-1, indices), values)
    finite = values.isfinite()  # the -inf entries tie: any order of their indices is right
    assert torch.equal(indices[finite], expected.indices[finite])


@native
@pytest.mark.parametrize("isa", _native.supported_isas())
@pytest.mark.parametrize("shape, k", [((3, 200, 1000), 20), ((7, 37), 1), ((5, 37), 37), ((4, 33), 9)])
def test_row_top_k_of_bfloat16_rows(monkeypatch, isa, shape, k):
    """bf16 similarities (bf16 autocast) are read natively: the same values as torch.topk; bf16 has many ties, so
    the indices are checked by what they point at and by being distinct."""
    g = torch.Generator().manual_seed(sum(shape) + k)
    monkeypatch.setenv("LMRC_LOCAL_WINDOW_ISA", isa)
    x = torch.randn(shape, generator=g).bfloat16()
    x[..., ::7] = float("-inf")
    if shape[-1] >= 100:
        x[0, 0] = torch.arange(shape[-1]).bfloat16()  # ascending, with the ties bf16 rounding makes
    assert _native.load(torch.float32).bf16_inputs
    values, indices = row_top_k(x, k)
    assert values.dtype == torch.bfloat16 and indices.dtype == torch.int64
    torch.testing.assert_close(values, x.topk(k, dim=-1).values, rtol=0, atol=0)
    assert torch.equal(x.gather(-1, indices), values)
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()


def test_row_top_k_falls_back_to_torch_topk_for_gradients_and_plain_mode(monkeypatch):
    x = torch.randn(4, 50, requires_grad=True)
    values, indices = row_top_k(x, 3)
    values.sum().backward()
    assert x.grad.sum() == 12 and torch.equal(indices, x.topk(3).indices)
    monkeypatch.setenv("LMRC_LOCAL_WINDOW", "plain")
    with torch.no_grad():
        torch.testing.assert_close(row_top_k(x, 3)[0], x.topk(3).values)
    with pytest.raises(ValueError, match="top-k of 51"):
        row_top_k(x, 51)


@native
@pytest.mark.parametrize("isa", _native.supported_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_top_k_keeps_entries_tied_with_the_floor(monkeypatch, isa, dtype):
    """Rows of a few distinct values (every k-th best tied with many entries, the floor among them): the k values
    are torch.topk's, at k distinct columns holding them."""
    monkeypatch.setenv("LMRC_LOCAL_WINDOW_ISA", isa)
    g = torch.Generator().manual_seed(6)
    x = torch.randint(0, 4, (64, 500), generator=g).to(dtype)
    x[:, ::11] = float("-inf")
    for k in (1, 5, 20, 32):
        values, indices = row_top_k(x, k)
        torch.testing.assert_close(values, x.topk(k, dim=-1).values, rtol=0, atol=0)
        assert torch.equal(x.gather(-1, indices), values)
        assert (indices.sort(-1).values.diff(dim=-1) > 0).all()
