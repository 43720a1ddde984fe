"""The inference fast path: an inference copy of an LMRC network that gives the plain network's outputs (up to
float rounding) with less work per frame. `prepare_for_inference(model)` builds it; the caller's model keeps its
modules, state-dict keys, device, dtype and mode (weights saved from it load anywhere).

The copy (`InferenceLMRC`) differs from the plain network in two ways:
- rewritten modules (`lmrc.model.transforms`): BatchNorm folded into the convolutions, in-place activations,
  values projected to the decoder's width before reading; zero padding written into a kept buffer
  (`ReusedZeroPad2d`); encoders stored channels-last, which oneDNN runs faster on CPUs (depthwise convs about
  2.5x, dense 3x3 convs 5-10%); on a CPU every convolution packed for oneDNN with its activation and residual sum
  fused (`lmrc.inference.packed_conv`), keys handed to the reads as float32 NCHW, the local reads' values left
  channels-last; optionally
  `torch.compile`d encoders and decoder instead of packed ones;
- its own `read_and_decode`: the native local-window kernels' inference entry points (no similarity written,
  the affinity only where SLMR reads it, the comparator's top-k in the same pass), the memory comparator's weight
  applied inside the LMR/SLMR kernel (eq. 9-10), every readout added straight into its decoder stage's
  channels-last sum from channels-last values (`DecoderSum`; or into its channel slice of an NCHW decoder input,
  `DecoderInputs`): no weighed copy, no concatenation, no layout pass; the global read in bounded chunks, and the
  objects' probabilities aggregated as normalised odds (no aggregated logits).
All reused buffers belong to the copy's `Workspace`, its stage timer is its `StageTimer`: no state outside it.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmrc.model.aggregate import upsample_soft_aggregate
from lmrc.model.comparator import upsample_global_top_k
from lmrc.model.encoders import STAGES, LightValueTrunk
from lmrc.model.memory_reads import ReadResult, global_memory_read, pad_top_k
from lmrc.model.network import LMRC, FrameEncoding, MemoryInput, SegmentOutput
from lmrc.model.readouts import Readout, stage_readouts
from lmrc.inference.packed_conv import (PackedDecoderStage, PointwiseFusionNCHW, pack_convolutions,
                                       packed_convolutions_available)
from lmrc.model.transforms import (ReadoutGroupSum, fold_batch_norms, inplace_activations,
                                   project_values_before_reading)
from lmrc.ops import local_window
from lmrc.ops.layout import add_nchw_groups_to_nhwc
from lmrc.utils.timing import StageTimer
from lmrc.utils.workspace import Workspace

# global read: similarity chunks of at most 4M entries (16 MB in fp32): faster than one big block with a large
# memory (10 frames at 480p: 534 -> 448 ms), and bounded memory
GLOBAL_READ_CHUNK_ENTRIES = 1 << 22


class ReusedZeroPad2d(nn.Module):
    """nn.ZeroPad2d whose output is a workspace buffer: the zero border is written once, each call only copies the
    input into the interior. EfficientNet's stride-2 convs pad asymmetrically (TF 'same'), and allocating and
    zero-filling a fresh 40 MB tensor for that at 480p cost more than the convolution after it. The result is
    overwritten by the next call: only for a consumer that uses it at once (the conv it belongs to)."""

    def __init__(self, padding: tuple[int, int, int, int], workspace: Workspace, name: str) -> None:
        super().__init__()
        self.padding = tuple(padding)  # left, right, top, bottom as nn.ZeroPad2d
        self.workspace, self.name = workspace, name

    def forward(self, x: Tensor) -> Tensor:
        left, right, top, bottom = self.padding
        h, w = x.shape[-2:]
        shape = (*x.shape[:-2], h + top + bottom, w + left + right)
        layout = torch.channels_last if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format
        out = self.workspace.buffer(self.name, shape, x.dtype, x.device, layout, zero=True)
        out[..., top: top + h, left: left + w].copy_(x)
        return out


def fast_local_memory_read(query_key: Tensor, local_key: Tensor, local_value: Tensor, radius: int, scale: float, *,
                           comparator_top_k: int = 0, keep_affinity: bool = True, out: Tensor | None = None,
                           reliability: tuple[Tensor, Tensor, float, float] | None = None,
                           sink: dict | None = None) -> ReadResult:
    """`local_memory_read` (LMR, eq. 4-5) by the native inference kernel: the affinity only when `keep_affinity`
    (else ReadResult.affinity is None), the readout written into `out` when it fits (ReadResult.readout is then
    `out`); reliability = (global top-k, comparator 1x1 conv weights, bias, alpha): the comparator's weight applied
    in the same kernel (ReadResult.reliability; None where the kernel could not, the caller then weighs).
    sink: `local_attention_inference`'s out / accumulate / relu_out, instead of `out` (`DecoderSum.sink`)."""
    k = comparator_top_k
    readout, affinity, top, weight = local_window.local_attention_inference(
        query_key, local_key, local_value, radius, scale=scale, top_k=k, affinity=keep_affinity,
        reliability=reliability, **(sink or {"out": out}),
    )
    return ReadResult(readout, pad_top_k(top, k, 1) if k else None, affinity, weight)


def fast_sequential_local_memory_read(
    query_key: Tensor, local_key: Tensor, local_value: Tensor, coarse_affinity: Tensor, radius: int, scale: float,
    workspace: Workspace, *, comparator_top_k: int = 0, out: Tensor | None = None,
    reliability: tuple[Tensor, Tensor, float, float] | None = None, sink: dict | None = None,
) -> ReadResult:
    """`sequential_local_memory_read` (SLMR, eq. 6-8): eq. (6) and (7) in one kernel pass that reads the coarse
    weights directly (no upsampled copy), into `workspace` buffers (the reorganised key and value live only during
    this call; a channels-last value gives a channels-last one); out, reliability, sink as in
    `fast_local_memory_read`. The affinity is not kept."""
    h, w = query_key.shape[-2:]
    upsample = 2 if (coarse_affinity.shape[-2] * 2, coarse_affinity.shape[-1] * 2) == (h, w) else 1
    weights = coarse_affinity if upsample == 2 else F.interpolate(coarse_affinity, size=(h, w), mode="nearest")
    buffers = [_like_buffer(workspace, f"slmr{i}", t) for i, t in enumerate((local_key, local_value))]
    sequential_key, sequential_value = local_window.local_weighted_sums_inference(
        weights, [local_key, local_value], radius, dilation=2, upsample=upsample, out=buffers
    )  # eq. (6), (7)
    return fast_local_memory_read(query_key, sequential_key, sequential_value, radius, scale,
                                  comparator_top_k=comparator_top_k, keep_affinity=False, out=out,
                                  reliability=reliability, sink=sink)  # eq. (8)


def _channels_last_value(t: Tensor) -> bool:
    """A B x N x C x H x W value whose objects' channels are contiguous at each pixel (the value encoder's
    channels-last stages)."""
    return t.dim() == 5 and t.stride(2) == 1 and t.shape[2] > 1


def _like_buffer(workspace: Workspace, name: str, t: Tensor) -> Tensor:
    """A float workspace buffer of t's shape, channels-last (H x W x N x C in memory) when t is."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    if _channels_last_value(t):
        b, n, c, h, w = t.shape
        return workspace.buffer(name, (b, h, w, n, c), dtype, t.device).permute(0, 3, 4, 1, 2)
    return workspace.buffer(name, t.shape, dtype, t.device)


class DecoderInputs:
    """The readouts of each stage written into their channel slices of one workspace buffer per stage
    (B x N x C x h x w, objects folded into the batch for the decoder), with the comparator's weight applied on
    the way (eq. 10): no weighed copy of a readout and no concatenation pass. The native reads write into their
    slice themselves (`slot`). The buffers are consumed by the decoder within the call."""

    def __init__(self, channels: dict[int, int], objects: int, workspace: Workspace) -> None:
        self.channels, self.objects, self.workspace = channels, objects, workspace
        self.buffers: dict[int, Tensor] = {}
        self.filled = {r: 0 for r in channels}

    def _buffer(self, r: int, b: int, h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        if r not in self.buffers:
            shape = (b, self.objects, self.channels[r], h, w)
            self.buffers[r] = self.workspace.buffer(f"stage{r}", shape, dtype, device)
        return self.buffers[r]

    def slot(self, r: int, values: Tensor) -> Tensor | None:
        """On CPU (where the native kernels write it): the B x N x C x h x w place of the next readout of these
        values (B x N x C x h x w) in the stage buffer; else None."""
        if values.device.type != "cpu":
            return None
        b, n, c, h, w = values.shape
        dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
        buffer = self._buffer(r, b, h, w, dtype, values.device)
        start = self.filled[r]
        return buffer[:, :, start: start + c] if start + c <= self.channels[r] else None

    def add(self, r: int, readout: Tensor, weight: Tensor | None = None) -> None:
        """readout B x N*C x h x w (or the slot it was written into); weight B x 1 x h x w multiplies it."""
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
        if r not in self.buffers:
            return None
        if self.filled[r] != self.channels[r]:
            raise ValueError(f"stage {r} readouts fill {self.filled[r]} of the {self.channels[r]} channels the decoder takes")
        return self.buffers[r].flatten(0, 1)


class StageInputs:
    """Stage r of a `DecoderInputs`, with `DecoderSum`'s interface."""

    def __init__(self, inputs: DecoderInputs, r: int) -> None:
        self.inputs, self.r = inputs, r

    def sink(self, values: Tensor, weighed: bool = True) -> dict:
        return {"out": self.inputs.slot(self.r, values)}  # `add` weighs a slot in place

    def add(self, readout: Tensor, weight: Tensor | None = None) -> None:
        self.inputs.add(self.r, readout, weight)


class DecoderSum:
    """One decoder stage's input on a CPU with a packed decoder: the stage's frame and coarser terms
    (`PackedDecoderStage.start`, B*N x C x h x w float32 channels-last) to which each readout is added in place, in
    the readout layout's order, and relu(sum) for the residual block written by the last one. A read of a
    channels-last value adds its readout there itself (`sink`); other readouts (NCHW) are added by a tiled
    transpose. No per-stage buffer of readouts, no pass to sum them."""

    def __init__(self, stage: PackedDecoderStage, frame: Tensor, coarser: Tensor | None, objects: int,
                 reads: int) -> None:
        self.stage, self.objects, self.left = stage, objects, reads
        self.sum = stage.start(frame, coarser, objects)
        self.activated = stage.activated_buffer(self.sum) if reads else None

    def _per_object(self, t: Tensor | None) -> Tensor | None:
        return None if t is None else t.view(-1, self.objects, *t.shape[1:])

    def sink(self, values: Tensor, weighed: bool = True) -> dict | None:
        """Where a native read of these values (B x N x C x h x w) puts its readout: into the sum, when they are
        channels-last and the read applies the comparator's weight itself (`weighed`; else None: the read writes
        its own tensor, then `add`)."""
        if not weighed or values.device.type != "cpu" or not _channels_last_value(values):
            return None
        return {"out": self._per_object(self.sum), "accumulate": True,
                "relu_out": self._per_object(self.activated) if self.left == 1 else None}

    def add(self, readout: Tensor, weight: Tensor | None = None) -> None:
        """readout: B x N*C x h x w, or the sum itself (a sink read, already added); weight B x 1 x h x w."""
        self.left -= 1
        if readout.data_ptr() == self.sum.data_ptr():
            return
        b, h, w = readout.shape[0], *readout.shape[-2:]
        groups = readout.reshape(b, self.objects, 1, -1, h, w)
        if weight is not None:
            groups = groups * weight.view(b, 1, 1, 1, h, w)
        add_nchw_groups_to_nhwc(self.sum, groups.flatten(0, 1).float().contiguous(),
                                self.activated if self.left == 0 else None)

    def finish(self, relu: bool = False) -> Tensor:
        """The stage's output (relu: its ReLU, in the convs' dtype)."""
        if self.left:
            raise ValueError(f"{self.left} readouts of the stage were not added")
        return self.stage.finish(self.sum, self.activated, relu=relu)


class InferenceLMRC(LMRC):
    """An LMRC network prepared for inference (built by `prepare_for_inference`, never constructed directly):
    the same modules and three methods, with the fused `read_and_decode` described in the module docstring."""

    workspace: Workspace
    timer: StageTimer
    decoder_sums: bool  # the reads add into the packed decoder's channels-last sums (`DecoderSum`)

    def read_and_decode(self, query: FrameEncoding, memory: MemoryInput, read_top_k: int | None = None) -> SegmentOutput:
        cfg, timer = self.config, self.timer
        n = memory.global_values.shape[1]
        k = self.comparator_top_k
        with timer.stage("global_read"):
            glob = global_memory_read(
                query.keys[4], memory.global_keys, memory.global_values.flatten(1, 2), cfg.scale,
                read_top_k=read_top_k, comparator_top_k=k, memory_sq=memory.global_key_sq,
                chunk_size=max(1, GLOBAL_READ_CHUNK_ENTRIES // max(1, memory.global_keys.shape[-1])),
            )
        with timer.stage("comparator"):
            global_top_k = upsample_global_top_k(glob.similarity_top_k) if k else {}
        fuse = self.comparator is not None and 0 < k <= (2 * cfg.window_radius + 1) ** 2
        reliability: dict[str, Tensor] = {}
        affinity: dict[int, Tensor] = {}
        stagewise = self.decoder_sums
        inputs = None if stagewise else DecoderInputs(self.readout_channels, n, self.workspace)
        x = None
        for r in sorted(STAGES, reverse=True):  # the readout layout's order per stage; S_r reads L_{r+1}'s affinity
            stage_reads = stage_readouts(self.readouts, r)
            if stagewise:
                with timer.stage("decoder"):
                    target = DecoderSum(getattr(self.decoder, f"stage{r}"), query.features[r], x, n, len(stage_reads))
            else:
                target = StageInputs(inputs, r)
            for readout in stage_reads:
                if readout.kind == "G":
                    target.add(glob.readout)
                    continue
                values = self.read_value(memory.local_values[r], readout)
                weight = self._fused_weight(readout, global_top_k) if fuse else None
                place = target.sink(values, weighed=weight is not None or self.comparator is None)
                if readout.kind == "L":
                    with timer.stage("local_reads"):
                        # only SLMR at stage r - 1 reads this affinity (the kernel skips writing it otherwise)
                        result = fast_local_memory_read(
                            query.keys[r], memory.local_keys[r], values, cfg.window_radius, cfg.scale,
                            comparator_top_k=k, keep_affinity=cfg.sequential_local_read and r - 1 in (2, 3),
                            reliability=weight, sink=place)
                    affinity[r] = result.affinity
                else:
                    with timer.stage("sequential_local_reads"):
                        result = fast_sequential_local_memory_read(
                            query.keys[r], memory.local_keys[r], values, affinity[r + 1], cfg.window_radius,
                            cfg.scale, self.workspace, comparator_top_k=k, reliability=weight, sink=place)
                with timer.stage("comparator"):
                    self._weigh(target, readout, result, global_top_k, reliability)
            if stagewise:
                with timer.stage("decoder"):
                    x = target.finish(relu=r == 2)  # stage 2's output is only read through its ReLU
        with timer.stage("decoder"):
            if not stagewise:
                x = self.decoder.stages(query.features, {r: inputs.folded(r) for r in STAGES}, n)
            # the x4 upsampling and the objects' aggregation in one pass at the input's resolution (CPU)
            low = self.decoder.coarse_logits(x, n, activated=stagewise)
            logits, probs = upsample_soft_aggregate(low, memory.valid_objects)
        return SegmentOutput(logits, None, probs, reliability)  # aggregated logits: only training reads them

    def _fused_weight(self, readout: Readout, global_top_k: dict[int, Tensor]) -> tuple[Tensor, Tensor, float, float]:
        """What a read needs to apply the comparator's reliability weight of `readout` itself."""
        module = self.comparator.weights[readout.name]
        return global_top_k[readout.stage], module.conv.weight.reshape(-1), float(module.conv.bias), module.alpha

    def _weigh(self, target: StageInputs | DecoderSum, readout: Readout, result: ReadResult,
               global_top_k: dict[int, Tensor], reliability: dict[str, Tensor]) -> None:
        """Eq. (10) into the decoder's input: applied by the read itself, or here on the way into it."""
        r, name = readout.stage, readout.name
        if self.comparator is not None and result.reliability is None:
            reliability[name] = self.comparator.weights[name](result.similarity_top_k, global_top_k[r])
            target.add(result.readout, reliability[name])
            return
        if result.reliability is not None:
            reliability[name] = result.reliability
        target.add(result.readout)


def _reuse_padding(model: nn.Module, workspace: Workspace) -> int:
    replaced = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ZeroPad2d):
                setattr(module, name, ReusedZeroPad2d(child.padding, workspace, f"pad{replaced}"))
                replaced += 1
    return replaced


def prepare_for_inference(model: LMRC, *, fold: bool = True, channels_last: bool = True, project_values: bool = True,
                          pack: bool = True, compile: bool = False, device: torch.device | str | None = None,
                          dtype: torch.dtype | None = None, timer: StageTimer | None = None,
                          value_products: bool | None = None, readouts_into_decoder: bool = True) -> InferenceLMRC:
    """An inference copy of `model` (see the module docstring) in eval mode without gradients, on `device`
    (default: the model's); `timer` (default: a new one) times its stages. value_products: a CPU copy with 1x1
    value fusion writes its NCHW values from matrix products (`PointwiseFusionNCHW`); None: when it computes in
    float32 (in bf16 the AMX convolutions are faster, docs/PERFORMANCE.md). readouts_into_decoder: a CPU copy
    with channels-last encoders and packed decoder keeps the local reads' values channels-last and adds their
    readouts into the decoder's sums (`DecoderSum`); False: NCHW values and readouts, transposed on the way."""
    prepared = copy.deepcopy(model)
    prepared.__class__ = InferenceLMRC  # same modules and state; the fused read_and_decode
    prepared.workspace = Workspace()
    prepared.timer = timer if timer is not None else StageTimer()
    prepared.eval().requires_grad_(False)
    if device is not None:
        prepared.to(device)
    weights = next(prepared.parameters())
    # keys only where a read takes them: the global read (stage 4) and the local reads' stages
    prepared.key_encoder.key_stages = tuple(sorted({4, *prepared.config.local_read_stages}))
    if project_values:
        project_values_before_reading(prepared)
    if fold:
        for encoder in (prepared.key_encoder, prepared.value_encoder):
            fold_batch_norms(encoder)
            inplace_activations(encoder)
        _reuse_padding(prepared, prepared.workspace)
    if channels_last:
        prepared.key_encoder.to(memory_format=torch.channels_last)
        prepared.value_encoder.to(memory_format=torch.channels_last)
        if weights.device.type == "cpu":
            # keys and values leave the encoders NCHW in the weights' dtype (float32, also under bf16 autocast),
            # widened in the transpose they need anyway: the CPU memory reads then read float32, 8 ms faster per lite F
            # frame than bf16 on a 2-core Xeon (benchmarks/inference_copy.py)
            prepared.key_encoder.nchw_dtype = prepared.value_encoder.nchw_dtype = weights.dtype
            # values of the local reads' stages stay channels-last in the convolutions' dtype: the native reads take
            # them so (bf16 as it is) and add their readouts into the decoder's channels-last sums (`DecoderSum`), no
            # transposing pass either way; bf16 and float32 values cost the same per frame here (2-core Xeon,
            # benchmarks/inference_copy.py), bf16 halves the local memory
            if readouts_into_decoder:
                prepared.value_encoder.channels_last_stages = (2, 3)
    if value_products is None:
        value_products = dtype in (None, torch.float32) and weights.dtype == torch.float32
    if (value_products and channels_last and not compile and weights.device.type == "cpu"
            and prepared.config.value_fusion_kernel == 1):
        encoder = prepared.value_encoder
        encoder.fuse_to_nchw = nn.ModuleDict({f"r{r}": PointwiseFusionNCHW(encoder.fuse_mask[f"r{r}"],
                                                                           encoder.fuse_frame[f"r{r}"])
                                              for r in STAGES if r not in encoder.channels_last_stages})
    if (pack and fold and not compile and weights.dtype == torch.float32
            and packed_convolutions_available(weights.device)):  # oneDNN packs fp32 / bf16 (not float64)
        for part in (prepared.key_encoder, prepared.value_encoder, prepared.decoder):
            pack_convolutions(part, dtype or torch.float32)
        trunk = prepared.value_encoder.trunk
        if isinstance(trunk, LightValueTrunk) and trunk.reads_image:  # its first conv: ~1 ms faster per frame
            trunk.input_dtype = dtype or torch.float32
        elif isinstance(trunk, LightValueTrunk):  # the first conv natively from the masks (lmrc.ops.mask_conv)
            trunk.stem_from_masks_dtype = dtype or torch.float32
    # packed decoder stages (CPU) that sum their readout groups: the reads can add into their sums
    prepared.decoder_sums = readouts_into_decoder and all(
        isinstance(stage, PackedDecoderStage) and isinstance(stage.readout_conv, (ReadoutGroupSum, type(None)))
        for stage in (getattr(prepared.decoder, f"stage{r}") for r in STAGES))
    if compile:
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        prepared.key_encoder = torch.compile(prepared.key_encoder, dynamic=False)
        prepared.value_encoder = torch.compile(prepared.value_encoder, dynamic=False)
        prepared.decoder = torch.compile(prepared.decoder, dynamic=False)
    return prepared
