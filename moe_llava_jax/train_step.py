"""Loss (answer-token CE + alpha * sum of MoE balance losses + beta * sum of router z-losses)
and the jit-compiled step.

The step differentiates only w.r.t. the trainable params (a flat dict); frozen params enter
as constants, so XLA computes no weight gradients for them and returns them untouched. The
optimizer (`optim.make_optimizer`) still sees the full tree: frozen slots get zero
gradients that `set_to_zero` ignores (dead code for XLA), and hold no optimizer state.

Gradient accumulation (`grad_accum_steps` = n): the global batch is cut into n micro-batches
that a `lax.scan` runs one at a time (activation memory of one micro-batch), summing their
gradients. Each micro-batch's loss is its share of the global batch's loss, so the sum is
the full-batch gradient:
- CE: the sum of its answer tokens' CE divided by the *global* batch's answer-token count
  (micro-batches hold different numbers of answer tokens; a mean of their means would
  weight tokens unequally);
- aux and z losses: each micro-batch's (a mean over its routing groups / tokens) divided
  by n, i.e. their mean over the micro-batches.
Routing sees one micro-batch at a time: its `moe.num_groups` groups, each with its own
capacity, and its own gating noise. So the step equals the full-batch step of the model
with n x num_groups routing groups (micro-batch i = rows i, i + n, ...; tested), and the
logged router statistics (means over equally sized groups, averaged over micro-batches) are
that model's. The aux loss E * sum_e f_e * P_e is a product of per-group means, which is
why it is not the n = 1 model's. With n = 1 the step is the one without accumulation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moe_llava_jax import answer_loss, optim, param_tree
from moe_llava_jax.models.lvlm import MoELLaVA

TrainState = dict[str, Any]  # {"step": int32[], "params": pytree, "opt_state": optax state}
# input_ids, labels [b, t] int32, images [b, H, W, 3]; packed rows: images [b, m, H, W, 3],
# segments, positions [b, t] int32 (`data/pipeline.py`).
Batch = Mapping[str, jax.Array]


# Metrics that are a micro-batch's share of the global batch's (summed over micro-batches);
# the others are means over equally sized micro-batches (averaged).
SUMMED_METRICS = ("loss", "ce", "answer_tokens")


def compute_loss(
    model: nn.Module,
    params: Mapping,
    batch: Batch,
    rng: jax.Array,
    aux_loss_coef: float,
    deterministic: bool = False,
    *,
    z_loss_coef: float = 0.0,
    global_answer_tokens: jax.Array | None = None,
    num_micro_batches: int = 1,
    loss_budget: int = 0,
    loss_chunk: int = 128,
) -> tuple[jax.Array, dict]:
    """CE + aux_loss_coef * sum_layers(aux) + z_loss_coef * sum_layers(z); metrics carry the
    sums and the per-MoE-layer router statistics ([L_moe], expert_load [L_moe, E]).

    `batch` alone (the defaults): CE is the mean over its answer tokens. `batch` as one of
    `num_micro_batches` micro-batches of a global batch with `global_answer_tokens` answer
    tokens: the loss (and "ce", "loss" in the metrics) is this micro-batch's share of the
    global batch's (module docstring); summed over the micro-batches it is the global loss.

    The LM head runs on at most `loss_budget` supervised positions per example, `loss_chunk`
    at a time, never on all [b, t] positions at once (`answer_loss.py`; 0: every position).
    """
    hidden, moe_stats = model.apply(
        {"params": params},
        batch["input_ids"],
        batch["images"],
        deterministic=deterministic,
        positions=batch.get("positions"),
        segments=batch.get("segments"),
        head=False,
        # The dropout stream is derived, so the gating noise is the same with or without it.
        rngs={"gating": rng, "dropout": jax.random.fold_in(rng, 1)},
    )
    head = lambda h: model.apply({"params": params}, h, method=MoELLaVA.logits)
    ce_sum, num_tokens, over_budget = answer_loss.answer_cross_entropy(
        head, hidden, batch["labels"], budget=loss_budget, chunk=loss_chunk
    )
    if global_answer_tokens is None:
        global_answer_tokens = num_tokens
    ce = ce_sum / jnp.maximum(global_answer_tokens, 1)
    metrics = {"ce": ce, "answer_tokens": num_tokens, "loss_over_budget": over_budget}
    loss = ce
    if moe_stats:
        aux = jnp.sum(moe_stats["aux_loss"])  # a sum over MoE layers, as the original
        z = jnp.sum(moe_stats["z_loss"])  # summed over layers like aux
        loss = loss + aux_loss_coef * aux / num_micro_batches + z_loss_coef * z / num_micro_batches
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


def split_micro_batches(batch: Batch, num: int) -> Batch:
    """[B, ...] -> [num, B // num, ...]; micro-batch i holds rows i, i + num, i + 2 num, ...

    Strided, not contiguous: each device's contiguous slice of the data-sharded batch then
    holds rows of every micro-batch (when its row count is a multiple of `num`), so the scan
    over micro-batches keeps every device busy without moving the batch between devices.
    """
    size = jax.tree.leaves(batch)[0].shape[0]
    if size % num:
        raise ValueError(f"batch of {size} rows does not split into {num} micro-batches")
    return jax.tree.map(
        lambda x: x.reshape(size // num, num, *x.shape[1:]).swapaxes(0, 1), dict(batch)
    )


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mask: Mapping,
    schedule: optax.Schedule,
    *,
    aux_loss_coef: float,
    z_loss_coef: float,
    seed: int,
    grad_accum_steps: int = 1,
    loss_budget: int = 0,
    loss_chunk: int = 128,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The un-jitted step; `jit_train_step` adds shardings and donation. With
    `grad_accum_steps` > 1 the batch's gradient is accumulated over that many micro-batches
    (module docstring); the update is the same single optimizer step."""

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        trainable, frozen = param_tree.partition(state["params"], mask)
        global_answer_tokens = answer_loss.answer_targets(batch["labels"])[1].sum()

        def accumulate(grad_sum: dict, micro: tuple[jax.Array, Batch]) -> tuple[dict, dict]:
            index, micro_batch = micro
            # Gating noise depends only on (seed, step, micro-batch): a resumed run draws the
            # same noise (and without accumulation, the key is the same as before it existed).
            rng = jax.random.fold_in(jax.random.key(seed), state["step"] * grad_accum_steps + index)

            def loss_of_trainable(t):
                return compute_loss(
                    model,
                    param_tree.merge(t, frozen),
                    micro_batch,
                    rng,
                    aux_loss_coef,
                    z_loss_coef=z_loss_coef,
                    global_answer_tokens=global_answer_tokens,
                    num_micro_batches=grad_accum_steps,
                    loss_budget=loss_budget,
                    loss_chunk=loss_chunk,
                )

            (_, metrics), grads = jax.value_and_grad(loss_of_trainable, has_aux=True)(trainable)
            return jax.tree.map(jnp.add, grad_sum, grads), metrics

        grads, per_micro_batch = jax.lax.scan(
            accumulate,
            jax.tree.map(jnp.zeros_like, trainable),
            (jnp.arange(grad_accum_steps), split_micro_batches(batch, grad_accum_steps)),
        )
        metrics = {
            k: v.sum(0) if k in SUMMED_METRICS else v.mean(0) for k, v in per_micro_batch.items()
        }
        full_grads = param_tree.merge(grads, {k: jnp.zeros_like(v) for k, v in frozen.items()})
        updates, opt_state = tx.update(full_grads, state["opt_state"], state["params"])
        trainable_updates, _ = param_tree.partition(updates, mask)
        new_trainable = optax.apply_updates(trainable, trainable_updates)
        metrics.update(
            grad_norm=optax.tree.norm(grads),
            lr=schedule(state["step"]),
            **optim.nonfinite_counts(opt_state),
        )
        new_state = {
            "step": state["step"] + 1,
            "params": param_tree.merge(new_trainable, frozen),
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
