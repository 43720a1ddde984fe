"""Soft aggregation of per-object predictions into one distribution over background + objects (STM/STCN)."""
from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-7


def soft_aggregate(logits: Tensor, valid_objects: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """logits B x N x H x W (independent per object) -> (aggregated logits, probabilities), both B x (N+1) x H x W.

    bg = prod(1 - p_k); each probability is clamped and turned back into a logit; softmax over background
    and objects. Objects marked invalid (padding in a batch) get zero probability.
    """
    prob = torch.sigmoid(logits.float())
    if valid_objects is not None:
        prob = prob * valid_objects[:, :, None, None].to(prob.dtype)
    background = torch.prod(1 - prob, dim=1, keepdim=True)
    stacked = torch.cat([background, prob], 1).clamp(_EPS, 1 - _EPS)
    agg_logits = torch.log(stacked / (1 - stacked))
    if valid_objects is not None:
        keep = torch.cat([torch.ones_like(valid_objects[:, :1]), valid_objects], 1).bool()
        agg_logits = agg_logits.masked_fill(~keep[:, :, None, None], -1e4)
    return agg_logits, torch.softmax(agg_logits, dim=1)
