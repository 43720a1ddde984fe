"""The LMRC network (Fig. 2): encoders, GMR + LMR + SLMR, memory comparator, decoder, soft aggregation.

Training (`forward`) and inference (`lmrc.inference.Segmenter`) drive the same three methods:
`encode_key`, `encode_value`, `read_and_decode`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmrc.config import ModelConfig
from lmrc.inference.timing import stage
from lmrc.model.aggregate import soft_aggregate
from lmrc.model.comparator import MemoryComparator, upsample_global_top_k
from lmrc.model.decoder import Decoder
from lmrc.model.encoders import STAGES, KeyEncoder, ValueEncoder, build_trunks
from lmrc.model.memory_reads import ReadResult, global_memory_read, local_memory_read, sequential_local_memory_read
from lmrc.ops import local_window

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
    """logits B x N x H x W (per object), agg_logits / probs B x (N+1) x H x W (0 = background),
    reliability {"L4": B x 1 x H4 x W4, ...} from the memory comparator."""

    logits: Tensor
    agg_logits: Tensor
    probs: Tensor
    reliability: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class TrainingOutput:
    """The two predictions of a training sample and the query keys used by the scale loss (eq. 12)."""

    local_frame: SegmentOutput
    query_frame: SegmentOutput
    query_keys: dict[int, Tensor]


def readout_layout(config: ModelConfig) -> dict[int, list[str]]:
    """The readouts each decoder stage receives, in the order read_and_decode makes and concatenates them."""
    layout: dict[int, list[str]] = {r: [] for r in STAGES}
    layout[4].append("G4")
    for r in sorted(config.local_read_stages, reverse=True):
        layout[r].append(f"L{r}")
    for r in (3, 2) if config.sequential_local_read else ():
        layout[r].append(f"S{r}")
    return layout


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

        self.local_names = [f"L{r}" for r in config.local_read_stages]
        self.sequential_names = [f"S{r}" for r in (2, 3)] if config.sequential_local_read else []
        if config.sequential_local_read and not {2, 3, 4} <= set(config.local_read_stages):
            raise ValueError("SLMR at stages 2 and 3 needs LMR at stages 3 and 4")
        self.comparator = (
            MemoryComparator(self.local_names + self.sequential_names, config.comparator_top_k, config.scb_alpha)
            if config.memory_comparator
            else None
        )
        # per object and stage: the decoder's input channels, summed over the readouts of readout_layout
        readout_channels = {r: value_dims[r] * len(names) for r, names in readout_layout(config).items()}
        self.readout_channels = readout_channels
        self.decoder = Decoder(frame_channels, readout_channels, dict(zip(STAGES, config.decoder_dims)))
        # Stages where an inference copy moved the decoder's readout projections into the value encoder
        # (`lmrc.model.inference.project_values_before_reading`): their reads take projected channel groups.
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

    def _read_value(self, values: Tensor, r: int, name: str) -> Tensor:
        """The value B x N x C x Hr x Wr that read `name` (L3, S2, ...) takes from the local memory's V_r: all of it,
        or with projected values its own channel group, in the order of `readout_layout`."""
        if r not in self.projected_stages:
            return values
        c = self.read_value_channels(r)
        i = readout_layout(self.config)[r].index(name)
        return values[:, :, i * c: (i + 1) * c]

    def read_and_decode(self, query: FrameEncoding, memory: MemoryInput) -> SegmentOutput:
        cfg = self.config
        b, n = memory.global_values.shape[:2]
        k = cfg.comparator_top_k if self.comparator is not None else 0
        with stage("global_read"):
            glob = global_memory_read(
                query.keys[4],
                memory.global_keys,
                memory.global_values.flatten(1, 2),
                cfg.scale,
                read_top_k=None if self.training else cfg.global_read_top_k,
                comparator_top_k=k,
                # inference: similarity chunks of at most 4M entries (16 MB in fp32): faster than one big block
                # with a large memory (10 frames at 480p: 534 -> 448 ms), and bounded memory
                chunk_size=None if self.training else max(1, (1 << 22) // max(1, memory.global_keys.shape[-1])),
                memory_sq=memory.global_key_sq,
            )
        with stage("comparator"):
            global_top_k = upsample_global_top_k(glob.similarity_top_k) if k else {}

        readouts = _StageReadouts(self.readout_channels, n, direct=not torch.is_grad_enabled())
        readouts.add(4, glob.readout)
        # inference: the LMR/SLMR kernel applies the comparator's weight itself (eq. 9-10) and writes the readout
        # straight into its place in the decoder's input
        fuse = readouts.direct and self.comparator is not None and 0 < k <= (2 * cfg.window_radius + 1) ** 2
        reliability: dict[str, Tensor] = {}
        local: dict[int, ReadResult] = {}
        for r in sorted(cfg.local_read_stages, reverse=True):
            with stage("local_reads"):
                values = self._read_value(memory.local_values[r], r, f"L{r}")
                local[r] = local_memory_read(
                    query.keys[r], memory.local_keys[r], values.flatten(1, 2), cfg.window_radius,
                    cfg.scale, comparator_top_k=k,
                    # only SLMR at stage r - 1 reads this affinity (inference skips writing it otherwise)
                    keep_affinity=cfg.sequential_local_read and r - 1 in (2, 3),
                    readout_buffer=readouts.slot(r, values),
                    reliability=self._fused_reliability(f"L{r}", global_top_k) if fuse else None,
                )
            with stage("comparator"):
                self._weigh(readouts, f"L{r}", local[r], global_top_k, reliability)
        for r in (3, 2) if cfg.sequential_local_read else ():
            with stage("sequential_local_reads"):
                values = self._read_value(memory.local_values[r], r, f"S{r}")
                result = sequential_local_memory_read(
                    query.keys[r], memory.local_keys[r], values.flatten(1, 2), local[r + 1].affinity,
                    cfg.window_radius, cfg.scale, comparator_top_k=k, keep_affinity=False,
                    readout_buffer=readouts.slot(r, values),
                    reliability=self._fused_reliability(f"S{r}", global_top_k) if fuse else None,
                )
            with stage("comparator"):
                self._weigh(readouts, f"S{r}", result, global_top_k, reliability)

        with stage("decoder"):
            per_object = {r: readouts.folded(r) for r in STAGES}
            logits = self.decoder(query.features, per_object, n)
            agg_logits, probs = soft_aggregate(logits, memory.valid_objects)
        return SegmentOutput(logits, agg_logits, probs, reliability)

    def _weigh(self, readouts: "_StageReadouts", name: str, result: ReadResult, global_top_k: dict[int, Tensor],
               reliability: dict[str, Tensor]) -> None:
        r = int(name[1])
        if self.comparator is None:
            readouts.add(r, result.readout)
            return
        if result.reliability is not None:  # applied by the read itself (inference)
            reliability[name] = result.reliability
            readouts.add(r, result.readout)
            return
        if readouts.direct:  # eq. (10) written straight into the decoder's input: no weighed copy
            reliability[name] = self.comparator.weights[name](result.similarity_top_k, global_top_k[r])
            readouts.add(r, result.readout, reliability[name])
            return
        weighed, reliability[name] = self.comparator(name, result.readout, result.similarity_top_k, global_top_k[r])
        readouts.add(r, weighed)

    def _fused_reliability(self, name: str, global_top_k: dict[int, Tensor]) -> tuple[Tensor, Tensor, float, float]:
        """What a read needs to apply the comparator's reliability weight of readout `name` itself."""
        module = self.comparator.weights[name]
        return global_top_k[int(name[1])], module.conv.weight.reshape(-1), float(module.conv.bias), module.alpha

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


class _StageReadouts:
    """The readouts of each stage, folded for the decoder as B*N x sum(C_i) x h x w (objects into the batch).

    With autograd the parts are kept and concatenated at the end. Without (direct=True), each part is written into
    its channel slice of one buffer per stage (the reads write there themselves, see `slot`), with the comparator's
    reliability weight applied on the way (eq. 10): no weighed copy of a readout and no concatenation pass. On CPU the buffers are scratch
    buffers reused from frame to frame (`local_window.scratch`): the decoder consumes them within the call."""

    def __init__(self, channels: dict[int, int], objects: int, direct: bool) -> None:
        self.channels, self.objects, self.direct = channels, objects, direct
        self.parts: dict[int, list[Tensor]] = {r: [] for r in channels}
        self.buffers: dict[int, Tensor] = {}
        self.filled = {r: 0 for r in channels}

    def _buffer(self, r: int, b: int, h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        if r not in self.buffers:
            shape = (b, self.objects, self.channels[r], h, w)
            self.buffers[r] = (local_window.scratch(f"stage{r}", shape, dtype) if device.type == "cpu"
                               else torch.empty(shape, dtype=dtype, device=device))
        return self.buffers[r]

    def slot(self, r: int, values: Tensor) -> Tensor | None:
        """Direct on CPU: the B x N x C x h x w place of the next readout of these values (B x N x C x h x w) in the
        stage buffer, for the read to write into; else None."""
        if not self.direct or values.device.type != "cpu":
            return None
        b, n, c, h, w = values.shape
        dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
        buffer = self._buffer(r, b, h, w, dtype, values.device)
        start = self.filled[r]
        return buffer[:, :, start: start + c] if start + c <= self.channels[r] else None

    def add(self, r: int, readout: Tensor, weight: Tensor | None = None) -> None:
        """readout B x N*C x h x w (or the slot it was written into); weight B x 1 x h x w (direct only) multiplies it."""
        if not self.direct:
            self.parts[r].append(readout)
            return
        b, h, w = readout.shape[0], *readout.shape[-2:]
        per_object = readout if readout.dim() == 5 else readout.view(b, self.objects, -1, h, w)
        c = per_object.shape[2]
        dtype = readout.dtype if weight is None else torch.promote_types(readout.dtype, weight.dtype)
        buffer = self._buffer(r, b, h, w, dtype, readout.device)
        start = self.filled[r]
        if start + c > self.channels[r]:
            raise ValueError(f"stage {r} readouts exceed the {self.channels[r]} channels the decoder takes")
        dest = buffer[:, :, start: start + c]
        in_place = per_object.data_ptr() == dest.data_ptr() and per_object.stride() == dest.stride()
        if weight is not None:
            torch.mul(per_object, weight.unsqueeze(1), out=dest)
        elif not in_place:
            dest.copy_(per_object)
        self.filled[r] = start + c

    def folded(self, r: int) -> Tensor | None:
        if not self.direct:
            return _fold_objects(self.parts[r], self.objects)
        if r not in self.buffers:
            return None
        if self.filled[r] != self.channels[r]:
            raise ValueError(f"stage {r} readouts fill {self.filled[r]} of the {self.channels[r]} channels the decoder takes")
        return self.buffers[r].flatten(0, 1)


def _fold_objects(parts: list[Tensor], objects: int) -> Tensor | None:
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
