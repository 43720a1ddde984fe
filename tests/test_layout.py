"""Layout changes between channels-last and NCHW (lmrc/ops/layout.c) against PyTorch's own."""
from __future__ import annotations

import pytest
import torch

from lmrc.ops import _native
from lmrc.ops.layout import add_nchw_groups_to_nhwc, nhwc_to_nchw

native = pytest.mark.skipif(_native.load(torch.float32) is None, reason="no C compiler: PyTorch does these")
CL = torch.channels_last


@native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 64, 120, 216), (4, 24, 37, 29), (2, 5, 3, 11)])
@pytest.mark.parametrize("objects", [0, 1, 2])  # 0: no shared term
def test_nhwc_to_nchw_is_the_contiguous_sum(dtype, shape, objects):
    g = torch.Generator().manual_seed(sum(shape) + objects)
    x = (torch.randn(shape, generator=g) * 100).to(dtype).contiguous(memory_format=CL)
    x.permute(0, 2, 3, 1).reshape(-1)[::97] = float("nan")  # NaN stays NaN through the bf16 rounding
    if objects:
        shared = torch.randn(shape[0] // objects, *shape[1:], generator=g).to(dtype).contiguous(memory_format=CL)
        wanted = (x.view(-1, objects, *shape[1:]) + shared.unsqueeze(1)).reshape(shape).contiguous()
    else:
        shared, wanted = None, x.contiguous()
    out = nhwc_to_nchw(x, shared)
    assert out.is_contiguous() and out.dtype == dtype
    torch.testing.assert_close(out, wanted, rtol=0, atol=0, equal_nan=True)  # the same rounding as PyTorch's


@native
@pytest.mark.parametrize("shape", [(2, 3, 32, 120, 216), (1, 1, 7, 9, 13)])
def test_add_nchw_groups_to_nhwc_is_the_in_place_sum(shape):
    b, g, c, h, w = shape
    gen = torch.Generator().manual_seed(b + g + c)
    groups = torch.randn(shape, generator=gen)
    out = torch.randn(b, c, h, w, generator=gen).contiguous(memory_format=CL)
    wanted = out.clone()
    for index in range(g):
        wanted += groups[:, index]
    add_nchw_groups_to_nhwc(out, groups)
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, wanted, rtol=0, atol=0)


@native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_add_nchw_groups_to_nhwc_also_writes_the_relu(dtype):
    """The decoder block's first ReLU, in its conv's dtype, from the same pass: relu(sum) rounded as PyTorch rounds."""
    gen = torch.Generator().manual_seed(5)
    groups = torch.randn(2, 2, 32, 37, 29, generator=gen)
    out = torch.randn(2, 32, 37, 29, generator=gen).contiguous(memory_format=CL)
    wanted = out + groups[:, 0] + groups[:, 1]
    activated = torch.empty_like(out, dtype=dtype, memory_format=CL)
    add_nchw_groups_to_nhwc(out, groups, activated)
    torch.testing.assert_close(out, wanted, rtol=0, atol=0)
    torch.testing.assert_close(activated, torch.relu(wanted).to(dtype), rtol=0, atol=0)


def test_layout_falls_back_to_pytorch(monkeypatch):
    """Plain mode (or no compiler, another device, autograd) gives the same values through PyTorch."""
    monkeypatch.setenv("LMRC_LOCAL_WINDOW", "plain")
    x = torch.randn(2, 8, 5, 6).contiguous(memory_format=CL)
    shared = torch.randn(1, 8, 5, 6).contiguous(memory_format=CL)
    torch.testing.assert_close(nhwc_to_nchw(x, shared), (x + shared).contiguous())
    out = torch.zeros(2, 8, 5, 6).contiguous(memory_format=CL)
    activated = torch.empty_like(out)
    add_nchw_groups_to_nhwc(out, -torch.ones(2, 3, 8, 5, 6), activated)
    assert torch.equal(out, torch.full((2, 8, 5, 6), -3.0)) and torch.equal(activated, torch.zeros(2, 8, 5, 6))
