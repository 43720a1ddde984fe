"""Synthetic training clips for when annotated video is scarce; same sample dict as ``lmrc.data.datasets``.

- ``StaticImageClips``: a 3-frame clip from ONE annotated image: each frame is the image under its own random
  affine + elastic warp, applied jointly to image and mask (STCN's static-image pre-training stage). Frame 0 is
  warped too, so the network never sees an unwarped "reference" pose.
- ``PastedObjectClips``: a real 3-frame clip of one sequence (object 1) with an object of another sequence's clip
  (its pixels under its mask, with its own motion) pasted on top as object 2; object 2 occludes object 1 in
  every frame, and object 1's mask loses the occluded pixels.
Both are deterministic in (seed, index) and can be mixed with real data through ``MixedDataset``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from lmrc.data.augment import FILL_RGB, ClipAugment, resize_ids, resize_short_side
from lmrc.data.datasets import VideoSequence, VOSTrainingDataset, load_image, make_sample, stack_clip
from lmrc.data.masks import read_mask
from lmrc.data.sampling import (
    SALT_DISTRACTOR,
    GapSchedule,
    choose_objects,
    epoch_permutation,
    objects_present,
    sample_rng,
)
from lmrc.utils.errors import LmrcError


def annotated_frames(sequences: Sequence[VideoSequence], stride: int = 1) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of every `stride`-th annotated frame of the sequences: sources for StaticImageClips."""
    pairs = []
    for seq in sequences:
        for i in seq.annotated[::max(1, stride)]:
            pairs.append((seq.frames[i], seq.masks[i]))
    return pairs


def random_warp(
    image: torch.Tensor,
    ids: torch.Tensor,
    rng: np.random.Generator,
    *,
    rotation: float = 20.0,
    scale: tuple[float, float] = (0.9, 1.1),
    translate: float = 0.05,
    shear: float = 10.0,
    elastic_alpha: float = 0.02,
    elastic_grid: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random affine + smooth elastic warp of one frame (3 x H x W uint8) and its id mask (H x W), jointly.

    Both warps are folded into one displacement field given to ``F.elastic`` (one resampling, not two): the
    affine part is rotation, shear, scale about the centre and a translation (fraction of the size); the elastic
    part is random on an `elastic_grid` x `elastic_grid` lattice (std `elastic_alpha` in normalised coordinates,
    where 2 = the image size), upsampled bicubically so it bends smoothly.
    """
    h, w = ids.shape
    angle = np.deg2rad(rng.uniform(-rotation, rotation))
    shx, shy = np.tan(np.deg2rad(rng.uniform(-shear, shear, size=2)))
    zoom = rng.uniform(*scale)
    shift = np.array([rng.uniform(-translate, translate) * w, rng.uniform(-translate, translate) * h])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    forward = zoom * rot @ np.array([[1.0, shx], [shy, 1.0]])
    inverse = torch.from_numpy(np.linalg.inv(forward)).float()

    # Output pixel centres in normalised [-1, 1] coordinates, as F.elastic's identity grid.
    gy = (torch.arange(h, dtype=torch.float32) * 2 + 1) / h - 1
    gx = (torch.arange(w, dtype=torch.float32) * 2 + 1) / w - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # H x W x 2, (x, y)
    half = torch.tensor([w / 2, h / 2])
    centred = grid * half - torch.from_numpy(shift).float()  # pixels from the centre, minus the translation
    source = (centred @ inverse.T) / half  # backward map: where each output pixel samples the input
    displacement = (source - grid)[None]
    if elastic_alpha > 0:
        coarse = torch.from_numpy(rng.normal(0.0, elastic_alpha, size=(1, 2, elastic_grid, elastic_grid)))
        field = nnf.interpolate(coarse.float(), size=(h, w), mode="bicubic", align_corners=True)
        displacement = displacement + field.permute(0, 2, 3, 1)
    displacement = displacement.contiguous()  # 1 x H x W x 2, as F.elastic expects
    img = F.elastic(tv_tensors.Image(image), displacement, interpolation=InterpolationMode.BILINEAR, fill=FILL_RGB)
    msk = F.elastic(tv_tensors.Mask(ids), displacement, fill=0)
    return img.as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor)


class StaticImageClips(Dataset):
    """3-frame clips each synthesised from one annotated image by independent random warps."""

    def __init__(
        self,
        sources: Sequence[tuple[str | Path, str | Path]],
        *,
        crop_size: tuple[int, int] = (384, 384),
        max_objects: int = 2,
        num_frames: int = 3,
        seed: int = 0,
        length: int | None = None,
        augment: ClipAugment | None = None,
        max_short_side: int | None = 480,
        min_object_pixels: int = 16,
        warp: dict | None = None,
        distractor_prob: float = 0.0,
        name: str = "static",
    ) -> None:
        if not sources:
            raise LmrcError("StaticImageClips got no (image, mask) pairs; pass annotated_frames(sequences) or pairs")
        self.sources = [(Path(i), Path(m)) for i, m in sources]
        self.max_objects, self.num_frames, self.seed = max_objects, num_frames, int(seed)
        self.length = int(length) if length is not None else len(self.sources)
        self.augment = augment if augment is not None else ClipAugment(crop_size=tuple(crop_size))
        self.max_short_side, self.min_object_pixels = max_short_side, min_object_pixels
        self.warp = dict(warp or {})
        self.distractor_prob = distractor_prob
        self.name = name

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        rng = sample_rng(self.seed, index)
        count = len(self.sources)
        pick = int(epoch_permutation(self.seed, index // count, count)[index % count])
        for _ in range(6):
            ids = read_mask(self.sources[pick][1])
            candidates = objects_present(ids, self.min_object_pixels)
            if candidates:
                break
            pick = int(rng.integers(count))  # an empty annotation: take another image
        else:
            raise LmrcError(f"StaticImageClips: the masks tried (last {self.sources[pick][1]}) hold no object; "
                            "drop empty annotations from the sources")
        image_path, mask_path = self.sources[pick]
        img, msk = stack_clip([load_image(image_path)], [ids])
        img, msk = resize_short_side(img, msk, self.max_short_side)
        frames, masks = zip(*(random_warp(img[0], msk[0], rng, **self.warp) for _ in range(self.num_frames)))
        objects = choose_objects(candidates, self.max_objects, rng)
        frames, masks = torch.stack(frames), torch.stack(masks)
        if self.distractor_prob > 0:
            frames, masks = maybe_paste_distractor(frames, masks, objects, self.distractor_prob,
                                                   sample_rng(self.seed, index, SALT_DISTRACTOR))
        info = {"name": f"static:{image_path.parent.name}/{image_path.stem}",
                "frames": torch.zeros(self.num_frames, dtype=torch.long), "source": self.name}
        return make_sample(frames, masks, objects, rng, self.augment, self.max_objects, info)


class PastedObjectClips(Dataset):
    """Two-object clips: a base sequence's object (id 1) occluded by another sequence's object pasted as id 2.

    The donor clip is resized to the base frame size, then scaled by ``paste_scale`` and moved (one transform for
    the whole clip, so the donor keeps its own motion) so its object lands at a random place. A placement is
    retried when object 1 would keep less than ``min_visible`` of its frame-0 area.
    """

    def __init__(
        self,
        base: Sequence[VideoSequence],
        donors: Sequence[VideoSequence] | None = None,
        *,
        max_gap: int | GapSchedule | Sequence[tuple[int, int]] = 10,
        crop_size: tuple[int, int] = (384, 384),
        max_objects: int = 2,
        num_frames: int = 3,
        seed: int = 0,
        length: int | None = None,
        batch_size: int = 1,
        augment: ClipAugment | None = None,
        max_short_side: int | None = 480,
        min_object_pixels: int = 16,
        paste_scale: tuple[float, float] = (0.4, 0.9),
        min_visible: float = 0.3,
        placement_retries: int = 5,
        name: str = "paste",
    ) -> None:
        if max_objects < 2:
            raise ValueError("PastedObjectClips makes two-object samples; use max_objects >= 2")
        common = dict(max_gap=max_gap, max_objects=max_objects, num_frames=num_frames, batch_size=batch_size,
                      max_short_side=max_short_side, min_object_pixels=min_object_pixels)
        # Internal clip pickers; the donor picker's seed differs so its sequence order is independent.
        self.base = VOSTrainingDataset(base, seed=seed, length=length, name=name, **common)
        self.donors = VOSTrainingDataset(donors if donors is not None else base, seed=seed + 7919, **common)
        self.augment = augment if augment is not None else ClipAugment(crop_size=tuple(crop_size))
        self.max_objects, self.seed, self.name = max_objects, int(seed), name
        self.paste_scale, self.min_visible = paste_scale, min_visible
        self.placement_retries, self.min_object_pixels = placement_retries, min_object_pixels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        rng = sample_rng(self.seed, index)
        seq, frame_idx, ids, candidates = self.base.draw_clip(index, rng)
        img, msk = self.base.load_clip(seq, frame_idx, ids)
        obj1 = int(rng.choice(candidates))

        others = [s for s in self.donors.sequences if s.name != seq.name] or self.donors.sequences
        donor_seq = others[int(rng.integers(len(others)))]
        donor_seq, d_idx, d_ids, d_candidates = self.donors.draw_clip(index, rng, sequence=donor_seq)
        d_img, d_msk = self.donors.load_clip(donor_seq, d_idx, d_ids)
        donor_obj = int(rng.choice(d_candidates))

        images, out_ids = paste_object(img, msk, obj1, d_img, d_msk, donor_obj, rng, scale=self.paste_scale,
                                       min_visible=self.min_visible, min_pixels=self.min_object_pixels,
                                       retries=self.placement_retries)
        info = {"name": f"{seq.name}+{donor_seq.name}", "frames": torch.tensor(frame_idx, dtype=torch.long),
                "source": self.name}
        # Fixed slot order: object 1 (base) then object 2 (pasted), as the ids say.
        return make_sample(images, out_ids, [1, 2], rng, self.augment, self.max_objects, info)


def paste_object(
    images: torch.Tensor,
    ids: torch.Tensor,
    base_object: int,
    donor_images: torch.Tensor,
    donor_ids: torch.Tensor,
    donor_object: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.4, 0.9),
    min_visible: float = 0.3,
    min_pixels: int = 16,
    retries: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste `donor_object` of a donor clip onto a base clip (both T x 3 x H x W uint8 / T x H x W ids).

    Returns the composited frames and ids where 1 = `base_object` minus occluded pixels, 2 = the pasted object,
    0 = everything else (other base objects become background).
    """
    h, w = ids.shape[-2:]
    d_img = F.resize(tv_tensors.Image(donor_images), [h, w], interpolation=InterpolationMode.BILINEAR, antialias=True)
    d_msk = tv_tensors.Mask(resize_ids((donor_ids == donor_object).to(torch.uint8), [h, w]))
    base_mask = ids == base_object
    base_area = int(base_mask[0].sum())
    ys, xs = torch.nonzero(d_msk[0], as_tuple=True)
    centroid = (float(xs.float().mean()), float(ys.float().mean())) if len(xs) else (w / 2, h / 2)

    best = None
    for attempt in range(max(1, retries)):
        # Later attempts shrink the donor so it covers less of object 1.
        s = float(rng.uniform(*scale)) * (0.8 ** attempt)
        placed_img, placed = _place(d_img, d_msk, centroid, s, rng)
        visible = int((base_mask[0] & ~placed[0]).sum())
        score = (visible >= max(min_visible * base_area, min_pixels) and int(placed[0].sum()) >= min_pixels, visible)
        if best is None or score > best[0]:
            best = (score, placed_img.as_subclass(torch.Tensor), placed)
        if score[0]:
            break
    _, placed_img, placed = best
    out_images = torch.where(placed[:, None], placed_img, images)
    out_ids = torch.zeros_like(ids)
    out_ids[base_mask] = 1
    out_ids[placed] = 2  # after object 1: the pasted object is in front
    return out_images, out_ids


def _place(images, masks, centroid: tuple[float, float], s: float, rng: np.random.Generator):
    """Scale a clip (tv_tensors Image T x 3 x H x W, Mask T x H x W) by `s` and move it so `centroid` lands at a
    random point of the frame (one transform for every frame, so the object keeps its motion); returns the
    moved images (uint8) and the moved masks (bool)."""
    h, w = masks.shape[-2:]
    target = (float(rng.uniform(0.15, 0.85) * w), float(rng.uniform(0.15, 0.85) * h))
    # Scaling is about the image centre; move the scaled centroid onto the target point (whole pixels at scale
    # 1, so a copy is the object's own pixels, not a resampled version).
    tx = target[0] - (w / 2 + s * (centroid[0] - w / 2))
    ty = target[1] - (h / 2 + s * (centroid[1] - h / 2))
    if s == 1.0:
        tx, ty = round(tx), round(ty)
    params = dict(angle=0.0, translate=[tx, ty], scale=s, shear=[0.0, 0.0])
    placed_img = F.affine(images, **params, interpolation=InterpolationMode.BILINEAR)
    placed = F.affine(masks, **params, fill=0).as_subclass(torch.Tensor).bool()
    return placed_img.as_subclass(torch.Tensor), placed


def paste_distractor(
    images: torch.Tensor,
    ids: torch.Tensor,
    target: int,
    rng: np.random.Generator,
    *,
    protect: Sequence[int] = (),
    start: int = 0,
    scale: tuple[float, float] = (0.7, 1.1),
    recolour: float = 0.1,
    min_pixels: int = 16,
    retries: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste a copy of object `target` (its own pixels in each frame, scaled by `scale`, each colour channel
    times 1 +- `recolour`) elsewhere in frames ``start..T-1`` of a clip (T x 3 x H x W uint8, T x H x W ids) as
    UNLABELLED background: id 0 where it lands, the real target keeps its label.

    A look-alike distractor: the global read matches it as well as the target; the local read (the previous
    frame's nearby mask) can tell them apart. The copy never covers `target` or the `protect` ids in any frame;
    when no placement in `retries` avoids them, the clip is returned unchanged. Returns (images, ids, pasted
    T x H x W bool).
    """
    t_count, _, h, w = images.shape
    mask = ids == target
    keep = mask.clone()
    for k in protect:
        keep |= ids == k
    ys, xs = torch.nonzero(mask[start], as_tuple=True)
    nothing = torch.zeros_like(mask)
    if len(ys) < min_pixels:
        return images, ids, nothing
    centroid = (float(xs.float().mean()), float(ys.float().mean()))
    later = torch.arange(t_count) >= start
    for _ in range(max(1, retries)):
        s = float(rng.uniform(*scale))
        placed_img, placed = _place(tv_tensors.Image(images), tv_tensors.Mask(mask.to(torch.uint8)), centroid, s, rng)
        placed &= later[:, None, None]
        if int(placed[start].sum()) >= min_pixels and not bool((placed & keep).any()):
            break
    else:
        return images, ids, nothing
    gain = torch.from_numpy(1 + rng.uniform(-recolour, recolour, size=3)).float().view(1, 3, 1, 1)
    copy = (placed_img.float() * gain).round().clamp(0, 255).to(images.dtype) if recolour else placed_img
    out_images = torch.where(placed[:, None], copy, images)
    out_ids = torch.where(placed, torch.zeros_like(ids), ids)
    return out_images, out_ids, placed


def maybe_paste_distractor(images: torch.Tensor, ids: torch.Tensor, objects: Sequence[int], prob: float,
                           rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability `prob`, a look-alike of the first of `objects` (`paste_distractor`) from a random frame on
    (from frame 0 the global memory sees it as background; later, only the reads can reject it)."""
    if prob <= 0 or rng.random() >= prob or not objects:
        return images, ids
    start = int(rng.integers(images.shape[0]))
    images, ids, _ = paste_distractor(images, ids, objects[0], rng, protect=objects[1:], start=start)
    return images, ids
