"""Joint augmentation of a training clip (frames and id masks together) with ``torchvision.transforms.v2``.

Parameters are drawn from the sample's own numpy Generator and applied with the v2 functional API on
``tv_tensors.Image`` / ``tv_tensors.Mask``: the Mask kernels always resample with nearest neighbour, so ids stay
ids, and the same geometric parameters reach the image and its mask. Order: clip-wide random resized crop (retried so the
chosen objects stay in the first frame) -> clip-wide horizontal flip -> per-frame small affine (rotation, shear;
STCN warps before cropping, we warp the crop: same distribution of motion, a third of the pixels) -> colour
jitter (clip-wide, plus a tiny per-frame one) -> grayscale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

# ImageNet mean as uint8: the fill of pixels an affine warp brings in, so borders look like "average" image.
FILL_RGB = [124.0, 116.0, 104.0]


@dataclass
class ClipAugment:
    """Settings of the clip augmentation; call it as ``augment(images, ids, keep, rng)``.

    ``enabled=False`` gives a deterministic plain resize to ``crop_size`` (validation, debugging).
    """

    crop_size: tuple[int, int] = (384, 384)
    enabled: bool = True
    crop_scale: tuple[float, float] = (0.36, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_retries: int = 5
    min_object_pixels: int = 16  # in the output crop, per kept object, first frame
    hflip_prob: float = 0.5
    rotation: float = 15.0  # degrees, per frame
    shear: float = 10.0  # degrees, per frame
    brightness: float = 0.1
    contrast: float = 0.03
    saturation: float = 0.03
    frame_jitter: float = 0.01  # per-frame brightness/contrast/saturation, so frames differ slightly
    grayscale_prob: float = 0.05

    def __call__(
        self, images: torch.Tensor, ids: torch.Tensor, keep: Sequence[int], rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images T x 3 x H x W uint8, ids T x H x W uint8 -> (T x 3 x h x w float [0,1], T x h x w uint8 ids).

        `keep`: object ids that must keep at least `min_object_pixels` in the first frame after cropping.
        """
        out_h, out_w = self.crop_size
        if not self.enabled:
            return _resize_clip(images, ids, out_h, out_w)
        # Crop first so the per-frame warps run on crop-sized frames (about 3x fewer pixels than 480p frames);
        # the crop is chosen on the unwarped first mask, which the small warps change little.
        top, left, h, w = self._crop_keeping(ids[0], keep, rng)
        img = F.resized_crop(tv_tensors.Image(images), top, left, h, w, [out_h, out_w],
                             interpolation=InterpolationMode.BILINEAR, antialias=True)
        msk = resized_crop_ids(ids, top, left, h, w, [out_h, out_w])
        if rng.random() < self.hflip_prob:
            img, msk = F.horizontal_flip(img), F.horizontal_flip(msk)
        warped = [self._frame_affine(tv_tensors.Image(img[t]), tv_tensors.Mask(msk[t]), rng)
                  for t in range(img.shape[0])]
        img = tv_tensors.Image(torch.stack([i.as_subclass(torch.Tensor) for i, _ in warped]))
        msk = torch.stack([m.as_subclass(torch.Tensor) for _, m in warped])

        img = F.to_dtype(img, torch.float32, scale=True)
        img = self._colour(img, rng)
        return img.as_subclass(torch.Tensor).clamp(0, 1), msk

    def _frame_affine(self, image, mask, rng):
        if self.rotation == 0 and self.shear == 0:
            return image, mask  # an identity warp would still resample every pixel
        angle = float(rng.uniform(-self.rotation, self.rotation))
        shear = [float(rng.uniform(-self.shear, self.shear)), 0.0]
        kwargs = dict(angle=angle, translate=[0.0, 0.0], scale=1.0, shear=shear)
        image = F.affine(image, **kwargs, interpolation=InterpolationMode.BILINEAR, fill=FILL_RGB)
        mask = F.affine(mask, **kwargs, fill=0)
        return image, mask

    def _crop_keeping(self, first_ids: torch.Tensor, keep: Sequence[int], rng) -> tuple[int, int, int, int]:
        height, width = first_ids.shape
        out_area = self.crop_size[0] * self.crop_size[1]
        for _ in range(max(1, self.crop_retries)):
            top, left, h, w = random_resized_crop_box(height, width, self.crop_scale, self.crop_ratio, rng)
            region = first_ids[top:top + h, left:left + w]
            # Pixels in the source region that will become `min_object_pixels` after resizing to the crop size.
            need = self.min_object_pixels * (h * w) / out_area
            if all(int((region == k).sum()) >= need for k in keep):
                return top, left, h, w
        # No random crop kept every object (tiny or off-centre objects): the smallest allowed box centred on
        # the objects keeps them largest; if even that misses one (objects far apart), the whole frame.
        present = torch.zeros_like(first_ids, dtype=torch.bool)
        for k in keep:
            present |= first_ids == k
        ys, xs = torch.nonzero(present, as_tuple=True)
        if len(ys):
            aspect = min(max(self.crop_size[1] / self.crop_size[0], self.crop_ratio[0]), self.crop_ratio[1])
            area = self.crop_scale[0] * height * width
            h = min(height, max(1, int(round(math.sqrt(area / aspect)))))
            w = min(width, max(1, int(round(math.sqrt(area * aspect)))))
            top = min(max(int(ys.float().mean()) - h // 2, 0), height - h)
            left = min(max(int(xs.float().mean()) - w // 2, 0), width - w)
            region = first_ids[top:top + h, left:left + w]
            if all(bool((region == k).any()) for k in keep):
                return top, left, h, w
        return 0, 0, height, width

    def _colour(self, img: torch.Tensor, rng) -> torch.Tensor:
        clip_b = 1 + rng.uniform(-self.brightness, self.brightness)
        clip_c = 1 + rng.uniform(-self.contrast, self.contrast)
        clip_s = 1 + rng.uniform(-self.saturation, self.saturation)
        frames = []
        for t in range(img.shape[0]):
            j = self.frame_jitter
            frame = img[t]
            frame = F.adjust_brightness(frame, float(clip_b * (1 + rng.uniform(-j, j))))
            frame = F.adjust_contrast(frame, float(clip_c * (1 + rng.uniform(-j, j))))
            frame = F.adjust_saturation(frame, float(clip_s * (1 + rng.uniform(-j, j))))
            frames.append(frame)
        img = tv_tensors.Image(torch.stack(frames))
        if rng.random() < self.grayscale_prob:
            img = F.rgb_to_grayscale(img, num_output_channels=3)
        return img


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a box with area fraction in `scale` and aspect w/h in `ratio` (log-uniform)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Extreme frame shapes: the largest centred box with an allowed aspect.
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _resize_clip(images: torch.Tensor, ids: torch.Tensor, out_h: int, out_w: int):
    img = F.resize(tv_tensors.Image(images), [out_h, out_w], interpolation=InterpolationMode.BILINEAR,
                   antialias=True)
    msk = resize_ids(ids, [out_h, out_w])
    img = F.to_dtype(img, torch.float32, scale=True)
    return img.as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor)


def resize_short_side(images: torch.Tensor, ids: torch.Tensor, short_side: int | None):
    """Downscale a clip (T x 3 x H x W uint8, T x H x W ids) so its shorter side is at most `short_side`."""
    h, w = images.shape[-2:]
    if short_side is None or min(h, w) <= short_side:
        return images, ids
    factor = short_side / min(h, w)
    size = [max(1, round(h * factor)), max(1, round(w * factor))]
    img = F.resize(tv_tensors.Image(images), size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return img.as_subclass(torch.Tensor), resize_ids(ids, size)


def resize_ids(ids: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Resize id masks (... x H x W) with nearest-exact sampling.

    torchvision's default for masks is torch's legacy 'nearest', which samples pixel corners, not centres: the
    mask shifts by up to half a pixel against the (centre-aligned) bilinear image. 'nearest-exact' keeps them
    aligned.
    """
    out = F.resize(tv_tensors.Mask(ids), size, interpolation=InterpolationMode.NEAREST_EXACT)
    return out.as_subclass(torch.Tensor)


def resized_crop_ids(ids: torch.Tensor, top: int, left: int, h: int, w: int, size: list[int]) -> torch.Tensor:
    """Crop then resize id masks, centre-aligned like the image's ``F.resized_crop`` (see ``resize_ids``)."""
    return resize_ids(F.crop(tv_tensors.Mask(ids), top, left, h, w).as_subclass(torch.Tensor), size)
