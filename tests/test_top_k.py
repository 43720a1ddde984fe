"""The global read's row top-k (native threshold scan) against torch.topk."""
from __future__ import annotations

import pytest
import torch

from lmrc.ops import _native
from lmrc.ops.top_k import amx_library, matmul_top_k, row_top_k

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


amx = pytest.mark.skipif(amx_library() is None, reason="no AMX tiles on this CPU (or no AMX kernel in this build)")


@amx
@pytest.mark.parametrize("n, c, m, k", [(1620, 64, 3240, 20), (37, 64, 100, 20), (16, 32, 16, 16), (5, 64, 21, 1),
                                        (40, 64, 1000, 32)])
def test_matmul_top_k_on_amx_tiles_is_the_top_k_of_the_product(n, c, m, k):
    """Row and column counts off the 16 x 16 tiles, both channel counts, k up to the columns, keys read in place
    from a wider buffer: the values are the top-k of the product plus the bias (bf16 products summed in float32), at
    distinct columns holding them."""
    g = torch.Generator().manual_seed(n + m + k)
    rows = torch.randn(n, c, generator=g).bfloat16()
    keys = torch.randn(c, m + 40, generator=g).bfloat16()[:, 30: 30 + m]  # rows m + 40 apart, as a memory window
    bias = torch.randn(m, generator=g) * 4
    values, indices = matmul_top_k(rows, keys, bias, k)
    exact = rows.double() @ keys.double() + bias.double()
    assert values.dtype == torch.float32 and indices.dtype == torch.int64 and values.shape == (n, k)
    torch.testing.assert_close(values.double(), exact.topk(k, dim=-1).values, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(exact.gather(1, indices), values.double(), atol=1e-4, rtol=1e-5)
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()


@amx
@pytest.mark.parametrize("k", [1, 20, 32])
def test_matmul_top_k_keeps_entries_tied_with_its_floor(k):
    """Small integers (exact in bf16 and float32): the k-th best ties with many entries, and the floor a first pass
    takes from every 4th key block (1000 columns: enough blocks for it) often equals it. Exact values, k distinct
    columns holding them."""
    g = torch.Generator().manual_seed(k)
    rows = torch.randint(-2, 3, (50, 64), generator=g).bfloat16()
    keys = torch.randint(-2, 3, (64, 1000), generator=g).bfloat16()
    bias = torch.randint(-3, 4, (1000,), generator=g).float()
    values, indices = matmul_top_k(rows, keys, bias, k)
    exact = rows.double() @ keys.double() + bias.double()
    torch.testing.assert_close(values.double(), exact.topk(k, dim=-1).values, rtol=0, atol=0)
    assert torch.equal(exact.gather(1, indices), values.double())
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()


@amx
def test_matmul_top_k_floor_is_at_most_the_kth_best():
    """The 32 largest entries are exactly the lane maxima the floor pass sees (key blocks 0 and 4 hold them), so
    the floor is the k-th best itself: a floor one place higher would drop the k-th."""
    bias = -torch.rand(1000) - 1  # every other entry below -1
    bias[0:16], bias[64:80] = torch.arange(32.0)[::2], torch.arange(32.0)[1::2]
    values, indices = matmul_top_k(torch.zeros(3, 64).bfloat16(), torch.zeros(64, 1000).bfloat16(), bias, 20)
    assert torch.equal(values, bias.topk(20).values.expand(3, 20))
    assert torch.equal(bias[indices], values)


@amx
def test_global_read_on_amx_tiles_is_as_exact_as_the_bf16_product():
    """The bf16 global read with its top-k fused on AMX tiles against the same read through the bf16 matrix product,
    both against float64 on the same bf16 operands: the comparator's top-k as exact (float32, where the product
    rounds to bf16), the readout as close."""
    from lmrc.model import memory_reads
    from lmrc.model.memory_reads import global_memory_read, memory_key_sq

    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 64, 6, 9, generator=g).bfloat16().float()  # float32 query keys, as the fast path's
    mk, mv = torch.randn(1, 64, 300, generator=g).bfloat16(), torch.randn(1, 32, 300, generator=g).bfloat16()
    with torch.inference_mode():
        fused = global_memory_read(q, mk, mv, 0.125, read_top_k=20, comparator_top_k=5,
                                   memory_sq=memory_key_sq(mk.float()))  # float norms, as the memory bank keeps them
        assert memory_reads.global_similarity_top_k(q.flatten(2), mk, 0.125, 20) is not None
        plain_mk = mk.float()  # float keys take the matrix product
        assert memory_reads.global_similarity_top_k(q.flatten(2), plain_mk, 0.125, 20) is None
    qd, kd, vd = q.flatten(2)[0].double(), mk[0].double(), mv[0].double()  # the same bf16-valued operands
    sim = -0.125 * (qd.pow(2).sum(0)[:, None] + kd.pow(2).sum(0)[None] - 2 * qd.t() @ kd)  # eq. (1)
    best, idx = sim.topk(20, -1)
    readout = torch.einsum("nk,cnk->cn", torch.softmax(best, -1), vd[:, idx]).reshape(1, 32, 6, 9)
    torch.testing.assert_close(fused.similarity_top_k.double(), best[:, :5].t().reshape(1, 5, 6, 9), atol=2e-3, rtol=0)
    torch.testing.assert_close(fused.readout.double(), readout, atol=3e-2, rtol=0)  # bf16 values and readout


@amx
def test_matmul_top_k_declines_rows_it_cannot_fill():
    """A row whose products are all NaN fills no list: None, so the read takes the product (torch.topk then decides)."""
    rows = torch.randn(4, 64).bfloat16()
    rows[2] = float("nan")
    assert matmul_top_k(rows, torch.randn(64, 50).bfloat16(), torch.zeros(50), 5) is None
    assert matmul_top_k(rows[:2], torch.randn(64, 50).bfloat16(), torch.zeros(50), 5) is not None


def test_matmul_top_k_declines_what_it_cannot_take(monkeypatch):
    rows, keys, bias = torch.randn(4, 64).bfloat16(), torch.randn(64, 50).bfloat16(), torch.zeros(50)
    assert matmul_top_k(torch.randn(4, 48).bfloat16(), torch.randn(48, 50).bfloat16(), bias, 5) is None  # channels
    assert matmul_top_k(rows, keys, bias, 51) is None
    assert matmul_top_k(rows, keys.requires_grad_(), bias, 5) is None  # autograd takes the product
    monkeypatch.setenv("LMRC_LOCAL_WINDOW", "plain")
    assert amx_library() is None and matmul_top_k(rows, keys.detach(), bias, 5) is None
