"""Decoder (Section III-D, Fig. 5): coarse to fine, x2 per stage, skips from F^Q_r and each stage's readouts."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class DecoderStage(nn.Module):
    """1x1 projections of F^Q_r, of this stage's readouts and of the coarser output, summed, then a residual block.

    The sum of projections equals one projection of their concatenation; the frame term is computed once per
    frame and shared by all objects, and the coarser output is projected before its x2 upsampling (both are
    linear, so the order does not change the result; it is 4x fewer operations). 1x1 projections and one
    residual block per stage keep the decoder light: its 3x3 convolutions at 1/4 scale dominated the frame time.
    """

    def __init__(self, frame_channels: int, readout_channels: int, coarser_channels: int, out_channels: int) -> None:
        super().__init__()
        self.frame_conv = nn.Conv2d(frame_channels, out_channels, 1)
        self.readout_conv = nn.Conv2d(readout_channels, out_channels, 1, bias=False) if readout_channels else None
        self.coarser_conv = nn.Conv2d(coarser_channels, out_channels, 1, bias=False) if coarser_channels else None
        self.block = ResidualBlock(out_channels)

    def forward(self, frame: Tensor, readouts: Tensor | None, coarser: Tensor | None, objects: int) -> Tensor:
        """frame: B x Cf x h x w; readouts: B*N x Cr x h x w; coarser: B*N x Cc x h/2 x w/2 -> B*N x Co x h x w."""
        x = self.frame_conv(frame).repeat_interleave(objects, dim=0)
        if self.readout_conv is not None:
            x = x + self.readout_conv(readouts)
        if self.coarser_conv is not None:
            x = x + F.interpolate(self.coarser_conv(coarser), size=frame.shape[-2:], mode="bilinear", align_corners=False)
        return self.block(x)


class Decoder(nn.Module):
    """Stages 4 -> 3 -> 2, a 3x3 prediction conv, and x4 bilinear upsampling to the input size: one logit map per object."""

    def __init__(self, frame_channels: dict[int, int], readout_channels: dict[int, int], widths: dict[int, int]) -> None:
        super().__init__()
        self.stage4 = DecoderStage(frame_channels[4], readout_channels[4], 0, widths[4])
        self.stage3 = DecoderStage(frame_channels[3], readout_channels[3], widths[4], widths[3])
        self.stage2 = DecoderStage(frame_channels[2], readout_channels[2], widths[3], widths[2])
        self.predict = nn.Conv2d(widths[2], 1, 3, padding=1)

    def forward(self, frame_features: dict[int, Tensor], readouts: dict[int, Tensor | None], objects: int) -> Tensor:
        """frame_features {r: B x Cf_r x h_r x w_r}; readouts {r: B*N x C_r x h_r x w_r} -> B x N x 4h_2 x 4w_2 logits."""
        return self.logits(self.stages(frame_features, readouts, objects), objects)

    def stages(self, frame_features: dict[int, Tensor], readouts: dict[int, Tensor | None], objects: int) -> Tensor:
        """Stages 4 -> 3 -> 2: stage 2's output B*N x C x h_2 x w_2."""
        x = self.stage4(frame_features[4], readouts[4], None, objects)
        x = self.stage3(frame_features[3], readouts[3], x, objects)
        return self.stage2(frame_features[2], readouts[2], x, objects)

    def logits(self, x: Tensor, objects: int) -> Tensor:
        """Stage 2's output B*N x C x h x w -> B x N x 4h x 4w logits."""
        return F.interpolate(self.coarse_logits(x, objects), scale_factor=4, mode="bilinear", align_corners=False)

    def coarse_logits(self, x: Tensor, objects: int, activated: bool = False) -> Tensor:
        """Stage 2's output B*N x C x h x w (activated: its ReLU) -> B x N x h x w logits, before the x4 upsampling."""
        logits = self.predict(x if activated else F.relu(x))
        return logits.view(-1, objects, *logits.shape[-2:])
