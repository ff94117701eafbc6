"""MoE-Tuning trainer: `python -m moe_llava_jax.train --config=configs/moe_tuning.py`.

Runs the stages the config lists (stage1 -> stage2 -> stage3), each resumable from its own
checkpoints, then POPE after the stages named in `config.pope.after`. Readable top to bottom:
config -> model -> shardings -> state (fresh, resumed, `init_from`, or upcycled) -> loop.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import optax
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from moe_llava_jax import checkpoint, distributed, flops, optim, sharding, stages
from moe_llava_jax.answering import Answerer
from moe_llava_jax.convert import families, hf
from moe_llava_jax.data import images as image_ops
from moe_llava_jax.data.conversation import get_template
from moe_llava_jax.data.pipeline import MODEL_INPUTS, Preprocessing, SkipLog, training_dataset
from moe_llava_jax.data.sources import ConcatSource, LlavaJsonSource, RecordSource
from moe_llava_jax.data.tfds_source import tfds_source_from_spec
from moe_llava_jax.data.synthetic import SyntheticDataset, write_synthetic_dataset
from moe_llava_jax.data.tokenizer import Tokenizer
from moe_llava_jax.evaluate import pope, routing
from moe_llava_jax.evaluate.run_pope import evaluate_pope
from moe_llava_jax.generate import CachedDecoder
from moe_llava_jax.models.decoder import DecoderConfig
from moe_llava_jax.models.lvlm import LVLMConfig, MoELLaVA
from moe_llava_jax.models.moe import MoEConfig, moe_layer_indices
from moe_llava_jax.models.vision import VisionConfig
from moe_llava_jax.metrics_log import StageLog, Throughput
from moe_llava_jax.preemption import PreemptionWatch
from moe_llava_jax.train_step import jit_train_step, make_train_step

STAGE_COMMANDS = {
    name: f"python -m moe_llava_jax.train --config=configs/{name}.py"
    for name in ("stage1", "stage2", "stage3")
}


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
    return [name for name in config.run_stages.split(",") if name]


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fails before any work on values that would fail (or silently misbehave) later."""
    if "://" in config.workdir:
        raise ValueError(
            f"config key workdir={config.workdir!r}: the trainer writes through the file system "
            "(it appends to its logs); mount the bucket (e.g. gcsfuse at /gcs/BUCKET) on every "
            "host and give that path"
        )
    moe = config.model.moe
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ValueError(
            f"config key model.moe.top_k={moe.top_k} must be in "
            f"[1, model.moe.num_experts={moe.num_experts}]"
        )
    num_layers = config.model.decoder.num_layers
    if config.model.llm_from:
        num_layers = hf.read_hf_config(config.model.llm_from)["num_hidden_layers"]
    moe_layer_indices(moe.layers, num_layers)
    up = config.upcycle
    stages.check_upcycling(up.mode, up.noise_scale, up.drop_fraction)
    if config.router_z_loss_coef < 0:
        raise ValueError(f"config key router_z_loss_coef={config.router_z_loss_coef} must be >= 0")
    routing_after = [n for n in config.routing.after.split(",") if n]
    for name in (
        stage_names(config) + [n for n in config.pope.after.split(",") if n] + routing_after
    ):
        if name not in config:
            raise ValueError(
                f"config key run_stages/pope.after/routing.after names {name!r}, which has no "
                f"config.{name} section"
            )
    for name in routing_after:
        if not config[name].moe:
            raise ValueError(f"config key routing.after names {name!r}, which has no MoE layers")
    for name in stage_names(config):
        stages.resolve_rules(config[name].trainable)
        accum = config[name].grad_accum_steps
        if accum < 1:
            raise ValueError(f"config key {name}.grad_accum_steps={accum} must be >= 1")
        if config[name].batch_size % (moe.num_groups * accum):
            raise ValueError(
                f"config key {name}.batch_size={config[name].batch_size} is not a multiple of "
                f"model.moe.num_groups={moe.num_groups} x {name}.grad_accum_steps={accum} "
                "(each micro-batch is routed in num_groups groups)"
            )
    image_ops.get_image_processor(config.model.image_processor)


def model_config(config: ml_collections.ConfigDict, vocab_size: int, with_moe: bool) -> LVLMConfig:
    """The stage's model. `model.llm_from` / `model.vision_from` (Hugging Face directories)
    take the decoder / tower dimensions from their config.json instead of `model.*`."""
    moe = MoEConfig(**config.model.moe.to_dict()) if with_moe else None
    if config.model.llm_from:
        decoder = families.decoder_config(hf.read_hf_config(config.model.llm_from))
        decoder = dataclasses.replace(decoder, moe=moe)
    else:
        fields = config.model.decoder.to_dict()
        fields["vocab_size"] = fields["vocab_size"] or vocab_size  # 0: the tokenizer's
        decoder = DecoderConfig(**fields, moe=moe)
    if decoder.vocab_size < vocab_size:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens, the decoder's vocab_size is only "
            f"{decoder.vocab_size} (config keys data.tokenizer, model.llm_from, "
            "model.decoder.vocab_size)"
        )
    vision_cfg = config.model.vision
    if config.model.vision_from:
        vision = families.vision_config(
            hf.read_hf_config(config.model.vision_from),
            select_layer=vision_cfg.select_layer,
            select_feature=vision_cfg.select_feature,
        )
    else:
        vision = VisionConfig(**vision_cfg.to_dict())
    return LVLMConfig(
        vision=vision,
        decoder=decoder,
        projector=config.model.projector,
        dtype=config.model.dtype,
        remat=config.model.remat,
    )


def checkpoint_dir(config: ml_collections.ConfigDict, stage: str) -> Path:
    return Path(config.workdir) / stage / "checkpoints"


class Stage:
    """One stage's model, shardings and jitted functions (built once, used by train + eval)."""

    def __init__(
        self, config: ml_collections.ConfigDict, name: str, mesh: jax.sharding.Mesh, vocab_size: int
    ):
        self.config, self.name, self.mesh = config, name, mesh
        self.stage_cfg = config[name]
        self.model_cfg = model_config(config, vocab_size, self.stage_cfg.moe)
        expert_devices = mesh.shape.get("expert", 1)
        if self.stage_cfg.moe and config.model.moe.num_experts % expert_devices:
            raise ValueError(
                f"config key model.moe.num_experts={config.model.moe.num_experts} does not "
                f"split over the mesh's {expert_devices} expert devices (config key mesh.expert)"
            )
        self.model = MoELLaVA(self.model_cfg)
        batch = config.model.moe.num_groups
        self.dummy = (
            jnp.zeros((batch, self.stage_cfg.max_length), jnp.int32),
            jnp.zeros(
                (batch, self.model_cfg.vision.image_size, self.model_cfg.vision.image_size, 3),
                jnp.float32,
            ),
        )
        boxed = jax.eval_shape(self.init_variables, jax.random.key(0))["params"]
        self.param_shardings = sharding.logical_shardings(boxed, mesh)
        self.abstract_params = nn.unbox(boxed)
        self.mask = stages.trainable_mask(self.abstract_params, self.stage_cfg.trainable)
        self.schedule = optim.make_schedule(
            self.stage_cfg.lr, self.stage_cfg.num_steps, self.stage_cfg.warmup_ratio
        )
        self.tx = optim.make_optimizer(
            self.schedule,
            self.mask,
            weight_decay=self.stage_cfg.weight_decay,
            grad_clip=self.stage_cfg.grad_clip,
        )
        replicated = sharding.replicated(mesh)
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        self.state_shardings = {
            "step": replicated,
            "params": self.param_shardings,
            "opt_state": optax.tree_map_params(
                self.tx,
                lambda p, s: p if isinstance(p, optax.MaskedNode) else s,
                abstract_opt,
                self.param_shardings,
                transform_non_params=lambda _: replicated,
                is_leaf=lambda x: isinstance(x, optax.MaskedNode),
            ),
        }
        self.abstract_state = {
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "params": self.abstract_params,
            "opt_state": abstract_opt,
        }
        self.batch_sharding = sharding.batch_sharding(mesh)
        # Model FLOPs of one step on the padded global batch (MFU, `flops.py`).
        self.step_flops = flops.train_step_flops(
            self.model_cfg, self.mask, self.stage_cfg.batch_size, self.stage_cfg.max_length
        )
        self.train_step = jit_train_step(
            make_train_step(
                self.model,
                self.tx,
                self.mask,
                self.schedule,
                aux_loss_coef=config.router_aux_loss_coef,
                z_loss_coef=config.router_z_loss_coef,
                seed=config.seed,
                grad_accum_steps=self.stage_cfg.grad_accum_steps,
            ),
            self.state_shardings,
            self.batch_sharding,
            replicated,
        )

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
        )

    def init_variables(self, rng: jax.Array) -> dict:
        params_rng, gating_rng = jax.random.split(rng)
        return self.model.init({"params": params_rng, "gating": gating_rng}, *self.dummy)

    def random_params(self) -> dict:
        init = jax.jit(
            lambda rng: nn.unbox(self.init_variables(rng)["params"]),
            out_shardings=self.param_shardings,
        )
        return init(jax.random.key(self.config.seed))

    def fresh_params(self) -> dict:
        """Random init, with the towers named by `model.vision_from` / `model.llm_from`
        loaded over it (a pretrained LLM is upcycled when this stage's model is MoE)."""
        params = self.random_params()
        pretrained = {}
        if self.config.model.vision_from:
            pretrained["vision"] = hf.load_vision(
                self.config.model.vision_from,
                select_layer=self.model_cfg.vision.select_layer,
                select_feature=self.model_cfg.vision.select_feature,
            )[1]
        if self.config.model.llm_from:
            pretrained["decoder"] = hf.load_decoder(self.config.model.llm_from)[1]
        if not pretrained:
            return params
        merged = {**params, **pretrained}
        if self.model_cfg.decoder.moe is not None and "decoder" in pretrained:
            return self.upcycle(merged, params)
        return jax.device_put(merged, self.param_shardings)

    def initial_params(self) -> dict:
        """Fresh init, or the `init_from` stage's params (upcycled to MoE for stage 3)."""
        source = self.stage_cfg.init_from
        if not source:
            return self.fresh_params()
        directory = checkpoint_dir(self.config, source)
        if not directory.exists():
            raise FileNotFoundError(
                f"config key {self.name}.init_from={source!r}: no checkpoint at {directory}; make it "
                f"with: {STAGE_COMMANDS.get(source, source)}"
            )
        source_stage = Stage(self.config, source, self.mesh, self.model_cfg.decoder.vocab_size)
        abstract = checkpoint.abstract_like(
            source_stage.abstract_params, source_stage.param_shardings
        )
        params, step = checkpoint.restore_params(directory, abstract)
        tqdm.write(f"{self.name}: initialised from {directory} (step {step})")
        if self.model_cfg.decoder.moe is not None and source_stage.model_cfg.decoder.moe is None:
            return self.upcycle(params, self.random_params())
        return params

    def upcycle(self, dense_params: dict, moe_init: dict) -> dict:
        """Dense params -> this stage's MoE params as `config.upcycle` says, sharded."""
        up = self.config.upcycle
        upcycle = jax.jit(
            functools.partial(
                stages.upcycle,
                mode=up.mode,
                noise_scale=up.noise_scale,
                drop_fraction=up.drop_fraction,
            ),
            out_shardings=self.param_shardings,
        )
        return upcycle(dense_params, moe_init, jax.random.key(up.seed))

    def initial_state(self, manager, data_iterator) -> dict:
        """The latest checkpoint's state (and data position), else step 0 from `init_from`."""
        if manager.latest_step() is not None:
            tqdm.write(f"{self.name}: resuming from step {manager.latest_step()}")
            return checkpoint.restore_state(
                manager,
                checkpoint.abstract_like(self.abstract_state, self.state_shardings),
                data_iterator,
            )
        params = self.initial_params()
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"])
        return {"step": step, "params": params, "opt_state": opt_state}


def train_stage(stage: Stage, source: RecordSource, tokenizer: Tokenizer) -> dict:
    """Trains `stage` to `num_steps` (resuming if checkpoints exist); returns final params.

    Exits the process (code 0) after checkpointing the current step when preempted; stops
    with `NonFiniteLossError` after `max_nonfinite_steps` updates in a row were skipped for
    non-finite gradients (the optimizer skips them, `optim.make_optimizer`)."""
    cfg, config = stage.stage_cfg, stage.config
    stage_dir = Path(config.workdir) / stage.name
    manager = checkpoint.make_manager(
        checkpoint_dir(config, stage.name),
        save_interval_steps=cfg.checkpoint_every,
        keep_last=cfg.keep_last,
        keep_every=cfg.keep_every,
    )
    suffix = f".process{jax.process_index()}" if jax.process_count() > 1 else ""
    skip_log = stage.skip_log(source, stage_dir / f"skipped{suffix}.jsonl")
    data_iterator = iter(stage.dataset(source, tokenizer, skip_log))
    state = stage.initial_state(manager, data_iterator)
    start = int(jax.device_get(state["step"]))
    meta = {"stage": stage.name, "config": config.to_json()}
    throughput = Throughput(
        tokens_per_step=cfg.batch_size * cfg.max_length,
        flops_per_step=stage.step_flops.total,
        peak_flops=config.peak_flops_per_device * jax.device_count(),
    )
    with (
        StageLog(stage_dir, stage.name, start, cfg.num_steps) as log,
        PreemptionWatch() as preemption,
    ):
        for step, local_batch in zip(range(start + 1, cfg.num_steps + 1), data_iterator):
            batch = {
                k: jax.make_array_from_process_local_data(stage.batch_sharding, local_batch[k])
                for k in MODEL_INPUTS
            }
            state, metrics = stage.train_step(state, batch)  # state["step"] is now `step`
            streak = int(metrics["nonfinite_streak"])  # waits for the step: the loop's sync
            throughput.tick()
            if step % cfg.log_every == 0 or step == cfg.num_steps:
                log.log(step, metrics, throughput.rates())
            stop = preemption.should_stop(manager, step)
            force = step == cfg.num_steps or stop or streak >= config.max_nonfinite_steps
            checkpoint.save(manager, state, data_iterator, meta, force=force)
            log.bar.update(1)
            if streak >= config.max_nonfinite_steps:
                manager.wait_until_finished()
                raise NonFiniteLossError(
                    f"{stage.name}: {streak} steps in a row (up to step {step}) had a non-finite "
                    f"loss or gradients and were skipped (config key max_nonfinite_steps="
                    f"{config.max_nonfinite_steps}); checkpoint saved at step {step} holds the "
                    "weights of the last finite step. Lower the learning rate or check the data; "
                    f"the losses are in {stage_dir / 'metrics.jsonl'}."
                )
            if stop:
                manager.wait_until_finished()
                log.message(f"{stage.name}: preempted; checkpoint saved at step {step}, exiting")
                raise SystemExit(0)
    manager.wait_until_finished()
    manager.close()
    if skip_log.entries:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(skip_log.counts().items()))
        tqdm.write(f"{stage.name}: records left out: {counts} (list: {skip_log.path})")
    return state["params"]


class NonFiniteLossError(RuntimeError):
    """Training stopped: too many consecutive steps with non-finite loss or gradients."""


def analyse_routing(stage: Stage, params: dict, source: RecordSource, tokenizer: Tokenizer):
    """Expert choices per modality on `config.routing.num_batches` batches of the stage's
    data -> summary; routing.{json,png} in the stage's `routing/` folder."""
    out_dir = Path(stage.config.workdir) / stage.name / "routing"
    num_batches = stage.config.routing.num_batches
    return routing.analyse(stage, params, source, tokenizer, num_batches, out_dir)


def run_pope(
    config: ml_collections.ConfigDict,
    stage: Stage,
    params: dict,
    tokenizer: Tokenizer,
    data_root: Path,
    annotations_path: Path,
) -> dict:
    annotations = json.loads(annotations_path.read_text())
    out_dir = Path(config.workdir) / stage.name / "pope"
    out_dir.mkdir(parents=True, exist_ok=True)
    answerer = Answerer(
        functools.partial(CachedDecoder(stage.model_cfg), params),
        tokenizer,
        get_template(config.pope.template),
        stage.preprocessing(),
        batch_size=config.pope.batch_size,
        max_new_tokens=config.pope.max_new_tokens,
    )
    return evaluate_pope(
        answerer,
        annotations,
        data_root,
        splits=pope.SPLITS,
        num_per_image=config.pope.num_per_image,
        seed=config.seed,
        answers_dir=out_dir,
    )


def data_root(config: ml_collections.ConfigDict) -> Path:
    return Path(config.data.root or Path(config.workdir) / "data")


def load_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """`data.tokenizer`, default: the one trained on the embedded data."""
    path = config.data.tokenizer or SyntheticDataset.from_root(data_root(config)).tokenizer_json
    return Tokenizer.from_file(path, eos_token=config.data.eos_token)


def prepare_data(config: ml_collections.ConfigDict) -> tuple[SyntheticDataset, Tokenizer]:
    """Writes (or reuses) the embedded dataset under `data.root` (default: workdir/data).
    Process 0 writes it; the others wait, then read it (a shared workdir is one folder)."""
    if jax.process_index() == 0:
        write_synthetic_dataset(data_root(config), **config.data.synthetic.to_dict())
    multihost_utils.sync_global_devices("embedded dataset written")
    data = write_synthetic_dataset(data_root(config), **config.data.synthetic.to_dict())
    return data, load_tokenizer(config)


def stage_source(
    config: ml_collections.ConfigDict, name: str, data: SyntheticDataset
) -> RecordSource:
    """`stageN.data`: one source or several joined by commas (read as one, concatenated):
    'captions' / 'instruct' (embedded data), a TFDS dataset (`tfds:NAME/SPLIT@DATA_DIR`, e.g.
    written by `data.convert_to_tfds`), or a LLaVA JSON/JSONL path whose image paths are
    relative to `data.image_root`."""
    specs = [spec.strip() for spec in config[name].data.split(",") if spec.strip()]
    sources = [_one_source(config, name, spec, data) for spec in specs]
    return sources[0] if len(sources) == 1 else ConcatSource(sources)


def _one_source(
    config: ml_collections.ConfigDict, name: str, spec: str, data: SyntheticDataset
) -> RecordSource:
    embedded = {"captions": data.captions_json, "instruct": data.instruct_json}
    max_bad = config.data.max_bad_fraction
    if spec in embedded:
        return LlavaJsonSource(embedded[spec], data.root, max_bad)
    if spec.startswith("tfds:"):  # tfds:NAME/SPLIT[@DATA_DIR][?option=value&...]
        return tfds_source_from_spec(spec)
    if not Path(spec).is_file():
        raise FileNotFoundError(
            f"config key {name}.data: {spec!r} is not one of {sorted(embedded)}, not tfds:… "
            "and not a file"
        )
    return LlavaJsonSource(spec, config.data.image_root or Path(spec).parent, max_bad)


def run(config: ml_collections.ConfigDict) -> dict:
    """The run `config` describes: its stages in turn, routing analysis and POPE where asked.
    Returns the POPE metrics by "stage/split" (also written to workdir/pope.{md,json})."""
    validate_config(config)
    distributed.initialize(config.distributed)
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data, tokenizer = prepare_data(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    chief = jax.process_index() == 0  # prints and writes run-level files
    if chief:
        print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} devices")
    results = {}
    pope_after = [n for n in config.pope.after.split(",") if n]
    routing_after = [n for n in config.routing.after.split(",") if n]
    start = time.time()
    # The context mesh: dropless MoE layers shard_map their experts over its `expert` axis.
    with jax.set_mesh(mesh):
        for name in stage_names(config):
            stage = Stage(config, name, mesh, tokenizer.vocab_size)
            source = stage_source(config, name, data)
            params = train_stage(stage, source, tokenizer)
            if name in routing_after:
                analyse_routing(stage, params, source, tokenizer)
            if name in pope_after:
                for split, metrics in run_pope(
                    config, stage, params, tokenizer, data.root, data.eval_annotations_json
                ).items():
                    results[f"{name}/{split}"] = metrics
    if results and chief:
        table = pope.markdown_table(results)
        (workdir / "pope.md").write_text(table + "\n")
        (workdir / "pope.json").write_text(json.dumps(results, indent=2))
        print(
            f"\nHeld-out POPE ({config.data.synthetic.num_eval} images, "
            f"{config.pope.num_per_image} yes + {config.pope.num_per_image} no probes each):"
        )
        print(table)
    if chief:
        print(f"done in {time.time() - start:.0f}s; workdir: {workdir}")
    return results


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO; the bar shows progress
    run(flags.FLAGS.config)


if __name__ == "__main__":
    # Defined only when run as a program: the ablation imports this module with its own flag.
    config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
    app.run(main)
