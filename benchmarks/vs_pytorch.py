"""Stage-3 train step, ours vs the PyTorch stack MoE-LLaVA users run, same model, same batch.

    python -m benchmarks.vs_pytorch [--repeats 10] [--threads N]

The model: `configs/moe_tuning.py`'s tiny MoE-LLaVA with every decoder layer an MoE layer
(so that it is exactly a Mixtral-style decoder): CLIP-style vision tower -> mlp2x_gelu
projector -> LLaMA-style decoder (RMSNorm, RoPE, GQA) whose FFNs are E SwiGLU experts, top-2.
Stage 3 trains the MoE layers (experts + routers) with AdamW (grad-norm clip 1) on
CE + 0.01 * load-balancing loss; the tower and projector are frozen.

- ours: the trainer's own jitted step (`trainer.Stage.train_step`), both dispatch modes.
- PyTorch: transformers' `MixtralForCausalLM` (inputs_embeds, labels, output_router_logits:
  its CE + router_aux_loss_coef * aux loss), `CLIPVisionModel` under no_grad (as LLaVA's
  tower) with the blocks LLaVA's feature layer needs (select_layer -2: all but the last),
  an `nn.Sequential` projector, `torch.optim.AdamW` + `clip_grad_norm_`, for each of
  transformers' expert implementations that runs here ("eager": a loop over the experts
  hit; "grouped_mm": torch's grouped matmul; "batched_mm" gathers every token's expert
  weights and takes minutes per step on CPU, so it is left out).

Both get the same batch (random tokens, image placeholders after the first token, answers
the second half) and the same threads (`--threads`, default: every core). The benchmark
checks that the two models have the same trainable and frozen parameter counts before
timing. Medians of interleaved repeats after a warm-up step each; prints ms/step and the
ratio ours / PyTorch for every pair.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, MixtralConfig, MixtralForCausalLM

from benchmarks.moe_layer import median_seconds
from benchmarks.train_step import StepRunner, random_batch
from configs import moe_tuning
from moe_llava_jax import param_tree, sharding, trainer
from moe_llava_jax.data.conversation import IMAGE_TOKEN_INDEX
from moe_llava_jax.models import moe, pixels
from moe_llava_jax.models.lvlm import LVLMConfig

TORCH_EXPERTS = ("eager", "grouped_mm")


class TorchMoELLaVA(torch.nn.Module):
    """Vision tower -> projector -> Mixtral, image features spliced in at the placeholders."""

    def __init__(self, config: LVLMConfig, aux_loss_coef: float, experts: str):
        super().__init__()
        vision, decoder = config.vision, config.decoder
        self.pixel_norm = (config.pixel_mean, config.pixel_std)  # ours normalises on device
        self.vision = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=vision.hidden_size,
                intermediate_size=vision.intermediate_size,
                num_hidden_layers=vision.num_blocks_to_run,
                num_attention_heads=vision.num_heads,
                image_size=vision.image_size,
                patch_size=vision.patch_size,
                hidden_act=vision.activation,
                layer_norm_eps=vision.norm_eps,
            )
        )
        self.projector = torch.nn.Sequential(
            torch.nn.Linear(vision.hidden_size, decoder.hidden_size),
            torch.nn.GELU(),
            torch.nn.Linear(decoder.hidden_size, decoder.hidden_size),
        )
        self.llm = MixtralForCausalLM(
            MixtralConfig(
                vocab_size=decoder.vocab_size,
                hidden_size=decoder.hidden_size,
                intermediate_size=decoder.intermediate_size,
                num_hidden_layers=decoder.num_layers,
                num_attention_heads=decoder.num_heads,
                num_key_value_heads=decoder.num_kv_heads,
                num_local_experts=decoder.moe.num_experts,
                num_experts_per_tok=decoder.moe.top_k,
                rms_norm_eps=decoder.norm_eps,
                rope_theta=decoder.rope_theta,
                router_aux_loss_coef=aux_loss_coef,
                tie_word_embeddings=decoder.tie_embeddings,
                experts_implementation=experts,
            )
        )
        for name, param in self.named_parameters():  # stage 3: the MoE layers only
            param.requires_grad = name.startswith("llm.") and ".mlp." in name

    def forward(self, input_ids, labels, images):  # images [b, 3, H, W]
        with torch.no_grad():
            features = self.vision(pixel_values=images).last_hidden_state[:, 1:]  # no CLS
        features = self.projector(features)  # [b, n, d]
        placeholder = input_ids == IMAGE_TOKEN_INDEX
        embeds = self.llm.get_input_embeddings()(input_ids.clamp(min=0))
        embeds = embeds.masked_scatter(placeholder[..., None], features.to(embeds.dtype))
        out = self.llm(inputs_embeds=embeds, labels=labels, output_router_logits=True)
        return out.loss


def normalized_images(model: TorchMoELLaVA, batch: dict) -> np.ndarray:
    """The batch's uint8 pixels as the tower's float32 input (our model does this inside)."""
    return pixels.normalize(np.asarray(batch["images"]), *model.pixel_norm)


def torch_step(model: TorchMoELLaVA, batch: dict, lr: float, grad_clip: float):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    inputs = (
        torch.from_numpy(np.asarray(batch["input_ids"])).long(),
        torch.from_numpy(np.asarray(batch["labels"])).long(),
        torch.from_numpy(normalized_images(model, batch)).permute(0, 3, 1, 2).contiguous(),
    )

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(*inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        return loss.item()

    return step


def our_counts(stage: trainer.Stage) -> tuple[int, int]:
    """(trainable, frozen) parameter counts; only the vision blocks the model runs count."""
    flat = param_tree.flatten(stage.abstract_params)
    mask = param_tree.flatten(stage.mask)
    trainable = sum(v.size for k, v in flat.items() if mask[k])
    return trainable, sum(v.size for v in flat.values()) - trainable


def torch_counts(model: TorchMoELLaVA) -> tuple[int, int]:
    """(trainable, frozen), without CLIP's pooled-output LayerNorm (ours has none: LLaVA
    never reads the pooled output)."""
    params = dict(model.named_parameters())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    frozen = sum(
        p.numel()
        for name, p in params.items()
        if not p.requires_grad and "post_layernorm" not in name
    )
    return trainable, frozen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = moe_tuning.get_config()
    config.model.moe.layers = "dense"  # every decoder layer MoE, as Mixtral
    config.model.moe.second_expert_noise = False  # Mixtral's router has no noise
    mesh = sharding.make_mesh(config.mesh.to_dict())
    rules = sharding.rules_from_config(config.sharding_rules)
    vocab_size = config.data.synthetic.vocab_size
    cfg = config.stage3
    ours, batch = {}, None
    with sharding.mesh_context(mesh, rules):  # as trainer.run
        for dispatch in moe.DISPATCH_MODES:
            config.model.moe.dispatch = dispatch
            stage = trainer.Stage(config, "stage3", mesh, vocab_size)
            batch = random_batch(stage, seed=0) if batch is None else batch
            ours[f"ours ({dispatch})"] = StepRunner(stage, batch)
    torch_models = {
        f"PyTorch ({experts})": TorchMoELLaVA(stage.model_cfg, config.router_aux_loss_coef, experts)
        for experts in TORCH_EXPERTS
    }
    for name, model in torch_models.items():
        if torch_counts(model) != our_counts(stage):
            raise RuntimeError(
                f"{name} has (trainable, frozen) params {torch_counts(model)}, ours "
                f"{our_counts(stage)}: not the same model"
            )
    theirs = {
        name: torch_step(model, batch, cfg.lr, cfg.grad_clip)
        for name, model in torch_models.items()
    }
    trainable, frozen = our_counts(stage)
    print(
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}), {args.threads} threads; "
        f"torch {torch.__version__}, jax {jax.__version__}; stage 3 of the tiny model with "
        f"{config.model.decoder.num_layers} MoE layers (E={config.model.moe.num_experts}, "
        f"k={config.model.moe.top_k}); batch {cfg.batch_size} x {cfg.max_length}; "
        f"{trainable:,} trainable + {frozen:,} frozen params in both; "
        f"medians of {args.repeats}\n"
    )
    seconds = median_seconds({**ours, **theirs}, args.repeats)
    print("| step | ms/step |")
    print("|---|---|")
    for name, t in seconds.items():
        print(f"| {name} | {1e3 * t:.1f} |")
    print("\n| ours / PyTorch | " + " | ".join(theirs) + " |")
    print("|---|" + "---|" * len(theirs))
    for name in ours:
        ratios = " | ".join(f"{seconds[name] / seconds[other]:.2f}" for other in theirs)
        print(f"| {name} | {ratios} |")


if __name__ == "__main__":
    main()
