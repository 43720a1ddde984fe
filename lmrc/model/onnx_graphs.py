"""The three per-frame steps of an LMRC network as graphs of standard tensor ops, for ONNX export.

`LMRC.read_and_decode` runs native local-window kernels, scratch buffers and a chunked global read; none of that
exports. These modules compute the same functions from the same submodules (encoders, comparator weights, decoder)
with plain PyTorch ops only: the local reads are the plain path of `lmrc.ops.local_window` (pad + shifted slices),
the global read's top-k is TopK + Gather, and the similarity block is computed whole (no chunks). Tensor inputs and
outputs are flat tuples in the order of the `*_names` functions, which become the ONNX graphs' names.

Batch size is 1 (one video). Object count, memory length and image size may vary at run time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmrc.model.aggregate import soft_aggregate
from lmrc.model.comparator import upsample_global_top_k
from lmrc.model.encoders import STAGES
from lmrc.model.network import FrameEncoding, fold_objects
from lmrc.ops.local_window import local_similarity_plain, local_weighted_sum_plain


def key_encoding_names() -> tuple[list[str], list[str]]:
    return ["image"], [f"key{r}" for r in STAGES] + [f"features{r}" for r in STAGES]


def value_stages(model: nn.Module) -> tuple[int, ...]:
    """The stages a segmenter ever asks values for: those of the local reads, and 4 for the global memory."""
    return tuple(sorted(set(model.config.local_read_stages) | {4}))


def value_encoding_names(model: nn.Module) -> tuple[list[str], list[str]]:
    inputs = ["image", *(f"key{r}" for r in STAGES), *(f"features{r}" for r in STAGES), "masks"]
    return inputs, [f"value{r}" for r in value_stages(model)]


def read_and_decode_names(model: nn.Module) -> tuple[list[str], list[str]]:
    stages = sorted(model.config.local_read_stages)
    inputs = [*(f"key{r}" for r in STAGES), *(f"features{r}" for r in STAGES),
              "memory_keys", "memory_key_sq", "memory_value_rows",
              *(f"local_key{r}" for r in stages), *(f"local_value{r}" for r in stages)]
    reliability = [f"reliability_{name}" for name in reliability_names(model)]
    return inputs, ["logits", "agg_logits", "probs", *reliability]


def reliability_names(model: nn.Module) -> list[str]:
    return list(model.comparator.weights) if model.comparator is not None else []


class KeyEncodingGraph(nn.Module):
    """image 1 x 3 x H x W -> keys {r} then frame features {r}, r = 2, 3, 4."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        frame = self.model.encode_key(image)
        return (*(frame.keys[r] for r in STAGES), *(frame.features[r] for r in STAGES))


class ValueEncodingGraph(nn.Module):
    """(image, keys, features, masks 1 x N x H x W) -> values 1 x N x C_r x Hr x Wr at `value_stages(model)`.
    Keys are inputs too so that a value encoder built on them exports unchanged (unused inputs are dropped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.stages = value_stages(model)

    def forward(self, image: Tensor, key2: Tensor, key3: Tensor, key4: Tensor, features2: Tensor, features3: Tensor,
                features4: Tensor, masks: Tensor) -> tuple[Tensor, ...]:
        frame = FrameEncoding({2: key2, 3: key3, 4: key4}, {2: features2, 3: features3, 4: features4})
        values = self.model.encode_value(image, frame, masks, self.stages)
        return tuple(values[r] for r in self.stages)


def global_read_graph(query_key: Tensor, memory_keys: Tensor, memory_key_sq: Tensor, value_rows: Tensor,
                      scale: float, read_top_k: int | None, comparator_top_k: int) -> tuple[Tensor, Tensor | None]:
    """GMR, eq. (1)-(3), as `global_memory_read` computes it, in one block: (readout 1 x N x C x h x w, the
    comparator's top-k similarities 1 x k x h x w or None).

    memory_keys 1 x Ck x M, memory_key_sq 1 x M, value_rows 1 x M x N x C (position-major, as the memory bank
    holds them). The top-k read needs M >= max(read_top_k, comparator_top_k)."""
    b, c, h, w = query_key.shape
    q = query_key.flatten(2).transpose(1, 2)  # B x n x Ck
    # eq. (1) up to -scale * ||q||^2, which is constant along a row and leaves the softmax unchanged
    sim = torch.bmm(q, memory_keys) * (2 * scale) - memory_key_sq.unsqueeze(1) * scale  # B x n x M
    objects, channels = value_rows.shape[2], value_rows.shape[3]
    rows = value_rows.flatten(2)  # B x M x N*C
    top = None
    if read_top_k:
        best, indices = sim.topk(max(read_top_k, comparator_top_k), dim=2)  # sorted: the comparator's is a prefix
        affinity = torch.softmax(best[..., :read_top_k], dim=2)  # eq. (2) over the k best positions
        flat_index = (indices[..., :read_top_k] + torch.arange(b).view(b, 1, 1) * rows.shape[1]).flatten()
        gathered = rows.flatten(0, 1).index_select(0, flat_index).view(b * h * w, read_top_k, -1)
        readout = torch.bmm(affinity.reshape(b * h * w, 1, read_top_k), gathered).view(b, h * w, -1)  # eq. (3)
        if comparator_top_k:
            top = best[..., :comparator_top_k]
    else:
        readout = torch.bmm(torch.softmax(sim, dim=2), rows)  # eq. (2), (3)
        if comparator_top_k:
            top = sim.topk(comparator_top_k, dim=2).values
    if top is not None:
        top = (top - q.pow(2).sum(2, keepdim=True) * scale).transpose(1, 2).reshape(b, -1, h, w)
    readout = readout.view(b, h, w, objects, channels).permute(0, 3, 4, 1, 2)
    return readout, top


def local_read_graph(query_key: Tensor, local_key: Tensor, local_value: Tensor, radius: int, scale: float,
                     top_k: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """LMR, eq. (4)-(5), on the plain local-window ops: (readout, affinity, top-k similarities or None)."""
    similarity = local_similarity_plain(query_key, local_key, radius, 1, scale)
    affinity = torch.softmax(similarity, dim=1)
    readout = local_weighted_sum_plain(affinity, local_value, radius)
    return readout, affinity, similarity.topk(top_k, dim=1).values if top_k else None


def sequential_keys_values_graph(local_key: Tensor, local_value: Tensor, coarse_affinity: Tensor,
                                 radius: int) -> tuple[Tensor, Tensor]:
    """SLMR, eq. (6)-(7): the stage-r key and value reorganised by the stage r+1 affinity (nearest x2, dilation 2)."""
    weights = F.interpolate(coarse_affinity, scale_factor=2.0, mode="nearest")
    return (local_weighted_sum_plain(weights, local_key, radius, dilation=2),
            local_weighted_sum_plain(weights, local_value, radius, dilation=2))


class ReadAndDecodeGraph(nn.Module):
    """`LMRC.read_and_decode` for one object group: GMR, LMR, SLMR, the comparator (eq. 9-10), the decoder and
    soft aggregation. Inputs and outputs as `read_and_decode_names(model)`; the memory's value is position-major
    (memory_value_rows 1 x M x N x Cv4) and the local values are 1 x N x C_r x Hr x Wr. read_top_k: the global
    read's top-k (None: every position), fixed in the graph."""

    def __init__(self, model: nn.Module, read_top_k: int | None) -> None:
        super().__init__()
        self.model = model
        self.read_top_k = read_top_k
        self.input_names = read_and_decode_names(model)[0]

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        x = dict(zip(self.input_names, inputs))
        model, cfg = self.model, self.model.config
        k = model.comparator_top_k
        keys = {r: x[f"key{r}"] for r in STAGES}
        n = x["memory_value_rows"].shape[2]
        readout, global_top = global_read_graph(keys[4], x["memory_keys"], x["memory_key_sq"], x["memory_value_rows"],
                                                cfg.scale, self.read_top_k, k)
        global_top_k = upsample_global_top_k(global_top) if k else {}
        parts: dict[int, list[Tensor]] = {r: [] for r in STAGES}
        affinity: dict[int, Tensor] = {}
        reliability: dict[str, Tensor] = {}
        for item in model.readouts:  # G4, L4, L3, L2, S3, S2 as the setting has them
            r = item.stage
            if item.kind == "G":
                parts[r].append(readout.flatten(1, 2))
                continue
            values = model.read_value(x[f"local_value{r}"], item).flatten(1, 2)
            if item.kind == "L":
                part, affinity[r], top = local_read_graph(keys[r], x[f"local_key{r}"], values, cfg.window_radius,
                                                          cfg.scale, k)
            else:
                key, value = sequential_keys_values_graph(x[f"local_key{r}"], values, affinity[r + 1], cfg.window_radius)
                part, _, top = local_read_graph(keys[r], key, value, cfg.window_radius, cfg.scale, k)  # eq. (8)
            if model.comparator is not None:
                reliability[item.name] = model.comparator.weights[item.name](top, global_top_k[r])  # eq. (9)
                part = part * reliability[item.name]  # eq. (10)
            parts[r].append(part)

        per_object = {r: fold_objects(parts[r], n) for r in STAGES}
        features = {r: x[f"features{r}"] for r in STAGES}
        logits = model.decoder(features, per_object, n)
        agg_logits, probs = soft_aggregate(logits)
        return (logits, agg_logits, probs, *(reliability[name] for name in reliability_names(model)))
