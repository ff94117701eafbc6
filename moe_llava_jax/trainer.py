"""MoE-Tuning as a library: `Stage` (a stage's model plus mask, optimizer, state shardings
and jitted step), `train_stage` (its loop: resumable, preemptible) and `run` (the stages a
config lists, then routing analysis and POPE). `python -m moe_llava_jax.train` is the command.

Readable top to bottom: config -> model -> shardings -> state (fresh, resumed, `init_from`,
or upcycled) -> loop.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath
from tqdm import tqdm

from moe_llava_jax import checkpoint, distributed, flops, freeze, optim, sharding, upcycling
from moe_llava_jax import build
from moe_llava_jax.build import StageModel
from moe_llava_jax.answering import Answerer
from moe_llava_jax.convert import hf
from moe_llava_jax.data import from_config
from moe_llava_jax.data import images as image_ops
from moe_llava_jax.data.conversation import get_template
from moe_llava_jax.data.pipeline import MODEL_INPUTS
from moe_llava_jax.data.sources import RecordSource
from moe_llava_jax.data.tokenizer import Tokenizer
from moe_llava_jax.evaluate import pope, routing
from moe_llava_jax.evaluate.run_pope import evaluate_pope
from moe_llava_jax.generate import CachedDecoder
from moe_llava_jax.models import scan
from moe_llava_jax.models.dropless import check_exchange
from moe_llava_jax.models.moe import GROUPINGS, moe_layer_indices
from moe_llava_jax.metrics_log import StageLog, Throughput
from moe_llava_jax.preemption import PreemptionWatch
from moe_llava_jax.train_step import jit_train_step, make_train_step

STAGE_COMMANDS = {
    name: f"python -m moe_llava_jax.train --config=configs/{name}.py"
    for name in ("stage1", "stage2", "stage3")
}
CHECKPOINT_FROZEN = ("once", "every_save")  # config key checkpoints.frozen


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fails before any work on values that would fail (or silently misbehave) later."""
    if "://" in config.workdir:
        raise ValueError(
            f"config key workdir={config.workdir!r}: the trainer writes through the file system "
            "(it appends to its logs); mount the bucket (e.g. gcsfuse at /gcs/BUCKET) on every "
            "host and give that path, and checkpoints.root the bucket's URL for checkpoints"
        )
    moe = config.model.moe
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ValueError(
            f"config key model.moe.top_k={moe.top_k} must be in "
            f"[1, model.moe.num_experts={moe.num_experts}]"
        )
    if moe.groups not in GROUPINGS:
        raise ValueError(f"config key model.moe.groups={moe.groups!r}: expected one of {GROUPINGS}")
    check_exchange(moe.exchange, moe.receive_factor)
    first = next(iter(build.stage_names(config)), None)
    if first and config.model.get("init_from_hf", ""):
        build.check_release_start(config, first)
    for key in ("init_from_hf", "projector_from"):
        if first and config[first].init_from and (value := config.model.get(key, "")):
            raise ValueError(
                f"config key {first}.init_from={config[first].init_from!r}: the run's first "
                f"stage starts from model.{key}={value!r}; set {first}.init_from=''"
            )
    num_layers = config.model.decoder.num_layers
    if pretrained := config.model.get("init_from_hf", "") or config.model.llm_from:
        num_layers = hf.read_hf_config(pretrained)["num_hidden_layers"]
    moe_layer_indices(moe.layers, num_layers)
    up = config.upcycle
    upcycling.check_upcycling(up.mode, up.noise_scale, up.drop_fraction)
    if config.router_z_loss_coef < 0:
        raise ValueError(f"config key router_z_loss_coef={config.router_z_loss_coef} must be >= 0")
    routing_after = [n for n in config.routing.after.split(",") if n]
    for name in (
        build.stage_names(config) + [n for n in config.pope.after.split(",") if n] + routing_after
    ):
        if name not in config:
            raise ValueError(
                f"config key run_stages/pope.after/routing.after names {name!r}, which has no "
                f"config.{name} section"
            )
    for name in routing_after:
        if not config[name].moe:
            raise ValueError(f"config key routing.after names {name!r}, which has no MoE layers")
    freeze.storage_dtype(config.model.frozen_param_dtype, "model.frozen_param_dtype")
    checkpoint.check_location(config.checkpoints.root, "checkpoints.root")
    if config.checkpoints.frozen not in CHECKPOINT_FROZEN:
        raise ValueError(
            f"config key checkpoints.frozen={config.checkpoints.frozen!r}: expected one of "
            f"{CHECKPOINT_FROZEN}"
        )
    for name in build.stage_names(config):
        freeze.resolve_rules(config[name].trainable)
        freeze.storage_dtype(config[name].mu_dtype, f"{name}.mu_dtype")
        if config[name].loss_budget < 0 or config[name].loss_chunk < 1:
            raise ValueError(
                f"config keys {name}.loss_budget={config[name].loss_budget} (>= 0) / "
                f"{name}.loss_chunk={config[name].loss_chunk} (>= 1) out of range"
            )
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
    build.packing(config)
    for key in ("workers", "reader_threads"):
        if config.data[key] < 0:
            raise ValueError(f"config key data.{key}={config.data[key]} must be >= 0")


def checkpoint_dir(config: ml_collections.ConfigDict, stage: str) -> epath.Path:
    """WORKDIR/STAGE/checkpoints, or ROOT/STAGE/checkpoints with `checkpoints.root` (a
    local path or an object store's URL: gs://, s3://); logs stay in the workdir."""
    root = config.checkpoints.root or config.workdir
    return checkpoint.location(root) / stage / "checkpoints"


class Stage(StageModel):
    """One stage's model plus what training it needs: trainable mask, optimizer, state
    shardings and the jitted step (built once, used by train + eval)."""

    def __init__(
        self, config: ml_collections.ConfigDict, name: str, mesh: jax.sharding.Mesh, vocab_size: int
    ):
        super().__init__(config, name, mesh, vocab_size)
        # Rules name canonical paths (`layers_{i}`); a scanned param trains as a whole.
        self.mask = scan.stack_layers(
            freeze.trainable_mask(self.canonical(self.abstract_params), self.stage_cfg.trainable),
            self.plans,
        )
        self.schedule = optim.make_schedule(
            self.stage_cfg.lr, self.stage_cfg.num_steps, self.stage_cfg.warmup_ratio
        )
        self.tx = optim.make_optimizer(
            self.schedule,
            self.mask,
            weight_decay=self.stage_cfg.weight_decay,
            grad_clip=self.stage_cfg.grad_clip,
            mu_dtype=freeze.storage_dtype(self.stage_cfg.mu_dtype, f"{name}.mu_dtype"),
        )
        # The state holds frozen params in model.frozen_param_dtype (from here on: the
        # optimizer's state, the step's shardings and checkpoints see those dtypes).
        self.frozen_dtype = freeze.storage_dtype(
            config.model.frozen_param_dtype, "model.frozen_param_dtype"
        )
        self.abstract_params = freeze.cast_frozen(self.abstract_params, self.mask, self.frozen_dtype)
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
        self.batch_sharding = sharding.batch_sharding(mesh, self.rules)
        # Model FLOPs of one step on the padded global batch (`flops.py`; the AOT report),
        # and per unit of real work (the logged MFU).
        self.step_flops = flops.train_step_flops(
            self.model_cfg,
            self.canonical(self.mask),
            self.stage_cfg.batch_size,
            self.stage_cfg.max_length,
        )
        self.work_rates = flops.train_step_rates(
            self.model_cfg, self.canonical(self.mask), self.stage_cfg.max_length
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
                loss_budget=self.stage_cfg.loss_budget,
                loss_chunk=self.stage_cfg.loss_chunk,
            ),
            self.state_shardings,
            self.batch_sharding,
            replicated,
        )

    def initial_params(self) -> dict:
        """Fresh init, or the `init_from` stage's params (upcycled to MoE for stage 3)."""
        source = self.stage_cfg.init_from
        if not source:
            return self.fresh_params()
        directory = checkpoint_dir(self.config, source)
        if not directory.exists():
            raise FileNotFoundError(
                f"config key {self.name}.init_from={source!r}: no checkpoint at {directory}; "
                f"make it with: {STAGE_COMMANDS.get(source, source)}"
            )
        source_model = StageModel(self.config, source, self.mesh, self.model_cfg.decoder.vocab_size)
        params, step = source_model.restore_params(directory)
        tqdm.write(f"{self.name}: initialised from {directory} (step {step})")
        if self.model_cfg.decoder.moe is not None and source_model.model_cfg.decoder.moe is None:
            return self.assembly(True, source_model.plans)(params)
        return params

    def stored(self, params: dict) -> dict:
        """Params (model layout, any dtypes) as the state keeps them: frozen leaves in
        `model.frozen_param_dtype`, trainable ones as they are; `params` is consumed."""
        cast = lambda p: freeze.cast_frozen(p, self.mask, self.frozen_dtype)
        return jax.jit(cast, out_shardings=self.param_shardings, donate_argnums=0)(params)

    def initial_state(self, manager, data_iterator, *, lean: bool = False) -> dict:
        """The latest checkpoint's state (and data position), else step 0 from `init_from`
        (its frozen params written to the checkpoints' `frozen/` when saving `lean`)."""
        if manager.latest_step() is not None:
            tqdm.write(f"{self.name}: resuming from step {manager.latest_step()}")
            return checkpoint.restore_state(
                manager,
                checkpoint.abstract_like(self.abstract_state, self.state_shardings),
                data_iterator,
            )
        params = self.stored(self.initial_params())
        if lean:
            checkpoint.save_frozen(manager.directory, params, self.mask)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"])
        return {"step": step, "params": params, "opt_state": opt_state}


@dataclasses.dataclass(frozen=True)
class DispatchedStep:
    """A step the device has been given, whose metrics the loop reads one step later (so the
    host never waits for the step it has just dispatched)."""

    step: int
    metrics: dict  # device arrays
    positions: int  # the global batch's work (`Throughput.tick`)
    tokens: int
    flops: float


def dispatched(stage: Stage, step: int, metrics: dict, local_batch: dict) -> DispatchedStep:
    """The step's record; its work is this process's batch's x processes (exact on one host,
    an estimate across hosts: each counts its own batch)."""
    processes = jax.process_count()
    images, tokens, pairs = flops.batch_work(local_batch, stage.model_cfg.vision.num_image_tokens)
    return DispatchedStep(
        step,
        metrics,
        positions=local_batch["input_ids"].size * processes,
        tokens=tokens * processes,
        flops=stage.work_rates.flops(images, tokens, pairs) * processes,
    )


def finish(done: DispatchedStep, throughput: Throughput, log: StageLog, cfg) -> int:
    """Waits for `done`, times it, logs it on log steps; returns its non-finite streak."""
    streak = int(done.metrics["nonfinite_streak"])  # the loop's only wait for the device
    throughput.tick(done.positions, done.tokens, done.flops)
    if done.step % cfg.log_every == 0 or done.step == cfg.num_steps:
        log.log(done.step, done.metrics, throughput.rates())
    return streak


def train_stage(stage: Stage, source: RecordSource, tokenizer: Tokenizer) -> dict:
    """Trains `stage` to `num_steps` (resuming if checkpoints exist); returns final params.

    The host runs one step ahead: it dispatches step N (its batch built and put on the
    devices while step N - 1 runs), then waits for step N - 1's metrics, so the device is
    never idle between steps on the host's account; checkpoints take the host's step count.
    Exits the process (code 0) after checkpointing the current step when preempted; stops
    with `NonFiniteLossError` once `max_nonfinite_steps` updates in a row were skipped for
    non-finite gradients (the optimizer skips them, `optim.make_optimizer`), learnt one step
    late: the step after the streak has run too, and is the one saved."""
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
    if manager.latest_step() is None:  # lean: the stage freezes something and saves it once
        lean = config.checkpoints.frozen == "once" and not all(jax.tree.leaves(stage.mask))
    else:
        lean = checkpoint.saves_lean(manager)
    state = stage.initial_state(manager, data_iterator, lean=lean)
    start = int(jax.device_get(state["step"]))
    meta = {"stage": stage.name, "config": config.to_json()}
    trainable = stage.mask if lean else None  # lean: steps save the trainable params
    throughput = Throughput(peak_flops=config.peak_flops_per_device * jax.device_count())

    def nonfinite_error(streak: int, last_bad: int, saved: int) -> NonFiniteLossError:
        manager.wait_until_finished()
        return NonFiniteLossError(
            f"{stage.name}: {streak} steps in a row (up to step {last_bad}) had a non-finite "
            f"loss or gradients and were skipped (config key max_nonfinite_steps="
            f"{config.max_nonfinite_steps}); checkpoint saved at step {saved} holds finite "
            "weights (skipped updates leave them as they were). Lower the learning rate or "
            f"check the data; the losses are in {stage_dir / 'metrics.jsonl'}."
        )

    with (
        StageLog(stage_dir, stage.name, start, cfg.num_steps) as log,
        PreemptionWatch() as preemption,
    ):
        previous = None
        for step, local_batch in zip(range(start + 1, cfg.num_steps + 1), data_iterator):
            batch = {
                k: jax.make_array_from_process_local_data(stage.batch_sharding, local_batch[k])
                for k in MODEL_INPUTS
                if k in local_batch
            }
            state, metrics = stage.train_step(state, batch)  # queued: runs while the host goes on
            streak = 0 if previous is None else finish(previous, throughput, log, cfg)
            failing = streak >= config.max_nonfinite_steps  # of step - 1
            previous = dispatched(stage, step, metrics, local_batch)
            stop = preemption.should_stop(manager, step)
            force = step == cfg.num_steps or stop or failing
            checkpoint.save(
                manager, step, state, data_iterator, meta, force=force, trainable=trainable
            )
            log.bar.update(1)
            if failing or stop:
                finish(previous, throughput, log, cfg)  # this step's metrics in the log too
                if failing:
                    raise nonfinite_error(streak, step - 1, step)
                manager.wait_until_finished()
                log.message(f"{stage.name}: preempted; checkpoint saved at step {step}, exiting")
                raise SystemExit(0)
        if previous is not None:
            streak = finish(previous, throughput, log, cfg)
            if streak >= config.max_nonfinite_steps:
                raise nonfinite_error(streak, previous.step, previous.step)
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


def run(config: ml_collections.ConfigDict) -> dict:
    """The run `config` describes: its stages in turn, routing analysis and POPE where asked.
    Returns the POPE metrics by "stage/split" (also written to workdir/pope.{md,json})."""
    validate_config(config)
    distributed.initialize(config.distributed)
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data, tokenizer = from_config.prepare_data(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    chief = jax.process_index() == 0  # prints and writes run-level files
    if chief:
        print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} devices")
    results = {}
    pope_after = [n for n in config.pope.after.split(",") if n]
    routing_after = [n for n in config.routing.after.split(",") if n]
    start = time.time()
    # The context mesh: dropless MoE layers shard_map their experts over its `expert` axis.
    with sharding.mesh_context(mesh, sharding.rules_from_config(config.sharding_rules)):
        for name in build.stage_names(config):
            stage = Stage(config, name, mesh, tokenizer.vocab_size)
            source = from_config.stage_source(config, name, data)
            params = train_stage(stage, source, tokenizer)
            if name in routing_after:
                analyse_routing(stage, params, source, tokenizer)
            if name in pope_after:
                splits = run_pope(
                    config, stage, params, tokenizer, data.root, data.eval_annotations_json
                )
                splits["mean"] = pope.split_means(splits)  # as the papers summarise POPE
                results.update({f"{name}/{split}": m for split, m in splits.items()})
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
