"""8-float against 16-float blocks (`avx512_256` against `avx512`) on narrow rows: LMR inference and LMR forward +
backward at widths around `lmrc.ops._native.NARROW_ROW`, both builds alternating in one process, median ms of 40.
Only meaningful on an AVX-512 CPU (elsewhere both columns are the same build).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/narrow_rows.py
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import local_read as lr  # noqa: E402  (the benchmark's inputs and calls)

import lmrc.ops._native as native  # noqa: E402

SIZES = ((14, 24), (22, 40), (30, 54), (40, 72))  # H x W; 30 x 54 is 1/16 of 480p
SETTINGS = {"8-float": 1 << 30, "16-float": 0}  # NARROW_ROW: every row narrow, or none


def median_ms(fn, inference: bool, repeats: int = 40) -> dict[str, float]:
    times = {name: [] for name in SETTINGS}
    with torch.inference_mode(inference):
        for name, narrow in SETTINGS.items():  # warm-up, builds the libraries
            native.NARROW_ROW = narrow
            fn()
        for i in range(repeats):
            for name in (SETTINGS if i % 2 == 0 else reversed(list(SETTINGS))):
                native.NARROW_ROW = SETTINGS[name]
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    kept = native.NARROW_ROW
    print(f"{torch.get_num_threads()} threads, chosen ISA {native.chosen_isa()}; ms, 8-float / 16-float blocks")
    try:
        for h, w in SIZES:
            inputs = lr.make_inputs(h, w, 256)
            q, k, v, _ = inputs
            inference = median_ms(lambda: lr.inference_attention(q, k, v), True)
            training = median_ms(lambda: lr.run_once(lr.attention_fast, inputs, True), False)
            print(f"{h:3d} x {w:3d}: LMR inference {inference['8-float']:.3f} / {inference['16-float']:.3f}, "
                  f"forward + backward {training['8-float']:.3f} / {training['16-float']:.3f}")
    finally:
        native.NARROW_ROW = kept


if __name__ == "__main__":
    main()
