"""Image preprocessing: square padding, resize/crop, normalisation (on the device, equal to
the host formula) and load errors."""

import jax
import numpy as np
import pytest
from PIL import Image

from moe_llava_jax.data.images import (
    expand_to_square,
    load_image,
    IMAGE_PROCESSORS,
    preprocess_image,
    resize_shortest_and_center_crop,
)
from moe_llava_jax.models.pixels import CLIP_MEAN, CLIP_STD, model_input, normalize

CLIP_BACKGROUND = tuple(int(m * 255) for m in CLIP_MEAN)


def test_expand_to_square_centres_content_on_background():
    image = np.full((4, 10, 3), 7, dtype=np.uint8)  # wide: padding goes above and below
    square = expand_to_square(image, CLIP_BACKGROUND)
    assert square.shape == (10, 10, 3) and square.dtype == np.uint8
    np.testing.assert_array_equal(square[3:7], 7)
    np.testing.assert_array_equal(square[:3], np.broadcast_to(CLIP_BACKGROUND, (3, 10, 3)))
    np.testing.assert_array_equal(square[7:], np.broadcast_to(CLIP_BACKGROUND, (3, 10, 3)))
    tall = expand_to_square(np.zeros((6, 2, 3), np.uint8), (255, 255, 255))
    np.testing.assert_array_equal(tall[:, 2:4], 0)
    assert (tall[:, :2] == 255).all() and (tall[:, 4:] == 255).all()


def test_resize_and_crop_keeps_the_centre():
    image = np.zeros((20, 40, 3), dtype=np.uint8)
    image[:, 10:30] = 200  # the central square survives the crop
    out = resize_shortest_and_center_crop(image, 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert (out[:, 2:8] == 200).all()
    assert (out >= 150).all()  # nothing of the black side bands is left (bicubic rings a little)


def test_preprocess_constant_image():
    image = np.full((30, 50, 3), 255, dtype=np.uint8)
    siglip = IMAGE_PROCESSORS["siglip"]
    out = preprocess_image(image, 16, siglip, pad_to_square=False)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(normalize(out, siglip.mean, siglip.std), 1.0, atol=1e-6)

    padded = preprocess_image(image, 16, IMAGE_PROCESSORS["clip"], pad_to_square=True)
    padded = normalize(padded, CLIP_MEAN, CLIP_STD)
    expected_white = (1.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    np.testing.assert_allclose(padded[8, 8], expected_white, rtol=1e-5)
    np.testing.assert_allclose(padded[0, 8], 0.0, atol=0.02)  # mean-coloured padding ~ 0


def test_normalize_formula():
    image = np.array([[[0, 128, 255]]], dtype=np.uint8)
    out = normalize(image, CLIP_MEAN, CLIP_STD)
    expected = (np.array([0, 128, 255]) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(IMAGE_PROCESSORS))
def test_the_device_normalises_every_level_as_the_host_formula(name):
    """uint8 pixels normalised in a jitted program equal the numpy formula bit for bit (all
    256 levels, each channel); images already in floating point pass through."""
    processor = IMAGE_PROCESSORS[name]
    levels = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None], (256, 2, 3))
    on_device = jax.jit(lambda x: model_input(x, processor.mean, processor.std))
    out = np.asarray(on_device(levels))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, normalize(levels, processor.mean, processor.std))
    floats = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(on_device(floats)), floats)


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((5, 7), 99, dtype=np.uint8), mode="L").save(path)
    image = load_image(path)
    assert image.shape == (5, 7, 3) and image.dtype == np.uint8 and (image == 99).all()


def test_corrupt_and_missing_files_name_the_path(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ValueError, match="corrupt.png"):
        load_image(corrupt)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
