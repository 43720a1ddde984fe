"""Memory comparator (Section III-C, Fig. 4): weigh each local readout by how its similarities compare with GMR's."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def similarity_comparison_block(local_top_k: Tensor, global_top_k: Tensor, alpha: float) -> Tensor:
    """Eq. (9): D = alpha/2 * (e^L - e^G) / (e^L + e^G), computed as alpha/2 * tanh((L - G) / 2) (no overflow).

    local_top_k, global_top_k: B x k x H x W, the k largest similarities of each query position.
    """
    return 0.5 * alpha * torch.tanh(0.5 * (local_top_k - global_top_k))


def upsample_global_top_k(global_top_k: Tensor) -> dict[int, Tensor]:
    """S^{G_4^k} at stage 4, then bilinearly upsampled, stage by stage, to stages 3 and 2 (Section III-C-1)."""
    maps = {4: global_top_k}
    for r in (3, 2):
        maps[r] = F.interpolate(maps[r + 1], scale_factor=2, mode="bilinear", align_corners=False)
    return maps


class ReliabilityWeight(nn.Module):
    """SCB difference map -> 1x1 conv (k -> 1) -> sigmoid: the reliability weight H of one local readout."""

    def __init__(self, top_k: int, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.conv = nn.Conv2d(top_k, 1, kernel_size=1)

    def forward(self, local_top_k: Tensor, global_top_k: Tensor) -> Tensor:
        return torch.sigmoid(self.conv(similarity_comparison_block(local_top_k, global_top_k, self.alpha)))


class MemoryComparator(nn.Module):
    """One reliability weight per local / sequential-local readout, named like `L2`, `L3`, `L4`, `S2`, `S3`."""

    def __init__(self, readout_names: list[str], top_k: int, alpha: float) -> None:
        super().__init__()
        self.weights = nn.ModuleDict({name: ReliabilityWeight(top_k, alpha) for name in readout_names})

    def forward(self, name: str, readout: Tensor, local_top_k: Tensor, global_top_k: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. (10): R~ = H (.) R, H broadcast over channels. readout B x C x H x W -> (R~, H)."""
        reliability = self.weights[name](local_top_k, global_top_k)
        return reliability * readout, reliability
