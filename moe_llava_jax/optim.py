"""Optimizer: warmup + cosine AdamW with clipping on trainable leaves, frozen leaves zeroed.

`optax.multi_transform` with a 'freeze' -> `set_to_zero()` label keeps no optimizer state for
frozen leaves (their slots in Adam's mu/nu are `MaskedNode`s) and makes their updates zero.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import optax


def make_schedule(lr: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    warmup = max(1, round(warmup_ratio * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )


def make_optimizer(
    schedule: optax.Schedule,
    mask: Mapping,
    *,
    weight_decay: float,
    grad_clip: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    train = optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )
    labels = jax.tree.map(lambda trainable: "train" if trainable else "freeze", mask)
    return optax.multi_transform({"train": train, "freeze": optax.set_to_zero()}, labels)
