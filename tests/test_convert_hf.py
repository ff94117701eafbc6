"""Hugging Face import/export: logits parity with transformers (PyTorch, float32) and exact
round trips. Tiny random models are built and saved by the test; nothing is downloaded."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from moe_llava_jax import param_tree  # noqa: E402
from moe_llava_jax.data import from_config
from moe_llava_jax.convert import families, hf, safetensors_io  # noqa: E402
from moe_llava_jax.models.decoder import Decoder  # noqa: E402
from moe_llava_jax.models.vision import VisionTower  # noqa: E402

TOLERANCE = 1e-4
TEXT = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4
)
DECODERS = {
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**TEXT, num_key_value_heads=2, rms_norm_eps=1e-6)
    ),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**TEXT, num_key_value_heads=2, tie_word_embeddings=True)
    ),
    "stablelm": lambda: transformers.StableLmForCausalLM(
        transformers.StableLmConfig(**TEXT, num_key_value_heads=2, use_qkv_bias=True)
    ),
    "phi": lambda: transformers.PhiForCausalLM(transformers.PhiConfig(**TEXT)),
    # Qwen v1 is remote code, not in transformers: a Qwen2 model with full multi-head attention
    # computes the same function, and `to_qwen_v1` rewrites its tensors into Qwen v1's layout.
    "qwen": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**TEXT, num_key_value_heads=4, tie_word_embeddings=False)
    ),
}
QWEN_V1_NAMES = (
    ("model.layers.", "transformer.h."),
    (".self_attn.o_proj.", ".attn.c_proj."),
    (".input_layernorm.", ".ln_1."),
    (".post_attention_layernorm.", ".ln_2."),
    (".gate_proj.", ".w2."),  # Qwen v1: c_proj(w1(x) * silu(w2(x)))
    (".up_proj.", ".w1."),
    (".down_proj.", ".c_proj."),
    ("model.embed_tokens.", "transformer.wte."),
    ("model.norm.", "transformer.ln_f."),
    ("model.mm_projector.", "transformer.mm_projector."),
)


def to_qwen_v1(tensors, hf_config):
    """Qwen2 tensors/config.json -> Qwen v1's: renamed modules, fused c_attn = [q; k; v]."""
    out = {}
    for name, value in tensors.items():
        for old, new in QWEN_V1_NAMES:
            name = name.replace(old, new)
        out[name] = value
    for i in range(hf_config["num_hidden_layers"]):
        attn = f"transformer.h.{i}.self_attn"
        for leaf in ("weight", "bias"):
            parts = [out.pop(f"{attn}.{p}_proj.{leaf}") for p in "qkv"]
            out[f"transformer.h.{i}.attn.c_attn.{leaf}"] = np.concatenate(parts, axis=0)
    config = {
        "model_type": "qwen",
        "vocab_size": hf_config["vocab_size"],
        "hidden_size": hf_config["hidden_size"],
        "num_hidden_layers": hf_config["num_hidden_layers"],
        "num_attention_heads": hf_config["num_attention_heads"],
        "kv_channels": hf_config["hidden_size"] // hf_config["num_attention_heads"],
        "intermediate_size": 2 * hf_config["intermediate_size"],
        "layer_norm_epsilon": hf_config["rms_norm_eps"],
        "rotary_emb_base": 10000.0,
        "rotary_pct": 1.0,
        "no_bias": True,
        "tie_word_embeddings": False,
    }
    return out, config


def saved_tensors_and_config(model, directory, family):
    """The model's safetensors and config.json, in Qwen v1's layout for family "qwen"."""
    model.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    tensors = {k: np.array(v) for k, v in safetensors_io.read_checkpoint(directory).items()}
    return to_qwen_v1(tensors, config) if family == "qwen" else (tensors, config)


def write_checkpoint(tensors, config, directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    safetensors_io.write_checkpoint(tensors, directory)


VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
TOWERS = {
    "clip": lambda **kw: transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(**{**VISION, **kw})
    ),
    "siglip": lambda **kw: transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(**{**VISION, **kw})
    ),
}


def randomized(model):
    """HF inits some weights to exact zeros/ones; random values make every tensor matter."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def our_logits(config, params, ids):
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    logits, _ = Decoder(config).apply(
        {"params": params}, jnp.asarray(ids), method=lambda m, x: m(m.embed(x), positions)
    )
    return np.asarray(logits)


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_decoder_logits_match_transformers(tmp_path, family):
    model = randomized(DECODERS[family]())
    write_checkpoint(*saved_tensors_and_config(model, tmp_path / "saved", family), tmp_path / "hf")
    config, params = hf.load_decoder(tmp_path / "hf")
    ids = np.random.default_rng(0).integers(0, TEXT["vocab_size"], (2, 11))
    with torch.no_grad():
        expected = model(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(our_logits(config, params, ids), expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_decoder_export_import_round_trip_is_exact(tmp_path, family):
    model = randomized(DECODERS[family]())
    tensors, hf_config = saved_tensors_and_config(model, tmp_path / "saved", family)
    write_checkpoint(tensors, hf_config, tmp_path / "hf")
    _, params = hf.load_decoder(tmp_path / "hf")
    hf.export_decoder(params, family, tmp_path / "out")
    (tmp_path / "out" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    _, again = hf.load_decoder(tmp_path / "out")
    flat, flat_again = param_tree.flatten(params), param_tree.flatten(again)
    assert flat.keys() == flat_again.keys()
    for key in flat:
        assert flat[key].tobytes() == flat_again[key].tobytes(), key
    # The exported tensors are exactly the checkpoint's (a tied lm_head aside).
    exported = safetensors_io.read_checkpoint(tmp_path / "out")
    state = {k: v for k, v in tensors.items() if k in exported or "lm_head" not in k}
    assert exported.keys() == state.keys()
    for name, tensor in state.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)


@pytest.mark.parametrize("family", sorted(TOWERS))
@pytest.mark.parametrize("select_layer,image_size", [(-2, 32), (-1, 32), (1, 36)])
def test_vision_features_match_transformers_hidden_states(
    tmp_path, family, select_layer, image_size
):
    """36 px with 8 px patches: the convolution drops the last 4 rows and columns."""
    model = randomized(TOWERS[family](image_size=image_size))
    model.save_pretrained(tmp_path / "hf")
    config, params = hf.load_vision(
        tmp_path / "hf", select_layer=select_layer, select_feature="all"
    )
    images = np.random.default_rng(1).normal(size=(2, image_size, image_size, 3))
    images = images.astype(np.float32)
    with torch.no_grad():
        out = model(
            pixel_values=torch.as_tensor(images).permute(0, 3, 1, 2), output_hidden_states=True
        )
    expected = out.hidden_states[select_layer].numpy()
    ours = np.asarray(VisionTower(config).apply({"params": params}, jnp.asarray(images)))
    np.testing.assert_allclose(ours, expected, atol=TOLERANCE, rtol=0)


def test_unknown_tensor_and_shape_mismatch_name_the_tensor(tmp_path):
    model = randomized(DECODERS["llama"]())
    model.save_pretrained(tmp_path / "hf")
    tensors = dict(safetensors_io.read_checkpoint(tmp_path / "hf"))
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
    safetensors_io.write_checkpoint(tensors, tmp_path / "hf")
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.self_attn.extra"):
        hf.load_decoder(tmp_path / "hf")
    del tensors["model.layers.0.self_attn.extra.weight"]
    tensors["model.norm.weight"] = np.zeros((31,), np.float32)
    safetensors_io.write_checkpoint(tensors, tmp_path / "hf")
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(31,\)"):
        hf.load_decoder(tmp_path / "hf")
    del tensors["model.norm.weight"]
    safetensors_io.write_checkpoint(tensors, tmp_path / "hf")
    with pytest.raises(ValueError, match="missing tensors for params.*final_norm/scale"):
        hf.load_decoder(tmp_path / "hf")


def test_sharded_checkpoint_with_index_reads_like_one_file(tmp_path):
    model = randomized(DECODERS["phi"]())
    model.save_pretrained(tmp_path / "one")
    tensors = safetensors_io.read_checkpoint(tmp_path / "one")
    safetensors_io.write_checkpoint(tensors, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (tmp_path / "sharded" / safetensors_io.INDEX_FILE).exists()
    again = safetensors_io.read_checkpoint(tmp_path / "sharded")
    assert again.keys() == tensors.keys()
    for name in tensors:
        np.testing.assert_array_equal(again[name], tensors[name])


@pytest.mark.parametrize("tower,llm", [("clip", "phi"), ("siglip", "qwen2")])
def test_lvlm_splice_matches_pytorch_composition(tmp_path, tower, llm):
    """Our MoELLaVA forward == HF vision tower -> torch projector -> features written over the
    placeholder embeddings -> HF LLM with `inputs_embeds`."""
    import jax
    from flax import linen as nn

    from moe_llava_jax.data.conversation import IMAGE_TOKEN_INDEX
    from moe_llava_jax.models import scan
    from moe_llava_jax.models.lvlm import LVLMConfig, MoELLaVA, layer_plans
    from moe_llava_jax.models.projector import Projector

    vision_model, text_model = randomized(TOWERS[tower]()), randomized(DECODERS[llm]())
    vision_model.save_pretrained(tmp_path / "vision")
    text_model.save_pretrained(tmp_path / "llm")
    vision_cfg, vision_params = hf.load_vision(tmp_path / "vision")
    decoder_cfg, decoder_params = hf.load_decoder(tmp_path / "llm")
    features = jnp.zeros((1, vision_cfg.num_image_tokens, VISION["hidden_size"]))
    projector = Projector("mlp2x_gelu", decoder_cfg.hidden_size)
    projector_params = nn.unbox(projector.init(jax.random.key(0), features)["params"])
    params = {"vision": vision_params, "projector": projector_params, "decoder": decoder_params}

    n = vision_cfg.num_image_tokens
    rng = np.random.default_rng(2)
    ids = rng.integers(0, TEXT["vocab_size"], (2, n + 9))
    ids[0, 3 : 3 + n] = IMAGE_TOKEN_INDEX  # image after a 3-token prefix
    ids[1, :n] = IMAGE_TOKEN_INDEX  # image first
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    model_cfg = LVLMConfig(vision=vision_cfg, decoder=decoder_cfg)
    stacked = scan.stack_layers(params, layer_plans(model_cfg))  # HF: the canonical layout
    ours, _ = MoELLaVA(model_cfg).apply({"params": stacked}, jnp.asarray(ids), jnp.asarray(images))

    with torch.no_grad():
        hidden = vision_model(
            pixel_values=torch.as_tensor(images).permute(0, 3, 1, 2), output_hidden_states=True
        ).hidden_states[-2][:, 1:]  # LLaVA: penultimate layer, first token dropped
        fc = [torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)]
        for i, layer in enumerate(fc):
            layer.weight = torch.nn.Parameter(
                torch.as_tensor(np.array(projector_params[f"fc_{i}"]["kernel"]).T)
            )
            layer.bias = torch.nn.Parameter(
                torch.as_tensor(np.array(projector_params[f"fc_{i}"]["bias"]))
            )
        projected = fc[1](torch.nn.functional.gelu(fc[0](hidden)))
        is_image = torch.as_tensor(ids == IMAGE_TOKEN_INDEX)
        embeds = text_model.get_input_embeddings()(torch.as_tensor(np.maximum(ids, 0)))
        embeds[is_image] = projected.reshape(-1, projected.shape[-1])
        expected = text_model(inputs_embeds=embeds).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_stages_start_from_pretrained_llm_and_tower(tmp_path, micro_config):
    from moe_llava_jax import sharding, trainer

    llm = randomized(
        transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**dict(TEXT, vocab_size=512), num_key_value_heads=2)
        )
    )
    llm.save_pretrained(tmp_path / "llm")
    randomized(TOWERS["clip"]()).save_pretrained(tmp_path / "vision")
    micro_config.model.llm_from = str(tmp_path / "llm")
    micro_config.model.vision_from = str(tmp_path / "vision")
    data, tokenizer = from_config.prepare_data(micro_config)
    mesh = sharding.make_mesh(micro_config.mesh.to_dict())
    _, decoder = hf.load_decoder(tmp_path / "llm")
    _, vision = hf.load_vision(tmp_path / "vision")

    dense_stage = trainer.Stage(micro_config, "stage1", mesh, tokenizer.vocab_size)
    dense = param_tree.flatten(dense_stage.canonical(dense_stage.fresh_params()))
    for prefix, tree in (("decoder", decoder), ("vision", vision)):
        for path, value in param_tree.flatten(tree).items():
            np.testing.assert_array_equal(dense[f"{prefix}/{path}"], value)

    moe_stage = trainer.Stage(micro_config, "stage3", mesh, tokenizer.vocab_size)
    moe = param_tree.flatten(moe_stage.canonical(moe_stage.fresh_params()))
    experts = moe["decoder/layers_0/moe/experts/wi_up/kernel"]
    for expert in experts:  # the pretrained FFN, upcycled
        np.testing.assert_array_equal(expert, decoder["layers_0"]["mlp"]["wi_up"]["kernel"])

    stage = trainer.Stage(micro_config, "stage1", mesh, tokenizer.vocab_size)
    trainer.train_stage(stage, from_config.stage_source(micro_config, "stage1", data), tokenizer)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "workdir/stage1/metrics.jsonl")]
    assert len(losses) == 4 and np.all(np.isfinite(losses))


def test_tokenizer_larger_than_pretrained_vocab_fails(tmp_path, micro_config):
    from moe_llava_jax import sharding, trainer

    randomized(DECODERS["llama"]()).save_pretrained(tmp_path / "llm")  # vocab 96
    micro_config.model.llm_from = str(tmp_path / "llm")
    mesh = sharding.make_mesh(micro_config.mesh.to_dict())
    with pytest.raises(ValueError, match="vocab_size is only 96"):
        trainer.Stage(micro_config, "stage1", mesh, 400)


@pytest.mark.parametrize("family,stage", [("phi", 3), ("stablelm", 3), ("qwen", 3), ("stablelm", 2)])
def test_moe_llava_checkpoint_import_and_export(tmp_path, family, stage, capsys):
    """A stage-3 MoE-LLaVA checkpoint built by hand from a transformers model: every MoE layer's
    experts are DeepSpeed-named copies of its FFN, so (no drops at eval capacity, gates summing
    to 1) our MoE logits must equal the dense transformers logits. Stage 2: the dense release
    (`llava_*`), the same without experts."""
    model = randomized(DECODERS[family]())
    if family == "phi":
        with torch.no_grad():
            model.lm_head.bias.zero_()  # the released Phi variant has no lm_head bias
    model.save_pretrained(tmp_path / "dense")
    hf_config = json.loads((tmp_path / "dense" / "config.json").read_text())
    tensors = {
        k: np.array(v) for k, v in safetensors_io.read_checkpoint(tmp_path / "dense").items()
    }
    tensors.pop("lm_head.bias", None)
    rng = np.random.default_rng(0)
    num_experts, d, vision_hidden = 4, TEXT["hidden_size"], 24
    moe_layers = [0, 2] if stage == 3 else []
    for i in moe_layers:
        prefix = f"model.layers.{i}.mlp"
        for name in [k for k in tensors if k.startswith(prefix + ".")]:
            value = tensors.pop(name)
            for k in range(num_experts):
                leaf = name[len(prefix) + 1 :]
                tensors[f"{prefix}.deepspeed_moe.experts.deepspeed_experts.{k}.{leaf}"] = value
        tensors[f"{prefix}.deepspeed_moe.gate.wg.weight"] = rng.normal(
            size=(num_experts, d)
        ).astype(np.float32)
    for j, (n_out, n_in) in ((0, (d, vision_hidden)), (2, (d, d))):
        tensors[f"model.mm_projector.image_spatial_proj.{j}.weight"] = rng.normal(
            size=(n_out, n_in)
        ).astype(np.float32)
        tensors[f"model.mm_projector.image_spatial_proj.{j}.bias"] = rng.normal(
            size=(n_out,)
        ).astype(np.float32)
    if family == "qwen":
        tensors, hf_config = to_qwen_v1(tensors, hf_config)
    root, layers = (
        ("transformer", "transformer.h") if family == "qwen" else ("model", "model.layers")
    )
    # As the original's stage-3 save: the frozen tower dumped into the file too.
    tower = "transformer.image_tower" if family == "qwen" else "model.image_tower"
    for leaf in ("embeddings.patch_embedding.weight", "encoder.layers.0.mlp.fc1.bias"):
        tensors[f"{tower}.image_tower.vision_model.{leaf}"] = np.ones((3, 4), np.float32)
    if family == "stablelm":  # MoE-LLaVA-StableLM's StableLMEpoch config keys, top level
        rope = hf_config.pop("rope_parameters")
        hf_config.update(
            norm_eps=hf_config.pop("layer_norm_eps"),
            rope_pct=rope["partial_rotary_factor"],
            rope_theta=rope["rope_theta"],
        )
        assert hf_config["rope_pct"] == 0.25  # a fall-back to 1.0 would change the logits
    hf_config.update(
        model_type=f"moe_llava_{family}" if stage == 3 else f"llava_{family}",
        mm_hidden_size=vision_hidden,
        image_projector_type="mlp2x_gelu",
        mm_image_tower="openai/clip-vit-large-patch14-336",
    )
    if stage == 3:
        hf_config["moe"] = {
            "moe_layers_idx": moe_layers,
            "num_experts": [num_experts] * 2,
            "top_k_experts": 2,
            "capacity_factor": 1.5,
            "eval_capacity_factor": 2.0,
            "min_capacity": 0,
            "use_residual": False,
        }
    if family == "qwen":  # as the original's stage-3 save also writes it: a torch pickle
        (tmp_path / "moe").mkdir()
        (tmp_path / "moe" / "config.json").write_text(json.dumps(hf_config))
        torch.save(
            {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()},
            tmp_path / "moe" / "pytorch_model.bin",
        )
    else:
        write_checkpoint(tensors, hf_config, tmp_path / "moe")

    config, projector, params = hf.load_moe_llava(tmp_path / "moe")
    assert projector == "mlp2x_gelu"
    assert f"2 vision-tower tensors ({tower}.*) not imported" in capsys.readouterr().err
    if stage == 3:
        assert config.moe_layers == (0, 2) and config.moe.num_experts == 4
        np.testing.assert_array_equal(
            params["decoder"]["layers_2"]["moe"]["router"]["kernel"],
            tensors[f"{layers}.2.mlp.deepspeed_moe.gate.wg.weight"].T,
        )
    else:
        assert config.moe is None and "moe" not in params["decoder"]["layers_2"]
    np.testing.assert_array_equal(
        params["projector"]["fc_1"]["kernel"],
        tensors[f"{root}.mm_projector.image_spatial_proj.2.weight"].T,
    )
    ids = rng.integers(0, TEXT["vocab_size"], (2, 9))
    with torch.no_grad():
        expected = model(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(
        our_logits(config, params["decoder"], ids), expected, atol=TOLERANCE, rtol=0
    )

    tower_name = hf_config["mm_image_tower"]
    hf.export_moe_llava(
        params, hf_config["model_type"], projector, tmp_path / "again", decoder=config,
        mm_image_tower=tower_name,
    )
    exported = safetensors_io.read_checkpoint(tmp_path / "again")
    tensors = {k: v for k, v in tensors.items() if not k.startswith(tower)}  # not exported
    assert exported.keys() == tensors.keys()
    for name, value in tensors.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    # The exported config.json speaks the original's names and reads back to the same model.
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert written["image_projector_type"] == "mlp2x_gelu" and written["mm_image_tower"] == tower_name
    if family == "stablelm":
        assert written["rope_pct"] == 0.25 and "norm_eps" in written
    if stage == 3:
        assert written["moe"]["moe_layers_idx"] == [0, 2] and written["moe"]["num_experts"] == [4, 4]
    again_config, again_projector, again_params = hf.load_moe_llava(tmp_path / "again")
    assert (again_config, again_projector) == (config, projector)
    flat, again = param_tree.flatten(params), param_tree.flatten(again_params)
    assert flat.keys() == again.keys()
    for path, value in flat.items():
        np.testing.assert_array_equal(again[path], value, err_msg=path)


@pytest.mark.parametrize(
    "family,key,value",
    [
        ("qwen2", "use_sliding_window", True),
        ("llama", "sliding_window", 4096),
        ("stablelm", "qk_layernorm", True),
        ("llama", "rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ("llama", "attention_dropout", 0.1),  # only Phi's resid_pdrop is implemented
        ("phi", "embd_pdrop", 0.1),
    ],
)
def test_unimplemented_settings_are_refused_by_key(tmp_path, family, key, value):
    """Loading would run full, unscaled attention (or train without a dropout) where
    transformers does not: refused."""
    write_checkpoint(*saved_tensors_and_config(DECODERS[family](), tmp_path / "saved", family), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=f"config.json {key}="):
        hf.load_decoder(tmp_path / "hf")


def test_moe_llava_config_without_a_projector_kind_fails():
    moe = {
        "moe_layers_idx": [0],
        "num_experts": [4],
        "top_k_experts": 2,
        "capacity_factor": 1.5,
        "eval_capacity_factor": 2.0,
        "min_capacity": 0,
    }
    hf_config = {**transformers.PhiConfig(**TEXT).to_dict(), "model_type": "moe_llava_phi", "moe": moe}
    assert families.moe_llava_config({**hf_config, "image_projector_type": "linear"})[1] == "linear"
    with pytest.raises(ValueError, match="names no projector kind.*image_projector_type"):
        families.moe_llava_config(hf_config)


def test_phi_recipe_switches_residual_dropout_and_lm_head_bias(tmp_path, micro_config):
    """Phi-2's resid_pdrop is read as the residual dropout (model.residual_dropout >= 0
    replaces it); model.drop_lm_head_bias starts LLaVA-Phi's head without Phi-2's bias."""
    from moe_llava_jax import build, sharding, trainer

    phi = transformers.PhiForCausalLM(
        transformers.PhiConfig(**dict(TEXT, vocab_size=512), resid_pdrop=0.1)
    )
    randomized(phi).save_pretrained(tmp_path / "phi")
    micro_config.model.llm_from = str(tmp_path / "phi")
    decoder = lambda: build.model_config(micro_config, 0, with_moe=False).decoder
    assert decoder().residual_dropout == 0.1 and decoder().lm_head_bias
    micro_config.model.update(residual_dropout=0.0, drop_lm_head_bias=True)
    assert decoder().residual_dropout == 0.0 and not decoder().lm_head_bias
    _, tokenizer = from_config.prepare_data(micro_config)
    mesh = sharding.make_mesh(micro_config.mesh.to_dict())
    stage = trainer.Stage(micro_config, "stage1", mesh, tokenizer.vocab_size)
    params = stage.canonical(stage.fresh_params())["decoder"]
    assert "bias" not in params["lm_head"]
    np.testing.assert_array_equal(
        params["lm_head"]["kernel"], phi.lm_head.weight.detach().numpy().T
    )


@pytest.mark.parametrize("naming", ["moe_llava", "moe_llava_qwen", "llava"])
def test_stage2_starts_from_a_projector_only_stage1_release(tmp_path, micro_config, naming):
    """A stage-1 release is `mm_projector.bin` alone (torch pickle; LLaVA's own naming lacks
    `image_spatial_proj`); `model.projector_from` starts the first stage's projector from it."""
    from moe_llava_jax import sharding, trainer

    prefix = {
        "moe_llava": "model.mm_projector.image_spatial_proj.",
        "moe_llava_qwen": "transformer.mm_projector.image_spatial_proj.",
        "llava": "model.mm_projector.",
    }[naming]
    vision, hidden = micro_config.model.vision.hidden_size, micro_config.model.decoder.hidden_size
    rng = np.random.default_rng(0)
    shapes = {0: (hidden, vision), 2: (hidden, hidden)}
    tensors = {}
    for j, shape in shapes.items():
        tensors[f"{prefix}{j}.weight"] = rng.normal(size=shape).astype(np.float32)
        tensors[f"{prefix}{j}.bias"] = rng.normal(size=shape[:1]).astype(np.float32)
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp_path / "mm_projector.bin")
    micro_config.model.projector_from = str(tmp_path / "mm_projector.bin")
    micro_config.run_stages = "stage2"
    micro_config.stage2.init_from = ""
    trainer.validate_config(micro_config)
    _, tokenizer = from_config.prepare_data(micro_config)
    mesh = sharding.make_mesh(micro_config.mesh.to_dict())
    stage = trainer.Stage(micro_config, "stage2", mesh, tokenizer.vocab_size)
    projector = stage.canonical(stage.fresh_params())["projector"]
    for j, layer in ((0, "fc_0"), (2, "fc_1")):
        np.testing.assert_array_equal(projector[layer]["kernel"], tensors[f"{prefix}{j}.weight"].T)
        np.testing.assert_array_equal(projector[layer]["bias"], tensors[f"{prefix}{j}.bias"])


def test_a_projector_file_of_another_kind_or_an_ignored_one_is_refused(tmp_path, micro_config):
    from moe_llava_jax import trainer

    tensors = {"model.mm_projector.0.weight": np.zeros((32, 32), np.float32)}
    safetensors_io.write_file(tensors, tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match=r"p.safetensors \(model.projector_from.*missing"):
        hf.load_projector(tmp_path / "p.safetensors", "mlp2x_gelu", 32, 32)
    micro_config.model.projector_from = str(tmp_path / "p.safetensors")
    micro_config.run_stages = "stage2"  # stage2.init_from=stage1: the file would go unused
    with pytest.raises(ValueError, match="config key stage2.init_from='stage1'"):
        trainer.validate_config(micro_config)
