"""Reading and writing object-id masks: DAVIS palette PNGs, binary 0/255 PNGs, void label 255."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lmrc.utils.errors import LmrcError
from lmrc.fileio import atomic_path

VOID_ID = 255


def davis_palette() -> np.ndarray:
    """The PASCAL VOC colour map DAVIS uses: 256 x 3 uint8, index 1 = (128, 0, 0), 2 = (0, 128, 0), ..."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        c, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[index] = (r, g, b)
    return palette


def read_mask(path: str | Path, *, void_as_background: bool = True) -> np.ndarray:
    """Object ids (H x W uint8) from a palette PNG, a binary 0/255 PNG (DAVIS 2016) or an RGB PNG in DAVIS colours."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        raise LmrcError(f"mask {path} not found") from None
    except (OSError, ValueError) as exc:
        raise LmrcError(f"mask {path} cannot be read as an image ({exc}); save it as a PNG") from None
    if image.mode == "P":
        ids = np.array(image, dtype=np.uint8)
    elif image.mode in ("L", "LA", "1", "I", "I;16"):
        gray = np.array(image.convert("L"))
        values = np.unique(gray)
        if set(values.tolist()) <= {0, 255} or values.max() > 127 and len(values) > 2 and _mostly_binary(gray):
            ids = (gray > 127).astype(np.uint8)  # DAVIS 2016: 0 background, 255 object, threshold at 127
        else:
            ids = gray.astype(np.uint8)  # a grey image of small object ids
    elif image.mode in ("RGB", "RGBA"):
        ids = _colours_to_ids(np.array(image.convert("RGB")), path)
    else:
        raise LmrcError(f"mask {path} has image mode {image.mode}; use a palette (P) or grayscale PNG")
    if void_as_background:
        ids = np.where(ids == VOID_ID, 0, ids).astype(np.uint8)
    return ids


def _mostly_binary(gray: np.ndarray) -> bool:
    # JPEG-like noise around 0 and 255 (anti-aliased binary masks): nearly all pixels near either end.
    near = (gray < 32) | (gray > 223)
    return bool(near.mean() > 0.99)


def _colours_to_ids(rgb: np.ndarray, path: Path) -> np.ndarray:
    palette = davis_palette().astype(np.int32)
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    lookup = {int((r << 16) | (g << 8) | b): i for i, (r, g, b) in enumerate(palette)}
    ids = np.zeros(code.shape, dtype=np.uint8)
    for colour in np.unique(code):
        if int(colour) not in lookup:
            r, g, b = (int(colour) >> 16) & 255, (int(colour) >> 8) & 255, int(colour) & 255
            raise LmrcError(
                f"mask {path} has colour ({r}, {g}, {b}), which is not in the DAVIS palette; "
                "save masks as palette PNGs (object id per pixel) or in DAVIS colours"
            )
        ids[code == colour] = lookup[int(colour)]
    return ids


def write_mask(path: str | Path, ids: np.ndarray) -> None:
    """Write object ids (H x W, values < 256) as a palette PNG with the DAVIS colours, atomically."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"mask must be H x W, got shape {ids.shape}")
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(davis_palette().reshape(-1).tolist())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
