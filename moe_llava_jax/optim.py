"""Optimizer: warmup + cosine AdamW with clipping on trainable leaves, frozen leaves zeroed,
and updates with non-finite gradients skipped.

`optax.multi_transform` with a 'freeze' -> `set_to_zero()` label keeps no optimizer state for
frozen leaves (their slots in Adam's mu/nu are `MaskedNode`s) and makes their updates zero.
`optax.apply_if_finite` turns a step whose gradients hold a NaN/inf into a zero update that
leaves Adam's state untouched, and counts such steps (`nonfinite_counts`); the trainer stops
after `max_nonfinite_steps` in a row, so apply_if_finite's own "apply anyway after N" limit
is set out of reach.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
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
    mu_dtype: jnp.dtype | None = None,
) -> optax.GradientTransformation:
    """`mu_dtype`: Adam's first moment's storage (None: the params'); nu stays the params'."""
    train = optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(
            schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mu_dtype=mu_dtype
        ),
    )
    labels = jax.tree.map(lambda trainable: "train" if trainable else "freeze", mask)
    return optax.apply_if_finite(
        optax.multi_transform({"train": train, "freeze": optax.set_to_zero()}, labels),
        max_consecutive_errors=NEVER,
    )


NEVER = 2**31 - 1  # int32 max: apply_if_finite's count never reaches it


def nonfinite_counts(opt_state: optax.ApplyIfFiniteState) -> dict[str, jax.Array]:
    """Skipped steps: in a row up to now, and in total (this run's optimizer state)."""
    return {
        "nonfinite_streak": opt_state.notfinite_count,
        "nonfinite_total": opt_state.total_notfinite,
    }
