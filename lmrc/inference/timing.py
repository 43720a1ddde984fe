"""Per-stage wall-clock timers for `lmrc bench`: a no-op unless a `record()` block is active.

    with timing.stage("decoder"):      # in the model / segmenter: costs one global lookup when disabled
        ...
    with timing.record() as times:     # in the benchmark
        seg.step(frame)
    times  # {"decoder": seconds, ...} summed over the calls inside the block

Stages must not nest (a nested stage would be counted twice). On CPU every op is synchronous, so wall time
around a call is the call's cost; on CUDA `record(sync=True)` synchronises at each stage boundary.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

# The order `lmrc bench` prints them in.
STAGES = ("key_encoding", "value_encoding", "global_read", "local_reads", "sequential_local_reads", "comparator",
          "decoder", "memory")

_active: dict[str, float] | None = None
_sync = None
_listener = None  # called as listener(name, entering) at every stage boundary while a record is active


class _Null:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> bool:
        return False


_NULL = _Null()


class _Timer:
    __slots__ = ("name", "times", "start")

    def __init__(self, name: str, times: dict[str, float]) -> None:
        self.name = name
        self.times = times

    def __enter__(self) -> None:
        if _sync is not None:
            _sync()
        if _listener is not None:
            _listener(self.name, True)
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> bool:
        if _sync is not None:
            _sync()
        if _listener is not None:
            _listener(self.name, False)
        self.times[self.name] = self.times.get(self.name, 0.0) + time.perf_counter() - self.start
        return False


def stage(name: str):
    """Context manager timing `name` into the active record; does nothing when none is active."""
    times = _active
    return _NULL if times is None else _Timer(name, times)


def enabled() -> bool:
    return _active is not None


@contextmanager
def record(sync: bool = False, listener=None) -> Iterator[dict[str, float]]:
    """Collect stage times (seconds, summed per name) into the yielded dict while the block runs. `listener(name,
    entering)` is called when each stage starts and ends (e.g. to attribute counted operations to stages)."""
    global _active, _sync, _listener
    previous, previous_sync, previous_listener = _active, _sync, _listener
    times: dict[str, float] = {}
    _active, _listener = times, listener
    if sync:
        import torch

        _sync = torch.cuda.synchronize if torch.cuda.is_available() else None
    try:
        yield times
    finally:
        _active, _sync, _listener = previous, previous_sync, previous_listener
