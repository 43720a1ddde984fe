"""An inference copy of an LMRC network: the same outputs up to float rounding, less work per frame.

`prepare_for_inference(model)` returns a copy (the original keeps its modules and state-dict keys, so weights
saved from it still load anywhere) in which
- every BatchNorm that follows a convolution is folded into that convolution (the trunks' BN is frozen: in eval
  mode it is an affine map per channel, so conv + BN is one conv with rescaled weights and a bias) and replaced
  by `nn.Identity`; this removes one full pass over every trunk feature map;
- ReLU6 activations (EfficientNet-Lite) run in place on the conv output instead of allocating another tensor;
- the asymmetric zero padding of EfficientNet's strided convs writes into a kept buffer (`ReusedZeroPad2d`);
- the encoders' weights are stored channels-last, which oneDNN runs faster on this kind of CPU (depthwise convs
  about 2.5x, dense 3x3 convs 5-10%) and which avoids its reorders; features handed to the memory reads are made
  contiguous again by `LMRC.encode_key` / `encode_value` (the native local-window kernels read NCHW);
- the decoder's 1x1 readout projections are moved into the value encoder's last convolutions
  (`project_values_before_reading`): each read then carries the decoder's narrower channels, and the
  global memory keeps half the stage-4 channels;
- optionally (`compile=True`) the key encoder, value encoder and decoder are wrapped by `torch.compile`.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# (conv, batch norm) attribute pairs where the module computes bn(conv(x)) and uses the BN nowhere else:
# torchvision ResNet stems and blocks, EfficientNet-Lite's stem (as wrapped by EfficientNetLite0Trunk) and MBConv.
_PAIRS = (
    ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"),
    ("stem", "bn0"),
    ("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"),
)


def fold_batch_norms(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d into the convolution before it (in place); returns how many were folded."""
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            children = list(module._modules.items())
            for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    module._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                    module._modules[bn_name] = nn.Identity()
                    folded += 1
            continue
        for conv_name, bn_name in _PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
                folded += 1
    return folded


class ReusedZeroPad2d(nn.Module):
    """nn.ZeroPad2d for inference that keeps its output: the zero border is written once and each call only copies
    the input into the interior. EfficientNet's stride-2 convs pad asymmetrically (TF 'same'), and allocating and
    zero-filling a fresh 40 MB tensor for that at 480p cost more than the convolution after it. The returned
    tensor is overwritten by the next call: only for a consumer that uses it at once (the conv it belongs to)."""

    def __init__(self, padding: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.padding = tuple(padding)  # left, right, top, bottom as nn.ZeroPad2d
        self._out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right, top, bottom = self.padding
        h, w = x.shape[-2:]
        shape = (*x.shape[:-2], h + top + bottom, w + left + right)
        layout = torch.channels_last if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format
        out = self._out
        if (out is None or out.shape != shape or out.dtype != x.dtype or out.device != x.device
                or not out.is_contiguous(memory_format=layout)):
            out = self._out = x.new_zeros(shape).contiguous(memory_format=layout)
        out[..., top: top + h, left: left + w].copy_(x)
        return out


class ReadoutGroupSum(nn.Module):
    """Stands in for a decoder stage's readout projection once `project_values_before_reading` moved it into the
    values: the stage's readouts arrive already projected, one channel group per read, and are summed."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, readouts: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return readouts
        b, c, h, w = readouts.shape
        return readouts.view(b, self.groups, c // self.groups, h, w).sum(1)


@torch.no_grad()
def project_values_before_reading(model: nn.Module) -> None:
    """Move each decoder stage's 1x1 readout projection into the value encoder's fusion convolutions (in place).

    The decoder projects the concatenated readouts of stage r, sum_i P_i R_i, and every read is linear in its
    value with per-pixel weights acting on positions only: R_i = H_i (.) (W_i x V_r) (eq. 3, 5, 6-8, 10), or
    its top-k restriction. So P_i R_i = H_i (.) (W_i x (P_i V_r)): each read can take P_i V_r, which has the
    decoder's width (32 / 64 / 128 at stages 2 / 3 / 4 for every preset) instead of C^v_r channels, and the
    projection then leaves the decoder. V_r is itself conv(e) + conv(F_r) + b, so P_i V_r is that with P_i folded
    into the weights and bias: the value encoder now writes the groups [P_1 V_r, P_2 V_r, ...] in the order of
    `readout_layout` at no extra cost. The same function, computed in another order (float rounding aside).
    A stage whose decoder width is not below C^v_r is left as it is (nothing to gain).
    """
    from lmrc.model.network import readout_layout

    layout = readout_layout(model.config)
    encoder, decoder = model.value_encoder, model.decoder
    for r, names in layout.items():
        stage = getattr(decoder, f"stage{r}")
        if not names or r in model.projected_stages:
            continue
        width, c = stage.readout_conv.out_channels, model.read_value_channels(r)
        if width >= c:
            continue
        projections = stage.readout_conv.weight.reshape(width, len(names), c).transpose(0, 1)  # P_i: width x c
        for convs in (encoder.fuse_mask, encoder.fuse_frame):
            conv = convs[f"r{r}"]
            weight = torch.einsum("goc,cikl->goikl", projections, conv.weight).flatten(0, 1)
            projected = nn.Conv2d(conv.in_channels, weight.shape[0], conv.kernel_size, padding=conv.padding,
                                  bias=conv.bias is not None).to(conv.weight)
            projected.weight.copy_(weight)
            if conv.bias is not None:
                projected.bias.copy_(torch.einsum("goc,c->go", projections, conv.bias).flatten())
            convs[f"r{r}"] = projected
        stage.readout_conv = ReadoutGroupSum(len(names))
        model.readout_channels[r] = width * len(names)
        model.projected_stages.add(r)


def _reuse_padding(model: nn.Module) -> int:
    replaced = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ZeroPad2d):
                setattr(module, name, ReusedZeroPad2d(child.padding))
                replaced += 1
    return replaced


def _inplace_activations(model: nn.Module) -> None:
    # Safe because every ReLU6 of EfficientNet-Lite's trunk acts on a fresh conv output, never on a block input.
    for module in model.modules():
        if isinstance(module, (nn.ReLU6, nn.ReLU)):
            module.inplace = True


def prepare_for_inference(model: nn.Module, *, fold: bool = True, channels_last: bool = True,
                          project_values: bool = True, compile: bool = False) -> nn.Module:
    """A copy of `model` in eval mode, for inference only (see the module docstring)."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if project_values:
        project_values_before_reading(model)
    if fold:
        fold_batch_norms(model.key_encoder)
        fold_batch_norms(model.value_encoder)
        _inplace_activations(model.key_encoder)
        _inplace_activations(model.value_encoder)
        _reuse_padding(model.key_encoder)
        _reuse_padding(model.value_encoder)
    if channels_last:
        model.key_encoder.to(memory_format=torch.channels_last)
        model.value_encoder.to(memory_format=torch.channels_last)
    model.inference_only = True
    if compile:
        import os

        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        model.key_encoder = torch.compile(model.key_encoder, dynamic=False)
        model.value_encoder = torch.compile(model.value_encoder, dynamic=False)
        model.decoder = torch.compile(model.decoder, dynamic=False)
    return model
