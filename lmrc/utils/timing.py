"""Stage timing: every stage is a `torch.profiler.record_function` range, so it shows in any PyTorch profiler
trace; a `StageTimer` also sums each stage's wall-clock seconds while its `record()` block is active (`lmrc bench`).

    with stage("decoder"):                 # code that owns no timer (the plain network): a profiler range only
        ...
    timer = StageTimer()                   # owned by one object (a Segmenter and its inference copy share one)
    with timer.stage("decoder"):           # a profiler range; timed only inside timer.record()
        ...
    with timer.record() as times:          # in the benchmark
        seg.step(frame)
    times  # {"decoder": seconds, ...} summed over the calls inside the block
    with timer.record(listener=f):         # also f(name, entering) at every stage boundary (`lmrc bench --macs`)
        seg.step(frame)

Stages must not nest (a nested stage would be counted twice). On CPU every op is synchronous, so wall time
around a call is the call's cost; on CUDA `record(sync=True)` synchronises at each stage boundary.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from torch.profiler import record_function

# The order `lmrc bench` prints them in.
STAGES = ("key_encoding", "value_encoding", "global_read", "local_reads", "sequential_local_reads", "comparator",
          "decoder", "memory", "read_and_decode")  # read_and_decode: the whole ONNX graph (onnxruntime runtime)


def stage(name: str) -> record_function:
    """A profiler range named `lmrc::<name>`."""
    return record_function(f"lmrc::{name}")


class _TimedStage:
    __slots__ = ("timer", "name", "range", "start")

    def __init__(self, timer: "StageTimer", name: str) -> None:
        self.timer, self.name, self.range = timer, name, stage(name)

    def __enter__(self) -> None:
        self.range.__enter__()
        if self.timer.times is not None:
            if self.timer.sync is not None:
                self.timer.sync()
            if self.timer.listener is not None:
                self.timer.listener(self.name, True)
            self.start = time.perf_counter()

    def __exit__(self, *exc) -> bool:
        times = self.timer.times
        if times is not None:
            if self.timer.sync is not None:
                self.timer.sync()
            if self.timer.listener is not None:
                self.timer.listener(self.name, False)
            times[self.name] = times.get(self.name, 0.0) + time.perf_counter() - self.start
        self.range.__exit__(*exc)
        return False


class StageTimer:
    """Wall-clock seconds per stage, collected only inside `record()`; outside, its stages are profiler ranges."""

    def __init__(self) -> None:
        self.times: dict[str, float] | None = None
        self.sync: Callable[[], None] | None = None
        self.listener: Callable[[str, bool], None] | None = None

    def stage(self, name: str) -> _TimedStage:
        return _TimedStage(self, name)

    def enabled(self) -> bool:
        return self.times is not None

    @contextmanager
    def record(self, sync: bool = False, listener: Callable[[str, bool], None] | None = None
               ) -> Iterator[dict[str, float]]:
        """Collect stage times (seconds, summed per name) into the yielded dict while the block runs. `listener(name,
        entering)` is called when each stage starts and ends (e.g. to attribute counted operations to stages)."""
        previous, previous_sync, previous_listener = self.times, self.sync, self.listener
        times: dict[str, float] = {}
        self.times, self.listener = times, listener
        if sync:
            import torch

            self.sync = torch.cuda.synchronize if torch.cuda.is_available() else None
        try:
            yield times
        finally:
            self.times, self.sync, self.listener = previous, previous_sync, previous_listener
