"""`Workspace`: reusable buffers for inference temporaries, owned by one object (an inference copy of the model).

Large fresh tensors are returned to the OS when freed (glibc mmaps them) and every page faults again on the next
frame; for the reads' and the padding's temporaries that cost more than the work itself. A buffer is handed out
again at the next request with the same name, shape and dtype: only for temporaries that no caller keeps past the
call that consumes them.
"""
from __future__ import annotations

import torch


class Workspace:
    """Uninitialised buffers, one per (name, shape, dtype, device, memory format); the `slots` most recently used
    are kept (a video of another size or another object count replaces them)."""

    def __init__(self, slots: int = 32) -> None:
        self.slots = slots
        self.buffers: dict[tuple, torch.Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu",
               memory_format: torch.memory_format = torch.contiguous_format, zero: bool = False) -> torch.Tensor:
        """The buffer for these; `zero`: zero-filled when made (a caller that writes only part of it each time)."""
        key = (name, tuple(shape), dtype, torch.device(device), memory_format)
        t = self.buffers.pop(key, None)
        if t is None:
            with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
                t = torch.empty(shape, dtype=dtype, device=device).contiguous(memory_format=memory_format)
                if zero:
                    t.zero_()
            while len(self.buffers) >= self.slots:
                self.buffers.pop(next(iter(self.buffers)))
        self.buffers[key] = t  # most recent last
        return t

    def clear(self) -> None:
        self.buffers = {}
