"""The released recipes (`configs/moe_llava.py`) are complete configs at the paper's sizes."""

import pytest

from configs import moe_llava
from moe_llava_jax import trainer


@pytest.mark.parametrize("llm", sorted(moe_llava.LLMS))
@pytest.mark.parametrize("tower", sorted(moe_llava.TOWERS))
def test_every_recipe_validates_with_the_papers_batches_and_lengths(llm, tower):
    config = moe_llava.get_config(f"llm={llm},tower={tower},data=/data/moe_llava")
    trainer.validate_config(config)
    image_tokens = {"clip": 576, "siglip": 728}[tower]  # 24^2; 27^2 - the first patch
    for name, (_, batch, lr) in moe_llava.RECIPE.items():
        stage = config[name]
        assert (stage.batch_size, stage.lr, stage.max_length) == (batch, lr, 2048 + image_tokens)
        assert stage.batch_size // stage.grad_accum_steps == 4 * 16  # 16 per chip of a v5p-8
        assert stage.data == f"/data/moe_llava/{name}.json"
        assert stage.template == ("plain" if name == "stage1" else moe_llava.LLMS[llm][1])
    assert config.model.dtype == "bfloat16" and config.model.remat == "unit"
    assert config.model.frozen_param_dtype == "bfloat16"
    assert config.model.decoder.intermediate_size % config.model.moe.backward_pieces == 0


def test_an_unknown_recipe_is_refused_by_name():
    with pytest.raises(ValueError, match="llm='vicuna'"):
        moe_llava.get_config("llm=vicuna")


@pytest.mark.parametrize("llm", sorted(moe_llava.LLMS))
def test_the_phi_recipe_trains_as_llava_phi(llm):
    """LLaVA-Phi: no lm_head bias from stage 1 on, Phi-2's resid_pdrop 0.1 in training; the
    other LLMs as their checkpoints say."""
    from moe_llava_jax import build

    decoder = build.model_config(moe_llava.get_config(f"llm={llm}"), 0, False).decoder
    assert not decoder.lm_head_bias
    assert decoder.residual_dropout == (0.1 if llm == "phi" else 0.0)


def test_a_release_argument_starts_the_first_run_stage_from_it(tmp_path):
    config = moe_llava.get_config(f"llm=stablelm,release={tmp_path},run_stages=stage3")
    assert config.model.init_from_hf == str(tmp_path) and config.stage3.init_from == ""
    assert config.data.tokenizer == f"{tmp_path}/tokenizer.json"
