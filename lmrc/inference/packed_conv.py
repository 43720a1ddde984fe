"""Convolutions packed once for oneDNN, with the activation (and a residual sum) applied inside them: the
inference copy's encoders and decoder on a CPU.

Under autocast every call casts the fp32 weight to bf16 and oneDNN reorders it into its blocked layout again, and
each ReLU6 or residual sum is one more pass over a large activation. Packing the weight once, in the precision the
copy runs in, and giving oneDNN the activation and the sum as post-ops removes both: on a 2-core Xeon with AMX
lmrc-lite F went 113 -> 91 ms per 480p frame in bf16 (docs/PERFORMANCE.md, `benchmarks/inference_copy.py`). The
results equal the plain modules' up to float rounding in fp32 and autocast's up to bf16 rounding (a fused sum is
rounded once, not twice) (tested).

Only the module types whose forward is known are rewritten (EfficientNet-Lite blocks, `LightValueTrunk`'s
conv + ReLU pairs, the decoder's residual blocks, plain convolutions); anything else keeps its modules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmrc.model.decoder import DecoderStage, ResidualBlock
from lmrc.model.encoders import EfficientNetLite0Trunk, contiguous_nchw
from lmrc.model.transforms import ReadoutGroupSum
from lmrc.ops.layout import add_nchw_groups_to_nhwc

# activation name -> oneDNN post-op name and its scalars
_POST_OPS = {"none": ("none", []), "relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0])}


def packed_convolutions_available(device: torch.device) -> bool:
    """oneDNN's fused convolution runs here (a CPU build of PyTorch with oneDNN)."""
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


class PackedConv2d(nn.Module):
    """`conv` (its own padding module included) followed by `activation`, with weights packed in `dtype`.

    forward(x, residual) = activation(conv(x) + residual); the output is in `dtype`. Not trainable, not saved: the
    inference copy is rebuilt from the model's state dict.
    """

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype, activation: str = "none") -> None:
        super().__init__()
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(f"PackedConv2d takes numeric zero padding, not {conv.padding!r} / {conv.padding_mode}")
        weight, padding = conv.weight.detach(), list(conv.padding)
        pad = getattr(conv, "static_padding", None)  # EfficientNet's TF-style asymmetric padding, if any
        self.pad = pad if isinstance(pad, nn.Module) else nn.Identity()
        sides = getattr(pad, "padding", None)
        if sides is not None and padding == [0, 0] and conv.dilation == (1, 1) and sides[1] >= sides[0] \
                and sides[3] >= sides[2]:
            weight, padding = _absorb_padding(weight, *sides)
            self.pad = nn.Identity()
        self.dtype = dtype
        self.geometry = (padding, list(conv.stride), list(conv.dilation), conv.groups)
        self.post_op, self.scalars = _POST_OPS[activation]
        self.weight = weight.to(dtype)
        self.bias = None if conv.bias is None else conv.bias.detach().to(dtype)
        self.shape = tuple(conv.weight.shape)
        # oneDNN picks its weight layout for the input's shape: packed for another shape, the weight would be
        # reordered again on every call (measured: 1.7 ms of a 0.09 ms conv). A video has one shape at each stage.
        self._packed: dict[tuple[int, ...], Tensor] = {}

    def packed_weight(self, shape: tuple[int, ...]) -> Tensor:
        weight = self._packed.get(shape)
        if weight is None:
            if len(self._packed) >= 4:  # another video size: forget the old ones
                self._packed.clear()
            weight = self._packed[shape] = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, *self.geometry, list(shape))
        return weight

    def extra_repr(self) -> str:
        return f"{self.shape}, {self.dtype}, post_op={self.post_op}"

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        x = self.pad(x).to(self.dtype)
        weight = self.packed_weight(tuple(x.shape))
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, self.bias, *self.geometry, self.post_op, self.scalars, "")
        fused = self.post_op == "relu"  # the only activation oneDNN's binary fusion takes here
        y = torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual.to(self.dtype), weight, self.bias, *self.geometry, "add", 1.0,
            "relu" if fused else None, [], None)
        return y if fused or self.post_op == "none" else y.clamp_(*self.scalars)

    def sum_relu(self, x: Tensor, residual: Tensor) -> Tensor:
        """relu(conv(x) + residual) in `dtype`, in one oneDNN call (residual rounded to `dtype` first); the conv must
        have no activation of its own."""
        if self.post_op != "none":
            raise ValueError("sum_relu applies the ReLU after the sum: the conv must have no activation")
        x = self.pad(x).to(self.dtype)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual.to(self.dtype), self.packed_weight(tuple(x.shape)), self.bias, *self.geometry, "add", 1.0,
            "relu", [], None)

    def add_into(self, out: Tensor, x: Tensor) -> Tensor:
        """out += conv(x) in place, the sum taken inside the convolution (oneDNN's binary post-op on `out`); out:
        the output's shape, channels-last, in `dtype`. Returns out."""
        if self.post_op != "none":
            raise ValueError("add_into sums before any activation: the conv must have none")
        x = self.pad(x).to(self.dtype)
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            out, x, self.packed_weight(tuple(x.shape)), self.bias, *self.geometry, "add", 1.0, None, [], None)


def _absorb_padding(weight: Tensor, left: int, right: int, top: int, bottom: int) -> tuple[Tensor, list[int]]:
    """A kernel and symmetric padding that compute conv(pad(x, left, right, top, bottom), weight) (no padding, any
    stride) without the padded copy, for right >= left and bottom >= top: pad symmetrically by (bottom, right) and
    prepend bottom - top zero rows and right - left zero columns to the kernel, so each output still starts at the
    same input row and column. The extra products are with exact zeros."""
    weight = F.pad(weight, (right - left, 0, bottom - top, 0))
    return weight, [bottom, right]


class PackedMBConvBlock(nn.Module):
    """EfficientNet-Lite's inverted residual block (no squeeze-excitation): expand 1x1 + ReLU6, depthwise + ReLU6,
    project 1x1, plus the input where the shapes allow; BatchNorms already folded into the convolutions."""

    def __init__(self, block: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        args = block._block_args
        expand = getattr(block, "_expand_conv", None) if args.expand_ratio != 1 else None
        self.expand = None if expand is None else PackedConv2d(expand, dtype, "relu6")
        self.depthwise = PackedConv2d(block._depthwise_conv, dtype, "relu6")
        self.project = PackedConv2d(block._project_conv, dtype)
        self.skip = block.id_skip and args.stride == 1 and args.input_filters == args.output_filters

    def forward(self, inputs: Tensor) -> Tensor:
        x = inputs if self.expand is None else self.expand(inputs)
        return self.project(self.depthwise(x), inputs if self.skip else None)


class PackedResidualBlock(nn.Module):
    """The decoder's `ResidualBlock`, x + conv2(relu(conv1(relu(x)))), with the inner ReLU and the sum fused."""

    def __init__(self, block: ResidualBlock, dtype: torch.dtype) -> None:
        super().__init__()
        self.conv1 = PackedConv2d(block.conv1, dtype, "relu")
        self.conv2 = PackedConv2d(block.conv2, dtype)

    def forward(self, x: Tensor, activated: Tensor | None = None) -> Tensor:
        """activated: relu(x) in conv1's dtype, if the caller already has it."""
        inner = self.conv1(F.relu(x) if activated is None else activated)
        if x.dtype != self.conv2.dtype:  # an fp32 sum stays in fp32, as under autocast
            return x + self.conv2(inner)
        return self.conv2(inner, x)

    def activated_output(self, x: Tensor, activated: Tensor | None = None) -> Tensor:
        """relu(forward(x, activated)) in the convs' dtype, the sum and the ReLU inside conv2 (for a consumer that
        takes only the ReLU of the block's output: the decoder's prediction conv)."""
        return self.conv2.sum_relu(self.conv1(F.relu(x) if activated is None else activated), x)


class PackedDecoderStage(nn.Module):
    """The decoder's `DecoderStage` with its sum taken in the convolutions' channels-last order, in fp32: the frame
    term broadcast over the objects onto the upsampled coarser term (`start`), then the readouts, then the residual
    block (`finish`). The inference copy's reads add their readouts into the sum themselves (`DecoderSum`);
    `forward` adds NCHW readout groups through a tiled transpose (`lmrc.ops.layout`). Summing NCHW readouts with the
    channels-last terms element-wise cost more than all of the stage's convolutions at 1/4 scale."""

    def __init__(self, stage: DecoderStage, dtype: torch.dtype) -> None:
        super().__init__()
        self.frame_conv = PackedConv2d(stage.frame_conv, dtype)
        readout = stage.readout_conv
        self.readout_conv = PackedConv2d(readout, dtype) if isinstance(readout, nn.Conv2d) else readout
        self.coarser_conv = None if stage.coarser_conv is None else PackedConv2d(stage.coarser_conv, dtype)
        self.block = PackedResidualBlock(stage.block, dtype)

    def forward(self, frame: Tensor, readouts: Tensor | None, coarser: Tensor | None, objects: int) -> Tensor:
        x = self.start(frame, coarser, objects)
        if readouts is not None and self.readout_conv is not None:
            b, c, h, w = x.shape
            if isinstance(self.readout_conv, ReadoutGroupSum):
                groups = readouts.reshape(b, self.readout_conv.groups, c, h, w)
            else:
                groups = contiguous_nchw(self.readout_conv(readouts)).view(b, 1, c, h, w)
            # the block's first ReLU, in its conv's dtype, comes out of the same pass as the sum
            activated = self.activated_buffer(x)
            add_nchw_groups_to_nhwc(x, groups.float(), activated)
            return self.finish(x, activated)
        return self.finish(x)

    def start(self, frame: Tensor, coarser: Tensor | None, objects: int) -> Tensor:
        """The frame term broadcast over the objects plus the upsampled coarser term: B*N x C x h x w, float32,
        channels-last, to which the readouts are added (in place) before `finish`."""
        f = self.frame_conv(frame)
        b, c, h, w = f.shape
        if self.coarser_conv is not None:  # upsampled in fp32: 2x faster than in bf16 here
            x = F.interpolate(self.coarser_conv(coarser).float(), size=(h, w), mode="bilinear", align_corners=False)
            x.view(b, objects, c, h, w).add_(f.unsqueeze(1))
        else:
            x = torch.empty(b * objects, c, h, w, device=f.device, memory_format=torch.channels_last)
            x.view(b, objects, c, h, w).copy_(f.unsqueeze(1).expand(b, objects, c, h, w))
        return x

    def activated_buffer(self, x: Tensor) -> Tensor:
        """Where relu(x) goes for the residual block: x's shape and layout in its first conv's dtype."""
        return torch.empty_like(x, dtype=self.block.conv1.dtype, memory_format=torch.channels_last)

    def finish(self, x: Tensor, activated: Tensor | None = None, relu: bool = False) -> Tensor:
        """The residual block on the summed input x (activated: relu(x) in the block's conv dtype, if made); relu:
        the ReLU of its output instead, in the convs' dtype (`PackedResidualBlock.activated_output`)."""
        return self.block.activated_output(x, activated) if relu else self.block(x, activated)


class PointwiseFusionNCHW(nn.Module):
    """The value encoder's 1x1 fusion of one stage, conv_e(e) + conv_f(f) per object, as matrix products that write
    the NCHW value the memory reads take: per object W_e E^T + (W_f F^T + b), with E, F the channels-last inputs
    seen as pixels x channels (the product reads them transposed, no copy). In float32 this replaces two
    convolutions and a transposing pass: value encoding 15 -> 11 ms per lite frame with 2 objects on two AVX2 cores
    (docs/PERFORMANCE.md). bf16 convolutions on AMX are faster than the products, so it is float32 only; CPU only
    (its tensors are not buffers: the inference copy that holds it does not move)."""

    def __init__(self, fuse_mask: nn.Conv2d, fuse_frame: nn.Conv2d) -> None:
        super().__init__()
        if fuse_mask.kernel_size != (1, 1) or fuse_frame.kernel_size != (1, 1):
            raise ValueError("PointwiseFusionNCHW takes 1x1 convolutions")
        self.weight_mask = fuse_mask.weight.detach().flatten(1).float()
        self.weight_frame = fuse_frame.weight.detach().flatten(1).float()
        bias = [c.bias.detach().float() for c in (fuse_mask, fuse_frame) if c.bias is not None]
        self.bias = (sum(bias) if bias else torch.zeros(self.weight_mask.shape[0])).unsqueeze(1)

    def forward(self, encoded: Tensor, frame: Tensor, b: int, n: int) -> Tensor:
        """encoded B*N x Ce x H x W, frame B x Cf x H x W -> B x N x C x H x W (contiguous, float32)."""
        h, w = encoded.shape[-2:]
        pixels = h * w
        e = encoded.float().permute(0, 2, 3, 1).reshape(b, n, pixels, -1)
        f = frame.float().permute(0, 2, 3, 1).reshape(b, pixels, -1)
        out = torch.empty(b, n, self.weight_mask.shape[0], pixels)
        with torch.autocast(encoded.device.type, enabled=False):  # float32 by design, even inside an autocast region
            for i in range(b):
                shared = torch.addmm(self.bias, self.weight_frame, f[i].t())
                for j in range(n):
                    torch.addmm(shared, self.weight_mask, e[i, j].t(), out=out[i, j])
        return out.view(b, n, -1, h, w)


def _is_mbconv(module: nn.Module) -> bool:
    return (type(module).__name__ == "MBConvBlock" and hasattr(module, "_block_args") and not module.has_se
            and all(not isinstance(m, nn.BatchNorm2d) for m in module.modules()))


def pack_convolutions(module: nn.Module, dtype: torch.dtype) -> int:
    """Rewrite `module` in place (BatchNorms already folded): every Conv2d becomes a PackedConv2d in `dtype`, with the
    ReLU / ReLU6 that follows it fused where the forward is known. Returns how many convolutions were packed."""
    packed = 0
    if isinstance(module, EfficientNetLite0Trunk) and isinstance(module.bn0, nn.Identity):
        module.stem, module.act = PackedConv2d(module.stem, dtype, "relu6"), nn.Identity()
        packed += 1
    for name, child in list(module.named_children()):
        if _is_mbconv(child):
            setattr(module, name, PackedMBConvBlock(child, dtype))
            packed += 2 + (child._block_args.expand_ratio != 1)
        elif isinstance(child, DecoderStage):
            setattr(module, name, PackedDecoderStage(child, dtype))
            packed += sum(isinstance(m, PackedConv2d) for m in getattr(module, name).modules())
        elif isinstance(child, ResidualBlock):
            setattr(module, name, PackedResidualBlock(child, dtype))
            packed += 2
        elif isinstance(child, nn.Sequential) and len(child) == 2 and type(child[0]) is nn.Conv2d \
                and type(child[1]) in (nn.ReLU, nn.ReLU6):
            activation = "relu" if type(child[1]) is nn.ReLU else "relu6"
            child[0], child[1] = PackedConv2d(child[0], dtype, activation), nn.Identity()
            packed += 1
        elif isinstance(child, nn.Conv2d):
            setattr(module, name, PackedConv2d(child, dtype))
            packed += 1
        else:
            packed += pack_convolutions(child, dtype)
    return packed
