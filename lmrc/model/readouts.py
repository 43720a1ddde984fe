"""The readout layout: every memory read of a setting, in one list that the network, the inference preparation,
weight growing and the memory comparator all iterate.

Reads run in this order and each decoder stage concatenates its readouts in it: G4 (global, eq. 1-3), the
local reads L4, L3, L2 (eq. 4-5, coarse to fine), then the sequential local reads S3, S2 (eq. 6-8; S_r reuses
L_{r+1}'s affinity, read before it).
"""
from __future__ import annotations

from dataclasses import dataclass

from lmrc.config import ModelConfig

KINDS = {"G": "global", "L": "local", "S": "sequential local"}


@dataclass(frozen=True)
class Readout:
    """One memory read: its decoder stage r (2, 3, 4) and kind ("G", "L" or "S")."""

    stage: int
    kind: str

    @property
    def name(self) -> str:
        """"G4", "L3", "S2": the key of its comparator weight and reliability map."""
        return f"{self.kind}{self.stage}"

    @property
    def compared(self) -> bool:
        """Whether the memory comparator weighs it (the local and sequential local reads)."""
        return self.kind != "G"


def readout_layout(config: ModelConfig) -> list[Readout]:
    """The reads of `config`'s setting (Table 4), in read order."""
    layout = [Readout(4, "G")]
    layout += [Readout(r, "L") for r in sorted(config.local_read_stages, reverse=True)]
    layout += [Readout(r, "S") for r in ((3, 2) if config.sequential_local_read else ())]
    return layout


def stage_readouts(layout: list[Readout], stage: int) -> list[Readout]:
    """The readouts decoder stage `stage` receives, in the order it concatenates them."""
    return [readout for readout in layout if readout.stage == stage]
