"""Config -> one stage's model: typed model configs, the module, its abstract params and
their shardings, fresh or pretrained params. No optimizer and no step: what the trainer,
prediction, the routing analysis and the AOT tools share (`train.Stage` adds training).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moe_llava_jax import checkpoint, sharding, upcycling
from moe_llava_jax.convert import families, hf, lazy, placement
from moe_llava_jax.data import images as image_ops
from moe_llava_jax.data.conversation import get_template
from moe_llava_jax.data.pipeline import Packing, Preprocessing, SkipLog, training_dataset
from moe_llava_jax.data.sources import RecordSource
from moe_llava_jax.data.tokenizer import Tokenizer
from moe_llava_jax.models import scan
from moe_llava_jax.models.decoder import DecoderConfig
from moe_llava_jax.models.lvlm import LVLMConfig, MoELLaVA, layer_plans
from moe_llava_jax.models.moe import MoEConfig
from moe_llava_jax.models.vision import VisionConfig


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
    """The stages a run trains, in order (`run_stages`)."""
    return [name for name in config.run_stages.split(",") if name]


def model_config(config: ml_collections.ConfigDict, vocab_size: int, with_moe: bool) -> LVLMConfig:
    """The stage's model. `model.llm_from` / `model.vision_from` (Hugging Face directories)
    take the decoder / tower dimensions from their config.json instead of `model.*`;
    `model.init_from_hf` (a MoE-LLaVA release) takes the decoder, the MoE architecture
    (`families.RELEASE_MOE_FIELDS`), the projector and the tower's feature layer from its."""
    moe = MoEConfig(**config.model.moe.to_dict()) if with_moe else None
    projector = config.model.projector
    vision_cfg = config.model.vision
    select_layer, select_feature = vision_cfg.select_layer, vision_cfg.select_feature
    if release_dir := config.model.get("init_from_hf", ""):
        release = hf.read_hf_config(release_dir)
        decoder, projector = families.moe_llava_config(release)
        if moe is not None and decoder.moe is not None:
            moe = dataclasses.replace(
                moe, **{f: getattr(decoder.moe, f) for f in families.RELEASE_MOE_FIELDS}
            )
        decoder = dataclasses.replace(decoder, moe=moe)
        select_layer = release.get("mm_vision_select_layer", select_layer)
        select_feature = release.get("mm_vision_select_feature", select_feature)
    elif config.model.llm_from:
        decoder = families.decoder_config(hf.read_hf_config(config.model.llm_from))
        decoder = dataclasses.replace(decoder, moe=moe)
    else:
        fields = config.model.decoder.to_dict()
        fields["vocab_size"] = fields["vocab_size"] or vocab_size  # 0: the tokenizer's
        decoder = DecoderConfig(**fields, moe=moe)
    decoder = recipe_overrides(config.model, decoder)
    if decoder.vocab_size < vocab_size:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens, the decoder's vocab_size is only "
            f"{decoder.vocab_size} (config keys data.tokenizer, model.llm_from, "
            "model.init_from_hf, model.decoder.vocab_size)"
        )
    if config.model.vision_from:
        vision = families.vision_config(
            hf.read_hf_config(config.model.vision_from),
            select_layer=select_layer,
            select_feature=select_feature,
        )
    else:
        vision = VisionConfig(**vision_cfg.to_dict())
    processor = image_ops.get_image_processor(config.model.image_processor)
    return LVLMConfig(
        vision=vision,
        decoder=decoder,
        projector=projector,
        dtype=config.model.dtype,
        remat=config.model.remat,
        scan_layers=config.model.scan_layers,
        # Checkpoints saved before these keys existed computed attention the xla way.
        attention=config.model.get("attention", "xla"),
        attention_chunk=config.model.get("attention_chunk", 0),
        pixel_mean=processor.mean,
        pixel_std=processor.std,
    )


def recipe_overrides(model: ml_collections.ConfigDict, decoder: DecoderConfig) -> DecoderConfig:
    """Where a recipe trains an LLM otherwise than its checkpoint says: LLaVA-Phi drops
    Phi-2's lm_head bias from stage 1 on (`model.drop_lm_head_bias`); `model.residual_dropout`
    >= 0 replaces the LLM's own rate (Phi-2's config.json: resid_pdrop 0.1). Configs saved
    before these keys existed have neither."""
    if model.get("drop_lm_head_bias", False):
        decoder = dataclasses.replace(decoder, lm_head_bias=False)
    if (rate := model.get("residual_dropout", -1.0)) >= 0:
        decoder = dataclasses.replace(decoder, residual_dropout=rate)
    return decoder


def packing(config: ml_collections.ConfigDict) -> Packing:
    """`data.packing` and its keys (checked)."""
    data = config.data
    return Packing(
        data.packing, data.packing_bins, data.image_slots, data.buckets, data.bucket_window
    )


def check_release_start(config: ml_collections.ConfigDict, stage: str) -> None:
    """Stage `stage` starts from the release `model.init_from_hf` names (if it names one):
    the keys that would contradict it are refused before any work."""
    release_dir = config.model.get("init_from_hf", "")
    if not release_dir:
        return
    release = hf.read_hf_config(release_dir)
    families.moe_llava_config(release)  # a release at all (its model_type, MoE section)
    for key in ("llm_from", "projector_from"):
        if value := config.model.get(key, ""):
            raise ValueError(
                f"config key model.{key}={value!r}: the decoder and projector come from "
                f"model.init_from_hf={release_dir!r}; set model.{key}=''"
            )
    if not config.model.vision_from:
        raise ValueError(
            f"config key model.vision_from is empty: {release_dir} (model.init_from_hf) holds "
            f"no usable tower; give the directory of its mm_image_tower "
            f"{release.get('mm_image_tower', '')!r}"
        )
    if release["model_type"] in families.MOE_LLAVA_TYPES and not config[stage].moe:
        raise ValueError(
            f"config key {stage}.moe=False: model.init_from_hf={release_dir!r} is a MoE "
            f"release ({release['model_type']}); start a MoE stage from it (e.g. run_stages=stage3)"
        )


def init_variables(
    model: MoELLaVA, dummy: tuple[jax.ShapeDtypeStruct, ...], rng: jax.Array
) -> dict:
    """`model.init` on zeros of the dummy (input_ids, images) shapes, with the gating stream
    its MoE layers draw. Call it traced (eval_shape, jit): the zeros are then never made."""
    params_rng, gating_rng = jax.random.split(rng)
    inputs = [jnp.zeros(d.shape, d.dtype) for d in dummy]
    return model.init({"params": params_rng, "gating": gating_rng}, *inputs)


class StageModel:
    """Stage `name` of `config` as a model on `mesh`: its configs, module, abstract params
    (model layout), their shardings under the config's `sharding_rules`, and the conversion
    to the canonical per-layer layout (`models/scan.py`)."""

    def __init__(
        self, config: ml_collections.ConfigDict, name: str, mesh: jax.sharding.Mesh, vocab_size: int
    ):
        self.config, self.name, self.mesh = config, name, mesh
        self.stage_cfg = config[name]
        # The mesh's platform picks `auto` kernels: an AOT compile for TPU from a CPU host
        # gets TPU's attention kernel.
        self.model_cfg = dataclasses.replace(
            model_config(config, vocab_size, self.stage_cfg.moe),
            platform=mesh.devices.flat[0].platform,
        )
        expert_devices = mesh.shape.get("expert", 1)
        if self.stage_cfg.moe and config.model.moe.num_experts % expert_devices:
            raise ValueError(
                f"config key model.moe.num_experts={config.model.moe.num_experts} does not "
                f"split over the mesh's {expert_devices} expert devices (config key mesh.expert)"
            )
        self.model = MoELLaVA(self.model_cfg)
        self.rules = sharding.rules_from_config(config.sharding_rules)
        batch = config.model.moe.num_groups
        size = self.model_cfg.vision.image_size
        # Shapes only: init builds its zeros inside eval_shape / jit, so nothing is made on
        # the mesh's devices (which may be an AOT target with no memory here).
        self.dummy = (
            jax.ShapeDtypeStruct((batch, self.stage_cfg.max_length), jnp.int32),
            jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
        )
        boxed = jax.eval_shape(self.init_variables, jax.random.key(0))["params"]
        self.param_shardings = sharding.logical_shardings(boxed, mesh, self.rules)
        self.abstract_params = nn.unbox(boxed)
        self.plans = layer_plans(self.model_cfg)

    def canonical(self, tree: dict) -> dict:
        """A tree in this stage's model layout (params, mask, shapes) -> the canonical
        per-layer layout (`models/scan.py`) that rules, HF names and upcycling speak."""
        return scan.unstack_layers(tree, self.plans)

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            image_size=self.model_cfg.vision.image_size,
            processor=image_ops.get_image_processor(self.config.model.image_processor),
            pad_to_square=self.stage_cfg.pad_to_square,
            num_image_tokens=self.model_cfg.vision.num_image_tokens,
            max_length=self.stage_cfg.max_length,
        )

    def skip_log(self, source: RecordSource, path: Path) -> SkipLog:
        """Where this stage lists (and counts) the records it leaves out."""
        return SkipLog(
            path,
            source.skipped,
            source=repr(source),
            max_bad_fraction=self.config.data.max_bad_fraction,
        )

    def dataset(self, source: RecordSource, tokenizer: Tokenizer, skip_log: SkipLog):
        """The stage's training batches (this process's share of each step's), in order."""
        return training_dataset(
            source,
            tokenizer,
            get_template(self.stage_cfg.template),
            self.preprocessing(),
            skip_log,
            global_batch_size=self.stage_cfg.batch_size,
            seed=self.config.seed,
            workers=self.config.data.workers,
            reader_threads=self.config.data.reader_threads,
            packing=self.packing,
        )

    @property
    def packing(self) -> Packing:
        return packing(self.config)

    def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
        """(shape, dtype) of each array of a global batch, as `dataset` makes them (bucket
        mode: its longest, max_length)."""
        b, t = self.stage_cfg.batch_size, self.stage_cfg.max_length
        image = (self.model_cfg.vision.image_size,) * 2 + (3,)
        shapes = {"input_ids": ((b, t), jnp.int32), "labels": ((b, t), jnp.int32)}
        if self.packing.mode != "first_fit":
            return {**shapes, "images": ((b, *image), jnp.uint8)}
        return {
            **shapes,
            "images": ((b, self.packing.image_slots, *image), jnp.uint8),
            "segments": ((b, t), jnp.int32),
            "positions": ((b, t), jnp.int32),
        }

    def init_variables(self, rng: jax.Array) -> dict:
        return init_variables(self.model, self.dummy, rng)

    @property
    def targets(self) -> dict:
        """This stage's params as `ShapeDtypeStruct`s with their dtypes and shardings (model
        layout): where imported or restored weights are placed."""
        return checkpoint.abstract_like(self.abstract_params, self.param_shardings)

    def layout(self, model_cfg: LVLMConfig) -> tuple[scan.Plans, dict]:
        """(plans, sharded `ShapeDtypeStruct`s) of `model_cfg`'s params on this mesh: another
        layout of this stage's weights (a checkpoint saved with the other
        `model.scan_layers`, the dense decoder an upcycled stage starts from)."""
        boxed = jax.eval_shape(
            lambda rng: init_variables(MoELLaVA(model_cfg), self.dummy, rng), jax.random.key(0)
        )["params"]
        shardings = sharding.logical_shardings(boxed, self.mesh, self.rules)
        return layer_plans(model_cfg), checkpoint.abstract_like(nn.unbox(boxed), shardings)

    def random_params(self) -> dict:
        return self.assemble({}, upcycle=False)

    def pretrained_weights(self) -> tuple[dict, bool]:
        """What `model.vision_from`, `model.llm_from`, `model.init_from_hf` (a release's
        decoder and projector) and `model.projector_from` (a stage-1 release's projector)
        name, as lazy tensors in the canonical layout (nothing read yet), and whether its
        decoder (if any) is dense."""
        model = self.config.model
        pretrained, dense_decoder = {}, True
        if model.vision_from:
            pretrained["vision"] = hf.load_vision(
                model.vision_from,
                select_layer=self.model_cfg.vision.select_layer,
                select_feature=self.model_cfg.vision.select_feature,
                lazy=True,
            )[1]
        if model.get("init_from_hf", ""):
            release_decoder, _, release = hf.load_moe_llava(model.init_from_hf, lazy=True)
            pretrained.update(release)
            dense_decoder = release_decoder.moe is None
        elif model.llm_from:
            pretrained["decoder"] = hf.load_decoder(model.llm_from, lazy=True)[1]
        if model.get("projector_from", ""):
            pretrained["projector"] = hf.load_projector(
                model.projector_from,
                self.model_cfg.projector,
                self.model_cfg.vision.hidden_size,
                self.model_cfg.decoder.hidden_size,
                lazy=True,
            )
        if "decoder" in pretrained and not self.model_cfg.decoder.lm_head_bias:
            pretrained["decoder"]["lm_head"].pop("bias", None)  # model.drop_lm_head_bias
        return pretrained, dense_decoder

    def fresh_params(self) -> dict:
        """Random init with the pretrained weights the config names loaded over it
        (`pretrained_weights`); a dense pretrained LLM is upcycled when this stage's model
        is MoE.

        Each weight goes from the memory-mapped checkpoint straight to its devices, one
        shard at a time, in the file's dtype until it is there (`convert/placement.py`),
        already stacked in the layout it is placed in; the random rest is drawn by the
        same jitted call that takes the weights over (`assembly`), which adopts their
        buffers. Host memory: the file mapping plus one shard; devices: the params."""
        pretrained, dense_decoder = self.pretrained_weights()
        if not pretrained:
            return self.random_params()
        upcycle = (
            "decoder" in pretrained and dense_decoder and self.model_cfg.decoder.moe is not None
        )
        if upcycle:
            dense = dataclasses.replace(self.model_cfg.decoder, moe=None)
            plans, targets = self.layout(dataclasses.replace(self.model_cfg, decoder=dense))
        else:
            plans, targets = self.plans, self.targets
        stacked = scan.stack_layers(
            pretrained, plans, combine=lambda _, leaves: lazy.stacked(leaves)
        )
        return self.assembly(upcycle, plans)(placement.place(stacked, targets))

    def assemble(self, pretrained: dict, *, upcycle: bool) -> dict:
        """`assembly(upcycle)` applied to `pretrained` (canonical layout)."""
        return self.assembly(upcycle)(pretrained)

    def assembly(
        self, upcycle: bool, source_plans: scan.Plans | None = None
    ) -> Callable[[dict], dict]:
        """The jitted `pretrained -> params`: this stage's params (model layout, sharded) from
        `pretrained` (some of the top-level subtrees, in the layout of `source_plans`;
        None: canonical) over a fresh init of the rest, its dense decoder upcycled as
        `config.upcycle` says when `upcycle` (and this stage is MoE).

        One jitted call that traces the init: XLA computes only the random params that
        survive (what `pretrained` lacks, the routers), so no second random tree (at
        stage 3: a whole random MoE model) is ever held beside the real one. Given in this
        stage's own layout and not upcycled, `pretrained` passes through and is donated:
        its buffers become the output's, so the weights are on the devices once."""
        up = self.config.upcycle
        upcycle = upcycle and self.model_cfg.decoder.moe is not None
        source_plans = {} if source_plans is None else source_plans  # {}: canonical
        passthrough = not upcycle and source_plans == self.plans

        def assemble(pretrained: dict) -> dict:
            init = nn.unbox(self.init_variables(jax.random.key(self.config.seed))["params"])
            if passthrough:
                return {**init, **pretrained}
            init = self.canonical(init)
            merged = {**init, **scan.unstack_layers(pretrained, source_plans)}
            if upcycle:
                merged = upcycling.upcycle(
                    merged,
                    init,
                    jax.random.key(up.seed),
                    mode=up.mode,
                    noise_scale=up.noise_scale,
                    drop_fraction=up.drop_fraction,
                )
            return scan.stack_layers(merged, self.plans)

        donate = (0,) if passthrough else ()
        return jax.jit(assemble, out_shardings=self.param_shardings, donate_argnums=donate)

    def restore_params(self, directory: str | Path) -> tuple[dict, int]:
        """The latest params under a checkpoints `directory` of this stage's model, placed
        on this model's mesh (whatever mesh they were saved from), and their step.

        Params saved in the other layout (the checkpoint's own config has the other
        `model.scan_layers`) are restored in theirs and converted through the canonical one,
        so a looped stage 2 can start a scanned stage 3 and the other way round."""
        saved_config = json.loads(checkpoint.restore_meta(directory)["config"])
        # A config saved before scanned layers existed: the loop was the only layout.
        saved_scan = saved_config["model"].get("scan_layers", False)
        saved_cfg = dataclasses.replace(self.model_cfg, scan_layers=saved_scan)
        saved_plans, saved_targets = self.layout(saved_cfg)
        if saved_plans == self.plans:
            return checkpoint.restore_params(directory, self.targets)
        params, step = checkpoint.restore_params(directory, saved_targets)
        return self.assembly(False, saved_plans)(params), step
