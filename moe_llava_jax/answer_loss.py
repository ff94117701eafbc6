"""Answer-token cross-entropy without the [batch, seq, vocab] logits.

At real size the LM head on every position is the largest buffer of a step (StableLM-2's
100k vocabulary: f32 logits of 16 x 2,624 positions are 16.8 GB per chip), yet most positions
(image features, prompt, padding) carry no label. So:

- **gather**: each example's supervised positions (next-token target != IGNORE) are taken,
  in order, into a static per-example budget of `budget` rows (`[b, budget, d]`, still split
  over the batch axes); the head runs on those only;
- **chunk**: the head and the CE run over `chunk` rows at a time under `jax.checkpoint`, so
  one chunk's logits `[b, chunk, vocab]` exist at once, in the forward and in the backward
  (recomputed there: one more head matmul per chunk, no stored logits);
- **nothing dropped**: a batch in which some example has more supervised positions than the
  budget takes the other branch of a `lax.cond`, the chunked head over every position
  (exact, slower); the step reports it (`loss_over_budget`). budget 0 (or one of at least
  the sequence length) computes every position without a gather.

The sum and count equal the full-logits CE's (`tests/test_answer_loss.py`: loss and gradients).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from moe_llava_jax.data.conversation import IGNORE_INDEX

Head = Callable[[jax.Array], jax.Array]  # hidden [b, n, d] -> logits [b, n, vocab]


def answer_targets(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next-token targets [b, t - 1] (labels[:, i + 1], predicted at position i) and where
    they are supervised (answer tokens)."""
    targets = labels[:, 1:]
    return targets, targets != IGNORE_INDEX


def chunked_cross_entropy(
    head: Head, hidden: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int
) -> jax.Array:
    """sum(weights * CE(head(hidden), targets)) over hidden [b, n, d], targets / weights
    [b, n], computed `chunk` positions at a time (the last chunk zero-padded)."""
    b, n, d = hidden.shape
    chunk = max(1, min(chunk, n))
    pad = -n % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, weights = (jnp.pad(x, ((0, 0), (0, pad))) for x in (targets, weights))
    split = lambda x: jnp.moveaxis(x.reshape(b, -1, chunk, *x.shape[2:]), 1, 0)  # [chunks, b, c, ...]

    @jax.checkpoint  # the backward recomputes a chunk's logits instead of keeping them all
    def chunk_sum(h: jax.Array, t: jax.Array, w: jax.Array) -> jax.Array:
        logits = head(h).astype(jnp.float32)  # [b, c, vocab]
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, t)
        return jnp.sum(per_token * w)

    def body(total, xs):
        return total + chunk_sum(*xs), None

    total, _ = jax.lax.scan(
        body, jnp.zeros((), jnp.float32), (split(hidden), split(targets), split(weights))
    )
    return total


def gather_supervised(
    hidden: jax.Array, targets: jax.Array, valid: jax.Array, budget: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each row's first `budget` supervised positions, in order: hidden [b, budget, d],
    targets and weights [b, budget] (weight 0 on the filler rows of a short row)."""
    index = jax.vmap(lambda v: jnp.nonzero(v, size=budget, fill_value=0)[0])(valid)  # [b, K]
    take = lambda x: jnp.take_along_axis(x, index.reshape(*index.shape, *(1,) * (x.ndim - 2)), 1)
    kept = jnp.arange(budget)[None, :] < valid.sum(axis=1, keepdims=True)  # [b, K]
    return take(hidden), jnp.where(kept, take(targets), 0), kept.astype(jnp.float32)


def answer_cross_entropy(
    head: Head, hidden: jax.Array, labels: jax.Array, *, budget: int, chunk: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """hidden [b, t, d] (the decoder's final-normed states), labels [b, t] -> (sum of the
    next-token CE over supervised positions, their count, whether the batch overran the
    per-example budget and took the every-position branch)."""
    targets, valid = answer_targets(labels)
    hidden = hidden[:, :-1]  # position i predicts labels[:, i + 1]

    def everywhere(hidden, targets, valid):
        weights = valid.astype(jnp.float32)
        return chunked_cross_entropy(head, hidden, jnp.where(valid, targets, 0), weights, chunk)

    def gathered(hidden, targets, valid):
        return chunked_cross_entropy(head, *gather_supervised(hidden, targets, valid, budget), chunk)

    if budget <= 0 or budget >= hidden.shape[1]:  # no gather: every position, never "over"
        return everywhere(hidden, targets, valid), valid.sum(), jnp.zeros((), bool)
    over_budget = jnp.max(valid.sum(axis=1)) > budget
    ce_sum = jax.lax.cond(over_budget, everywhere, gathered, hidden, targets, valid)
    return ce_sum, valid.sum(), over_budget
