"""Our preprocessing (uint8 pixels on the host, normalised on the device) equals transformers'
CLIP / SigLIP image processors (PIL backends), with LLaVA's pad-to-square applied first where
asked."""

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from moe_llava_jax.data import images  # noqa: E402
from moe_llava_jax.models.pixels import model_input  # noqa: E402


def reference(name: str, size: int):
    if name == "clip":
        return transformers.CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    return transformers.SiglipImageProcessorPil(size={"height": size, "width": size})


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("pad_to_square", [False, True])
@pytest.mark.parametrize("shape", [(50, 70), (81, 40)])
def test_preprocessing_matches_transformers(name, pad_to_square, shape):
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    processor = images.IMAGE_PROCESSORS[name]
    pixels = images.preprocess_image(image, 32, processor, pad_to_square)
    ours = np.asarray(model_input(pixels, processor.mean, processor.std))  # the device's half
    source = image
    if pad_to_square:
        source = images.expand_to_square(image, tuple(int(m * 255) for m in processor.mean))
    expected = reference(name, 32)(images=Image.fromarray(source), return_tensors="np")
    np.testing.assert_allclose(ours, expected["pixel_values"][0].transpose(1, 2, 0), atol=1e-5)
