"""Losses of Section III-E-1: pixel-wise cross-entropy (eq. 11) plus beta * the scale loss (eq. 12)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cross_entropy(agg_logits: Tensor, target: Tensor, kind: str = "plain", *, bootstrap_ratio: float = 0.15) -> Tensor:
    """Pixel-wise cross-entropy over background + objects. agg_logits B x (N+1) x H x W, target B x H x W (ids).

    kind: "plain"; "balanced" (HED's class-balanced weighting, background vs objects, as the paper cites [53]);
    "bootstrapped" (mean over the hardest `bootstrap_ratio` of pixels, as STCN).
    """
    pixel = F.cross_entropy(agg_logits.float(), target.long(), reduction="none")
    if kind == "plain":
        return pixel.mean()
    if kind == "balanced":
        foreground = (target > 0).float()
        beta = 1 - foreground.mean(dim=(1, 2), keepdim=True)  # share of background pixels, per image
        weight = foreground * beta + (1 - foreground) * (1 - beta)
        return (weight * pixel).sum() / weight.sum().clamp_min(1e-6)
    if kind == "bootstrapped":
        flat = pixel.flatten(1)
        k = max(1, int(flat.shape[1] * bootstrap_ratio))
        return flat.topk(k, dim=1).values.mean()
    raise ValueError(f"unknown cross-entropy kind {kind!r}: plain, balanced or bootstrapped")


def scale_loss(keys: dict[int, Tensor]) -> Tensor:
    """Eq. (12): mean over stage-4 positions i of (|k4_i|^2 - |k3_i'|^2)^2 + (|k4_i|^2 - |k2_i''|^2)^2.

    keys {r: B x C x Hr x Wr}; i' and i'' are the positions of stages 3 and 2 at the same place as i
    (the top-left child of its 2x2 / 4x4 cell).
    """
    n4 = keys[4].pow(2).sum(1)
    n3 = keys[3].pow(2).sum(1)[:, ::2, ::2]
    n2 = keys[2].pow(2).sum(1)[:, ::4, ::4]
    return ((n4 - n3).pow(2) + (n4 - n2).pow(2)).mean()


def lmrc_loss(
    outputs: list[Tensor], targets: list[Tensor], query_keys: dict[int, Tensor] | None, beta: float, kind: str = "plain",
    ce_weight: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """Eq. (11): L = L_ce (summed over the predicted frames, times `ce_weight`) + beta * L_scale (pass
    query_keys=None once it stops)."""
    ce = sum(cross_entropy(o, t, kind) for o, t in zip(outputs, targets))
    if ce_weight != 1.0:
        ce = ce * ce_weight
    parts = {"ce": float(ce.detach())}
    total = ce
    if query_keys is not None and beta:
        sl = scale_loss(query_keys)
        total = total + beta * sl
        parts["scale"] = float(sl.detach())
    parts["total"] = float(total.detach())
    return total, parts
