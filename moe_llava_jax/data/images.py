"""Image loading and CLIP/SigLIP-style preprocessing, matching what the vision towers expect.

The steps mirror the HF image processors used by the original code (shortest-side bicubic
resize, centre crop, scale to [0, 1], per-channel normalisation) plus LLaVA's optional "pad"
mode that first centres the image on a square canvas so nothing is cropped away. The host
does the pixel work and hands over uint8; the scaling and normalisation run on the device
(`models/pixels.py`), with the processor's mean and std from the model config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from moe_llava_jax.models.pixels import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD


def load_image(image: str | Path | np.ndarray) -> np.ndarray:
    """An image file, or an already-decoded array, as RGB uint8 `[H, W, 3]`.

    Arrays come from sources that store the pixels themselves (TFDS / ArrayRecord); they are
    checked, not converted, so a CHW or float array from a mis-mapped feature fails here
    rather than as a shape error deep in preprocessing. File failures name the path.
    """
    if isinstance(image, np.ndarray):
        _check_rgb(image)
        return image
    path = Path(image)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def _check_rgb(image: np.ndarray) -> None:
    """Every step below assumes HWC uint8 RGB; catch CHW or grey arrays early."""
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")


def expand_to_square(image: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Centre `image` `[H, W, 3]` on a `[S, S, 3]` canvas of `background`, S = max(H, W).

    This is LLaVA's "pad" aspect mode: the later centre crop then keeps the whole image.
    """
    _check_rgb(image)
    height, width, _ = image.shape
    side = max(height, width)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[...] = np.asarray(background, dtype=np.uint8)
    top = (side - height) // 2
    left = (side - width) // 2
    canvas[top : top + height, left : left + width] = image
    return canvas


def resize_shortest_and_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Bicubic-resize so the short side is `size`, then centre-crop to `[size, size, 3]`."""
    _check_rgb(image)
    height, width, _ = image.shape
    short, long = min(height, width), max(height, width)
    new_long = max(size, int(size * long / short))
    new_height, new_width = (size, new_long) if height <= width else (new_long, size)
    resized = Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BICUBIC)
    top = (new_height - size) // 2
    left = (new_width - size) // 2
    return np.asarray(resized)[top : top + size, left : left + size]


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """What a vision tower was trained with. CLIP: bicubic resize of the short side, then a
    centre crop; SigLIP: bicubic resize of the whole image to a square (aspect not kept)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    center_crop: bool


IMAGE_PROCESSORS = {
    "clip": ImageProcessor(CLIP_MEAN, CLIP_STD, center_crop=True),
    "siglip": ImageProcessor(SIGLIP_MEAN, SIGLIP_STD, center_crop=False),
}


def get_image_processor(name: str) -> ImageProcessor:
    if name not in IMAGE_PROCESSORS:
        raise ValueError(
            f"config key model.image_processor={name!r}: expected one of {sorted(IMAGE_PROCESSORS)}"
        )
    return IMAGE_PROCESSORS[name]


def resize_to_square(image: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of the whole image to `[size, size, 3]`."""
    _check_rgb(image)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def preprocess_image(
    image: np.ndarray, size: int, processor: ImageProcessor, pad_to_square: bool
) -> np.ndarray:
    """uint8 `[H, W, 3]` -> uint8 `[size, size, 3]`, the pixels the vision tower's input is
    normalised from (`models/pixels.py`, on the device).

    With `pad_to_square` the canvas colour is the normalisation mean, so padding is close to
    zero after normalisation and carries no signal (LLaVA's stage 2-3 "pad" mode).
    """
    _check_rgb(image)
    if pad_to_square:
        background = tuple(int(m * 255) for m in processor.mean)
        image = expand_to_square(image, background)
    resize = resize_shortest_and_center_crop if processor.center_crop else resize_to_square
    return resize(image, size)
