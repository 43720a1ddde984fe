"""Rewrites of an LMRC network that compute the same function (up to float rounding) with less work per frame,
used by `lmrc.inference.fast_path.prepare_for_inference` on its inference copy:
- `fold_batch_norms`: every BatchNorm that follows a convolution is folded into that convolution (the trunks' BN
  is frozen: in eval mode it is an affine map per channel, so conv + BN is one conv with rescaled weights and a
  bias) and replaced by `nn.Identity`; this removes one full pass over every trunk feature map;
- `inplace_activations`: ReLU6 activations (EfficientNet-Lite) run in place on the conv output;
- `project_values_before_reading`: the decoder's 1x1 readout projections are moved into the value encoder's last
  convolutions: each read then carries the decoder's narrower channels, and the global memory keeps half the
  stage-4 channels.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from lmrc.model.readouts import stage_readouts

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
    the readout layout at no extra cost. The same function, computed in another order (float rounding aside).
    A stage whose decoder width is not below C^v_r is left as it is (nothing to gain).
    """
    encoder, decoder = model.value_encoder, model.decoder
    for r in (2, 3, 4):
        names = [readout.name for readout in stage_readouts(model.readouts, r)]
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


def inplace_activations(model: nn.Module) -> None:
    # Safe because every ReLU6 of EfficientNet-Lite's trunk acts on a fresh conv output, never on a block input.
    for module in model.modules():
        if isinstance(module, (nn.ReLU6, nn.ReLU)):
            module.inplace = True
