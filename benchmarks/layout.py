"""The layout changes of the CPU fast path (lmrc/ops/layout.c) against the PyTorch ops they replaced, side by side:
the value's per-object sum and transpose to NCHW (own + shared, bf16) and the key's transpose, at the three scales
of lmrc-lite at 480p with 2 objects. Results are checked equal before timing.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/layout.py
"""
import time

import torch

from lmrc.ops.layout import nhwc_to_nchw
from lmrc.utils.memory import reuse_freed_memory


def bench(fn, n=50):
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def pytorch_sum_and_transpose(own, shared, b, n):
    """What ValueEncoder did before: the sum in channels-last order, then a 2-D transposed copy per image."""
    c, h, w = own.shape[1:]
    own = own.view(b, n, c, h, w).add_(shared.unsqueeze(1)).view(b * n, c, h, w)
    out = own.new_empty(b, n, c, h, w)
    rows = own.permute(0, 2, 3, 1).reshape(b * n, h * w, c)
    for index, image in enumerate(out.view(b * n, c, h * w)):
        image.copy_(rows[index].t())
    return out


reuse_freed_memory()
cl = torch.channels_last
print(f"{torch.get_num_threads()} threads; ms per call, the mean of 50")
for c, h, w in ((64, 120, 216), (128, 60, 108), (256, 30, 54)):
    own = torch.randn(2, c, h, w).bfloat16().contiguous(memory_format=cl)
    shared = torch.randn(1, c, h, w).bfloat16().contiguous(memory_format=cl)
    assert torch.equal(pytorch_sum_and_transpose(own.clone(), shared, 1, 2).flatten(0, 1), nhwc_to_nchw(own, shared))
    copy = bench(lambda: own.clone())
    before = bench(lambda: pytorch_sum_and_transpose(own.clone(), shared, 1, 2)) - copy  # the clone is not its cost
    after = bench(lambda: nhwc_to_nchw(own, shared))
    to_f32 = bench(lambda: nhwc_to_nchw(own, shared, torch.float32))
    key = own[:1]
    print(f"value {c:3d} x {h:3d} x {w:3d}: sum + transpose PyTorch {before:.3f}, layout.c {after:.3f} "
          f"(to float32 {to_f32:.3f}); key transpose .contiguous() {bench(lambda: key.contiguous()):.3f}, "
          f"nhwc_to_nchw {bench(lambda: nhwc_to_nchw(key)):.3f}")
