"""Pixels -> the vision tower's input: `(x / 255 - mean) / std` per channel, on the device.

Images travel from the data pipeline to the devices as the uint8 pixels that resizing,
cropping and padding leave (a quarter of float32's bytes per step), and the model normalises
them. It does so through a 256-level table per channel that numpy computes on the host with
the formula of the image processors (`normalize`), so the tower sees bit for bit what host
normalisation gave; computed by XLA, the division would become a multiplication by the
reciprocal, one rounding off. Floating-point images are taken as already normalised (tests
and benchmarks feed random ones).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Triple = tuple[float, float, float]
CLIP_MEAN: Triple = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: Triple = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN: Triple = (0.5, 0.5, 0.5)
SIGLIP_STD: Triple = (0.5, 0.5, 0.5)


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 `[..., 3]` -> float32 `[..., 3]` of `(x / 255 - mean) / std` (numpy, float32)."""
    scaled = pixels.astype(np.float32) / 255.0
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def levels(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[3 * 256] float32: entry `256 c + v` is channel c's normalised value of level v."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 3))
    return np.ascontiguousarray(normalize(values, mean, std).T).reshape(-1)


def model_input(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Images [..., 3]: uint8 pixels -> float32 normalised by `levels`; floating ones as
    they are."""
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    index = images.astype(jnp.int32) + 256 * jnp.arange(3, dtype=jnp.int32)  # [..., 3]
    return jnp.take(jnp.asarray(levels(mean, std)), index)
