"""The LMRC network (Fig. 2): encoders, GMR + LMR + SLMR, memory comparator, decoder, soft aggregation.

Training (`forward`) and inference (`lmrc.inference.Segmenter`) drive the same three methods:
`encode_key`, `encode_value`, `read_and_decode`. This `read_and_decode` is the paper's network written plainly,
one function per equation: training uses it, and it is the reference the inference fast path
(`lmrc.inference.fast_path`, installed by `prepare_for_inference`) is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmrc.config import ModelConfig
from lmrc.model.aggregate import soft_aggregate
from lmrc.model.comparator import MemoryComparator, upsample_global_top_k
from lmrc.model.decoder import Decoder
from lmrc.model.encoders import STAGES, KeyEncoder, ValueEncoder, build_trunks
from lmrc.model.memory_reads import global_memory_read, local_memory_read, sequential_local_memory_read
from lmrc.model.readouts import Readout, readout_layout, stage_readouts
from lmrc.utils.timing import stage

STRIDE = 16  # input sides must be multiples of the coarsest stage's stride


@dataclass
class FrameEncoding:
    """keys {r: B x Ck x Hr x Wr} and frame features F_r {r: B x Cf_r x Hr x Wr} of one frame."""

    keys: dict[int, Tensor]
    features: dict[int, Tensor]


@dataclass
class MemoryInput:
    """What a query reads. global_keys B x Ck x M and global_values B x N x Cv4 x M (M = T*H4*W4 positions);
    local_keys {r: B x Ck x Hr x Wr} and local_values {r: B x N x Cv_r x Hr x Wr} of the previous frame;
    valid_objects B x N (False for padding objects); global_key_sq B x M: ||global key||^2 per position when the
    caller keeps it (the memory bank computes it once per memory frame), else computed per read."""

    global_keys: Tensor
    global_values: Tensor
    local_keys: dict[int, Tensor]
    local_values: dict[int, Tensor]
    valid_objects: Tensor | None = None
    global_key_sq: Tensor | None = None


@dataclass
class SegmentOutput:
    """logits B x N x H x W (per object), agg_logits / probs B x (N+1) x H x W (0 = background; the inference
    fast path leaves agg_logits None), reliability {"L4": B x 1 x H4 x W4, ...} from the memory comparator."""

    logits: Tensor
    agg_logits: Tensor | None
    probs: Tensor
    reliability: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class TrainingOutput:
    """The two predictions of a training sample and the query keys used by the scale loss (eq. 12)."""

    local_frame: SegmentOutput
    query_frame: SegmentOutput
    query_keys: dict[int, Tensor]


class LMRC(nn.Module):
    """Local Memory Read-and-Comparator network; `config.setting` (A-F) selects the reads of Table 4."""

    def __init__(self, config: ModelConfig, pretrained_backbone: bool = True) -> None:
        super().__init__()
        self.config = config
        key_trunk, value_trunk = build_trunks(config.backbone, pretrained_backbone, config.value_trunk)
        frame_channels = dict(key_trunk.channels)
        self.key_encoder = KeyEncoder(key_trunk, config.key_dim)
        self.value_encoder = ValueEncoder(value_trunk, frame_channels, config.value_dims, config.value_fusion_kernel)
        value_dims = dict(zip(STAGES, config.value_dims))

        if config.sequential_local_read and not {2, 3, 4} <= set(config.local_read_stages):
            raise ValueError("SLMR at stages 2 and 3 needs LMR at stages 3 and 4")
        self.readouts: list[Readout] = readout_layout(config)
        compared = sorted(readout.name for readout in self.readouts if readout.compared)
        self.comparator = (
            MemoryComparator(compared, config.comparator_top_k, config.scb_alpha) if config.memory_comparator else None
        )
        # per object and stage: the decoder's input channels, summed over the stage's readouts
        self.readout_channels = {r: value_dims[r] * len(stage_readouts(self.readouts, r)) for r in STAGES}
        self.decoder = Decoder(frame_channels, self.readout_channels, dict(zip(STAGES, config.decoder_dims)))
        # Stages where an inference copy moved the decoder's readout projections into the value encoder
        # (`lmrc.model.transforms.project_values_before_reading`): their reads take projected channel groups.
        self.projected_stages: set[int] = set()

    # --- the three steps shared by training and inference -------------------------------------------------

    def encode_key(self, image: Tensor) -> FrameEncoding:
        """image B x 3 x H x W, RGB in [0, 1], H and W multiples of 16."""
        keys, features = self.key_encoder(image)
        return FrameEncoding(keys, features)

    def encode_value(
        self, image: Tensor, frame: FrameEncoding, masks: Tensor, stages: tuple[int, ...] = STAGES
    ) -> dict[int, Tensor]:
        """masks B x N x H x W soft object probabilities -> {r: B x N x Cv_r x Hr x Wr}."""
        return self.value_encoder(image, frame.features, masks, stages)

    def read_value_channels(self, r: int) -> int:
        """Channels of the value each read at stage r takes: C^v_r, or the decoder's width where projected."""
        return self.config.decoder_dims[r - 2] if r in self.projected_stages else self.config.value_dims[r - 2]

    def global_memory_value(self, value: Tensor) -> Tensor:
        """What the global memory keeps of a stage-4 value B x N x C x H4 x W4: all of it, or with projected values
        the global read's own channel group (a view)."""
        return value[:, :, : self.read_value_channels(4)]

    @property
    def comparator_top_k(self) -> int:
        """k of the memory comparator (eq. 9), 0 without one."""
        return self.config.comparator_top_k if self.comparator is not None else 0

    def read_value(self, values: Tensor, readout: Readout) -> Tensor:
        """The value B x N x C x Hr x Wr that `readout` takes from the local memory's V_r: all of it, or with
        projected values its own channel group, in the order of the readout layout."""
        r = readout.stage
        if r not in self.projected_stages:
            return values
        c = self.read_value_channels(r)
        i = stage_readouts(self.readouts, r).index(readout)
        return values[:, :, i * c: (i + 1) * c]

    def read_and_decode(self, query: FrameEncoding, memory: MemoryInput, read_top_k: int | None = None) -> SegmentOutput:
        """Every read of the readout layout, each local one weighed by the memory comparator, then the decoder and
        soft aggregation. read_top_k: the global read keeps each query's k best memory matches (an inference
        choice, `InferenceConfig.top_k`); None reads every position (eq. 2, and training)."""
        cfg = self.config
        n = memory.global_values.shape[1]
        k = self.comparator_top_k
        with stage("global_read"):
            glob = global_memory_read(query.keys[4], memory.global_keys, memory.global_values.flatten(1, 2), cfg.scale,
                                      read_top_k=read_top_k, comparator_top_k=k, memory_sq=memory.global_key_sq)
        global_top_k = upsample_global_top_k(glob.similarity_top_k) if k else {}
        parts: dict[int, list[Tensor]] = {r: [] for r in STAGES}
        affinity: dict[int, Tensor] = {}
        reliability: dict[str, Tensor] = {}
        for readout in self.readouts:
            r = readout.stage
            if readout.kind == "G":
                parts[r].append(glob.readout)
                continue
            values = self.read_value(memory.local_values[r], readout).flatten(1, 2)
            if readout.kind == "L":
                with stage("local_reads"):
                    result = local_memory_read(query.keys[r], memory.local_keys[r], values, cfg.window_radius,
                                               cfg.scale, comparator_top_k=k)
                affinity[r] = result.affinity
            else:
                with stage("sequential_local_reads"):
                    result = sequential_local_memory_read(query.keys[r], memory.local_keys[r], values, affinity[r + 1],
                                                          cfg.window_radius, cfg.scale, comparator_top_k=k)
            part = result.readout
            if self.comparator is not None:
                with stage("comparator"):  # eq. (9)-(10)
                    part, reliability[readout.name] = self.comparator(readout.name, part, result.similarity_top_k,
                                                                      global_top_k[r])
            parts[r].append(part)
        with stage("decoder"):
            logits = self.decoder(query.features, {r: fold_objects(parts[r], n) for r in STAGES}, n)
            agg_logits, probs = soft_aggregate(logits, memory.valid_objects)
        return SegmentOutput(logits, agg_logits, probs, reliability)

    # --- training pass ------------------------------------------------------------------------------------

    def forward(self, images: Tensor, first_masks: Tensor, valid_objects: Tensor | None = None) -> TrainingOutput:
        """One training sample as at test time (Section III-E-2).

        images B x 3 x 3 x H x W: frames (global memory g, local memory l, query q); first_masks B x N x H x W:
        ground truth of g. g is both memories when predicting l (as the first frame is at inference); l's value
        is then encoded from its own soft prediction, so gradients flow through it, and q reads g (global) and
        l (local).
        """
        b = images.shape[0]
        frames = self.encode_key(images.flatten(0, 1))
        enc = [FrameEncoding({r: x.view(b, 3, *x.shape[1:])[:, i] for r, x in frames.keys.items()},
                             {r: x.view(b, 3, *x.shape[1:])[:, i] for r, x in frames.features.items()}) for i in range(3)]
        g_values = self.encode_value(images[:, 0], enc[0], first_masks)
        g_memory = MemoryInput(
            enc[0].keys[4].flatten(2), g_values[4].flatten(3), enc[0].keys, g_values, valid_objects
        )
        local_out = self.read_and_decode(enc[1], g_memory)
        l_values = self.encode_value(images[:, 1], enc[1], local_out.probs[:, 1:].to(images.dtype))
        q_memory = MemoryInput(g_memory.global_keys, g_memory.global_values, enc[1].keys, l_values, valid_objects)
        query_out = self.read_and_decode(enc[2], q_memory)
        return TrainingOutput(local_out, query_out, enc[2].keys)


def fold_objects(parts: list[Tensor], objects: int) -> Tensor | None:
    """[B x N*C_i x h x w, ...] -> B*N x sum(C_i) x h x w (objects folded into the batch for the decoder)."""
    if not parts:
        return None
    per_object = [p.view(p.shape[0], objects, -1, *p.shape[-2:]) for p in parts]
    x = torch.cat(per_object, 2)
    return x.flatten(0, 1)


def pad_to_multiple(x: Tensor, multiple: int = STRIDE) -> tuple[Tensor, tuple[int, int, int, int]]:
    """Pad the last two dims to multiples of `multiple`, split evenly (as STCN); returns (padded, (l, r, t, b))."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    if ph == 0 and pw == 0:
        return x, pads
    return F.pad(x, pads), pads


def crop_padding(x: Tensor, pads: tuple[int, int, int, int]) -> Tensor:
    """Undo `pad_to_multiple` on the last two dims."""
    left, right, top, bottom = pads
    h, w = x.shape[-2:]
    return x[..., top: h - bottom, left: w - right]
