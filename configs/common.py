"""Shared pieces of the configs: the tiny model, the embedded data, the MoE-Tuning stages.

Each stage config (stage1.py, stage2.py, stage3.py, moe_tuning.py) assembles these and
lists the stages to run; every field is overridable on the command line
(`--config.stage3.num_steps=100`, `--config.model.moe.num_experts=8`).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from moe_llava_jax import sharding
from moe_llava_jax.models.decoder import DecoderConfig
from moe_llava_jax.models.moe import MoEConfig
from moe_llava_jax.models.vision import VisionConfig


def parse_arg(arg: str | None, **defaults):
    """big_vision-style `get_config(arg)`: "key=value,flag" -> ConfigDict over `defaults`."""
    parsed = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"config argument {key!r} unknown; known: {sorted(defaults)}")
        kind = type(defaults[key])
        parsed[key] = (value.lower() in ("", "1", "true")) if kind is bool else kind(value)
    return parsed


def tiny_model() -> ml_collections.ConfigDict:
    """A CLIP-style tower + a 4-layer decoder: trains the embedded data on a laptop CPU."""
    return ml_collections.ConfigDict(
        {
            "image_processor": "clip",  # clip | siglip: resize/crop and normalisation
            # Hugging Face directories to start from (config.json + safetensors); when set,
            # their config.json replaces `decoder` / `vision` dimensions. See the README.
            "llm_from": "",
            "vision_from": "",
            # A released MoE-LLaVA directory (moe_llava_*, or a dense stage-2 llava_*): the run's
            # first stage starts from its decoder and projector (tower: vision_from); its
            # config.json replaces `decoder`, the MoE architecture and `projector`. README,
            # "Fine-tuning a released model".
            "init_from_hf": "",
            # A stage-1 release's projector-only file (mm_projector.bin or .safetensors) the
            # run's first stage starts its projector from, e.g. stage 2 over llm_from and
            # vision_from (LLaVA's --pretrain_mm_mlp_adapter); its kind is `projector`.
            "projector_from": "",
            # Recipe switches over a pretrained LLM: drop its lm_head bias (LLaVA-Phi does, from
            # stage 1 on; Phi-2 has one), and the residual dropout rate (-1: the LLM's own,
            # Phi-2's resid_pdrop 0.1; >= 0: this rate; training only, the "dropout" rng).
            "drop_lm_head_bias": False,
            "residual_dropout": -1.0,
            "projector": "mlp2x_gelu",
            # Compute knobs (same params whatever they say): the decoder's activation/matmul
            # dtype, float32 | bfloat16 (trainable params stay float32); and what its blocks
            # keep for the backward pass, none | block (recompute each block) | unit (each
            # scanned unit of blocks as a whole: one saved input per unit) | dots (keep
            # matmul outputs, recompute the rest).
            "dtype": "float32",
            "remat": "none",
            # How a stage stores the params it does not train (float32 | bfloat16): bfloat16
            # halves their memory and gathers; they are then saved so too (and restored into
            # any dtype). Computing in bfloat16 rounds them to it anyway.
            "frozen_param_dtype": "float32",
            # Repeating blocks (decoder layers, ViT blocks) as one `nn.scan` each: compile
            # time and program size flat in depth, params stacked on a `layers` axis in the
            # train state and checkpoints (same math; models/scan.py). False: a Python loop.
            "scan_layers": True,
            # How attention is computed (same math; models/attention.py): auto (cuDNN's
            # fused kernel on GPU in 16-bit training, else xla) | xla | cudnn | splash
            # (Pallas's TPU kernel; README, "At real size"); the xla path takes
            # attention_chunk queries at a time (0: all), so no [b, h, T, T] scores.
            "attention": "auto",
            "attention_chunk": 256,
            # The model sections are the dataclasses' fields (one source of defaults: see
            # VisionConfig, DecoderConfig, MoEConfig for what each means), tiny sizes here.
            "vision": dataclass_fields(
                VisionConfig(
                    image_size=64,
                    patch_size=16,
                    hidden_size=128,
                    num_layers=2,
                    num_heads=4,
                    intermediate_size=256,
                )
            ),
            "decoder": dataclass_fields(
                DecoderConfig(
                    vocab_size=0,  # 0: the tokenizer's
                    hidden_size=128,
                    num_layers=4,
                    num_heads=4,
                    num_kv_heads=2,
                    intermediate_size=256,
                    norm="rmsnorm",
                )
            ),
            # moe.dispatch: capacity (the paper's: choices over an expert's capacity are
            # dropped) or dropless (every choice computed, experts as a grouped matmul).
            "moe": dataclass_fields(MoEConfig()),
        }
    )


def dataclass_fields(instance) -> dict:
    """A model dataclass as a config section; `moe` lives in its own section (`model.moe`)."""
    fields = dataclasses.asdict(instance)
    fields.pop("moe", None)
    return fields


def stage(
    name: str,
    *,
    data: str,
    template: str,
    trainable: str,
    lr: float,
    num_steps: int,
    batch_size: int,
    moe: bool,
    init_from: str,
    pad_to_square: bool,
    max_length: int,
):
    return ml_collections.ConfigDict(
        {
            "name": name,
            "data": data,
            "template": template,
            "trainable": trainable,
            "lr": lr,
            "num_steps": num_steps,
            "batch_size": batch_size,
            "moe": moe,
            "init_from": init_from,
            "pad_to_square": pad_to_square,
            "max_length": max_length,  # tokens, image placeholders included
            # batch_size is split into this many micro-batches whose gradients are summed
            # in the step (same update, 1/grad_accum_steps of the activation memory)
            "grad_accum_steps": 1,
            # The LM head + CE run on at most loss_budget supervised (answer) positions per
            # row, loss_chunk positions at a time: no [batch, seq, vocab] logits. A batch
            # with a longer answer computes every position instead (exact; logged as
            # loss_over_budget). 0: every position. See moe_llava_jax/answer_loss.py. A
            # packed row (data.packing=first_fit) holds several examples' answers: raise it.
            "loss_budget": 0,
            "loss_chunk": 128,
            "warmup_ratio": 0.03,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "mu_dtype": "float32",  # Adam's first moment (bfloat16 halves it); nu stays float32
            "log_every": 10,
            "checkpoint_every": 100,
            "keep_last": 2,  # checkpoints kept: the last N ...
            "keep_every": 0,  # ... plus every step divisible by this (0: none)
        }
    )


def moe_tuning_config(
    run_stages: str,
    pope_after: str,
    *,
    steps_scale: float = 1.0,
    stage3_trainable: str = "stage3_paper",
) -> ml_collections.ConfigDict:
    """All three stages on the embedded data; `run_stages` picks which of them this run trains."""
    scaled = lambda n: max(1, round(n * steps_scale))
    config = ml_collections.ConfigDict()
    config.workdir = "workdir/tiny"
    config.seed = 0
    config.run_stages = run_stages
    config.router_aux_loss_coef = 0.01
    # Updates with non-finite gradients are skipped; this many in a row saves and stops.
    config.max_nonfinite_steps = 10
    # Multi-host (TPU pods, GPU clusters): jax.distributed.initialize() before anything else;
    # empty address / 0 / -1 = auto-detected (TPU metadata, SLURM, Open MPI).
    config.distributed = {
        "enabled": False,
        "coordinator_address": "",
        "num_processes": 0,
        "process_id": -1,
    }
    # XLA's persistent compilation cache ("" = WORKDIR/jax_cache; "off": none): reruns,
    # resumes and repeated shapes load compiled programs instead of compiling again.
    config.compilation_cache_dir = ""
    config.router_z_loss_coef = 0.0  # ST-MoE router z-loss; the paper has none
    # Peak FLOP/s of one accelerator (e.g. 989e12: H100 SXM dense bf16) for the logged
    # `mfu`; 0 = unknown, no mfu (step_time_s and tokens_per_s are logged anyway).
    config.peak_flops_per_device = 0.0
    # How stage 3's experts start from stage 2's dense FFN (upcycling.upcycle): copy (the paper),
    # copy_noise (+ noise_scale * std of each tensor), drop_upcycle (re-init drop_fraction of
    # each expert's intermediate channels; Drop-Upcycling) or random (no upcycling).
    config.upcycle = {"mode": "copy", "noise_scale": 0.01, "drop_fraction": 0.5, "seed": 0}
    # Checkpoints go to ROOT/STAGE/checkpoints ("": the workdir; gs://BUCKET/..., s3://...
    # too: orbax writes object stores natively, while the logs stay in the workdir). A
    # stage's frozen params: "once" (lean: written at its start to checkpoints/frozen, each
    # step saves the trainable params and their optimizer state) or "every_save".
    config.checkpoints = {"root": "", "frozen": "once"}
    config.mesh = {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1}
    # Where params and activations land on that mesh: [logical axis name, mesh axis | [mesh
    # axes] | None] pairs, first match wins (sharding.py; the models name logical axes only).
    # Entered with nn.logical_axis_rules around init, step and decode; lists, so a
    # checkpoint's saved config (JSON) gives them back.
    config.sharding_rules = sharding.rules_to_config(sharding.DEFAULT_LOGICAL_AXIS_RULES)
    config.model = tiny_model()
    # stageN.data: "captions" | "instruct" (embedded) or a LLaVA JSON/JSONL file, with image paths
    # relative to data.image_root; data.tokenizer: a tokenizer.json ("": the embedded one).
    config.data = {
        "root": "",
        "image_root": "",
        "tokenizer": "",
        "eos_token": "<|endoftext|>",  # the chat template's end-of-answer token
        # Records left out (listed in stageN/skipped.jsonl): more than this fraction of a
        # source's records bad fails the run at once, showing the first ones.
        "max_bad_fraction": 0.01,
        "workers": 0,  # grain worker processes building examples (0: threads of this process)
        # Reader threads of this process (0: half the cores it may run on, within [2, 16]).
        "reader_threads": 0,
        # Rows: "none" (an example each, right-padded to the stage's max_length), "bucket"
        # (an example each, every batch padded to the shortest of `buckets` evenly spaced
        # lengths that holds it, grouped over bucket_window batches; one process) or
        # "first_fit" (examples packed into rows; data/pipeline.py): packing_bins rows filled
        # at a time, image_slots images per row.
        "packing": "none",
        "packing_bins": 64,
        "image_slots": 4,
        "buckets": 4,
        "bucket_window": 16,
        "synthetic": {
            "seed": 0,
            "num_train": 4000,
            "num_eval": 200,
            "image_size": 64,
            "vocab_size": 512,
        },
    }
    # Stage recipe of MoE-LLaVA (projector -> LLM -> MoE). The learning rates are the tiny
    # model's: it starts from random weights, not from a pretrained LLM.
    config.stage1 = stage(
        "stage1",
        data="captions",
        template="plain",
        trainable="stage1",
        lr=1e-3,
        num_steps=scaled(150),
        batch_size=32,
        moe=False,
        init_from="",
        pad_to_square=False,
        max_length=48,
    )
    config.stage1.loss_budget = 24  # answer tokens per example: at most 17 in the embedded data
    config.stage2 = stage(
        "stage2",
        data="instruct",
        template="phi",
        trainable="stage2",
        lr=1e-3,
        num_steps=scaled(1200),
        batch_size=32,
        moe=False,
        init_from="stage1",
        pad_to_square=True,
        max_length=136,
    )
    config.stage2.loss_budget = 32  # of 135 positions; answers hold at most 17 tokens here
    # Stage 3 keeps stage 2's data and template; it changes the model and what trains.
    config.stage3 = config.stage2.copy_and_resolve_references()
    config.stage3.update(
        name="stage3",
        trainable=stage3_trainable,
        lr=5e-4,
        num_steps=scaled(300),
        moe=True,
        init_from="stage2",
    )
    # Expert-load statistics and plots (image vs text tokens) after these MoE stages.
    config.routing = {"after": "stage3" if "stage3" in pope_after else "", "num_batches": 8}
    config.pope = {
        "after": pope_after,
        "template": "phi",
        "num_per_image": 3,
        "batch_size": 64,
        "max_new_tokens": 8,
    }
    return config
