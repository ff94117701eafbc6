"""The gathered, chunked answer CE equals the CE of full [b, t, vocab] logits: sums, counts
and gradients, under, at and over the budget; the model's loss equals today's full-logits
loss for any budget."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_llava_jax import answer_loss, param_tree, train_step
from moe_llava_jax.data.conversation import IGNORE_INDEX
from tests.helpers import first_batch, make_stage

B, T, D, V = 3, 17, 8, 11


def labels_with_answers(lengths):
    """labels [B, T]: row r supervises lengths[r] positions (spread out), the rest IGNORE."""
    rng = np.random.default_rng(0)
    labels = np.full((B, T), IGNORE_INDEX)
    for row, n in enumerate(lengths):
        where = np.sort(rng.choice(np.arange(1, T), size=n, replace=False))
        labels[row, where] = rng.integers(0, V, size=n)
    return jnp.asarray(labels)


def full_logits_ce(kernel, hidden, labels):
    """Today's reference: the head on every position, CE where the target is supervised."""
    targets, valid = answer_loss.answer_targets(labels)
    logits = (hidden @ kernel)[:, :-1]
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
    return jnp.sum(per_token * valid), valid.sum()


@pytest.mark.parametrize("budget", [0, 3, 5, 16, 40])  # over, at (longest row = 5), under, all
@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_gathered_chunked_ce_equals_full_logits_ce(budget, chunk):
    lengths = (5, 0, 2)
    labels = labels_with_answers(lengths)
    keys = jax.random.split(jax.random.key(0), 2)
    hidden = jax.random.normal(keys[0], (B, T, D))
    kernel = jax.random.normal(keys[1], (D, V))

    def ours(kernel, hidden):
        head = lambda h: h @ kernel
        total, count, over = answer_loss.answer_cross_entropy(
            head, hidden, labels, budget=budget, chunk=chunk
        )
        return total, (count, over)

    (total, (count, over)), grads = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(
        kernel, hidden
    )
    (ref_total, ref_count), ref_grads = jax.value_and_grad(
        lambda k, h: full_logits_ce(k, h, labels), argnums=(0, 1), has_aux=True
    )(kernel, hidden)
    assert int(count) == int(ref_count) == sum(lengths)
    assert bool(over) == (0 < budget < max(lengths))  # 0 and >= T - 1 never gather
    np.testing.assert_allclose(total, ref_total, rtol=1e-6)
    for ours_grad, ref_grad in zip(grads, ref_grads):
        np.testing.assert_allclose(ours_grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_the_gather_keeps_each_rows_answers_in_order():
    labels = labels_with_answers((5, 0, 2))
    targets, valid = answer_loss.answer_targets(labels)
    hidden = jnp.arange(B * (T - 1), dtype=jnp.float32).reshape(B, T - 1, 1)
    rows, kept_targets, weights = answer_loss.gather_supervised(hidden, targets, valid, 6)
    for r in range(B):
        where = np.flatnonzero(np.asarray(valid[r]))
        n = len(where)
        np.testing.assert_array_equal(rows[r, :n, 0], np.asarray(hidden[r, where, 0]))
        np.testing.assert_array_equal(kept_targets[r, :n], np.asarray(targets[r, where]))
        np.testing.assert_array_equal(weights[r], [1.0] * n + [0.0] * (6 - n))


# Gathered (the default path); over the budget (every position) also in the unit test above.
@pytest.mark.parametrize("budget", [1000, pytest.param(2, marks=pytest.mark.slow)])
def test_the_models_loss_and_gradients_do_not_depend_on_the_budget(micro_config, budget):
    stage, data, tokenizer = make_stage(micro_config, "stage3")  # MoE: aux loss and router
    batch = first_batch(stage, data, tokenizer)
    params = stage.fresh_params()

    def loss(params, loss_budget, loss_chunk):
        return train_step.compute_loss(
            stage.model, params, batch, jax.random.key(0), 0.01,
            loss_budget=loss_budget, loss_chunk=loss_chunk,
        )

    def reference(params):  # the full [b, t, vocab] logits, as the step computed them before
        logits, stats = stage.model.apply(
            {"params": params}, batch["input_ids"], batch["images"], deterministic=False,
            rngs={"gating": jax.random.key(0)},
        )
        ce_sum, count = full_logits_ce(jnp.eye(logits.shape[-1]), logits, batch["labels"])
        return ce_sum / count + 0.01 * jnp.sum(stats["aux_loss"])

    ref, ref_grads = jax.jit(jax.value_and_grad(reference))(params)
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2))
    (ours, metrics), grads = grad(params, budget, 5)
    assert bool(metrics["loss_over_budget"]) == (budget == 2)
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    flat, ref_flat = param_tree.flatten(grads), param_tree.flatten(ref_grads)
    for path in ref_flat:
        np.testing.assert_allclose(flat[path], ref_flat[path], rtol=1e-4, atol=1e-7, err_msg=path)
