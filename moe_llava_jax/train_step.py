"""Loss (answer-token CE + alpha * sum of MoE balance losses + beta * sum of router z-losses)
and the jit-compiled step.

The step differentiates only w.r.t. the trainable params (a flat dict); frozen params enter
as constants, so XLA computes no weight gradients for them and returns them untouched. The
optimizer (`optim.make_optimizer`) still sees the full tree: frozen slots get zero
gradients that `set_to_zero` ignores (dead code for XLA), and hold no optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moe_llava_jax import optim, stages
from moe_llava_jax.data.conversation import IGNORE_INDEX

TrainState = dict[str, Any]  # {"step": int32[], "params": pytree, "opt_state": optax state}
Batch = Mapping[str, jax.Array]  # input_ids [b, t] int32, labels [b, t] int32, images [b, H, W, 3]


def answer_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-token CE over supervised positions: logits[:, i] predicts labels[:, i + 1].

    Returns (mean CE over the whole global batch's answer tokens, their count).
    """
    logits, targets = logits[:, :-1], labels[:, 1:]
    valid = targets != IGNORE_INDEX
    per_token = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.where(valid, targets, 0)
    )
    count = valid.sum()
    return jnp.sum(per_token * valid) / jnp.maximum(count, 1), count


def compute_loss(
    model: nn.Module,
    params: Mapping,
    batch: Batch,
    rng: jax.Array,
    aux_loss_coef: float,
    deterministic: bool = False,
    *,
    z_loss_coef: float = 0.0,
) -> tuple[jax.Array, dict]:
    """CE + aux_loss_coef * sum_layers(aux) + z_loss_coef * sum_layers(z); metrics carry the
    sums and the per-MoE-layer router statistics ([L_moe], expert_load [L_moe, E])."""
    logits, moe_stats = model.apply(
        {"params": params},
        batch["input_ids"],
        batch["images"],
        deterministic=deterministic,
        rngs={"gating": rng},
    )
    ce, num_tokens = answer_cross_entropy(logits, batch["labels"])
    metrics = {"ce": ce, "answer_tokens": num_tokens}
    loss = ce
    if moe_stats:
        aux = jnp.sum(moe_stats["aux_loss"])  # a sum over MoE layers, as the original
        z = jnp.sum(moe_stats["z_loss"])  # summed over layers like aux
        loss = loss + aux_loss_coef * aux + z_loss_coef * z
        metrics.update(
            aux_loss=aux,
            z_loss=z,
            expert_load=moe_stats["expert_load"],
            dropped_fraction=moe_stats["dropped_fraction"],
            router_entropy=moe_stats["router_entropy"],
            router_z_loss=moe_stats["z_loss"],
        )
    metrics["loss"] = loss
    return loss, metrics


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mask: Mapping,
    schedule: optax.Schedule,
    *,
    aux_loss_coef: float,
    z_loss_coef: float,
    seed: int,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The un-jitted step; `jit_train_step` adds shardings and donation."""

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        # Gating noise depends only on (seed, step): a resumed run draws the same noise.
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        trainable, frozen = stages.partition(state["params"], mask)

        def loss_of_trainable(t):
            return compute_loss(
                model, stages.merge(t, frozen), batch, rng, aux_loss_coef, z_loss_coef=z_loss_coef
            )

        (_, metrics), grads = jax.value_and_grad(loss_of_trainable, has_aux=True)(trainable)
        full_grads = stages.merge(grads, {k: jnp.zeros_like(v) for k, v in frozen.items()})
        updates, opt_state = tx.update(full_grads, state["opt_state"], state["params"])
        trainable_updates, _ = stages.partition(updates, mask)
        new_trainable = optax.apply_updates(trainable, trainable_updates)
        metrics.update(
            grad_norm=optax.tree.norm(grads),
            lr=schedule(state["step"]),
            **optim.nonfinite_counts(opt_state),
        )
        new_state = {
            "step": state["step"] + 1,
            "params": stages.merge(new_trainable, frozen),
            "opt_state": opt_state,
        }
        return new_state, metrics

    return train_step


def jit_train_step(step_fn, state_shardings, batch_sharding, replicated):
    """`jax.jit` with explicit shardings; the old state's buffers are donated to the new one."""
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
