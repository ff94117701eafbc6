"""Reading compiled programs: matmul FLOPs weight loop bodies by their trip counts (where
XLA's own cost analysis counts them once) and collectives are found with their bytes."""

import jax
import jax.numpy as jnp

from moe_llava_jax import hlo_stats

ROWS, DIM, LAYERS = 32, 64, 6


def scanned_matmuls(w, x):
    def body(h, wi):
        return jnp.tanh(h @ wi), None

    h, _ = jax.lax.scan(body, x, w)  # LAYERS x [ROWS, DIM] @ [DIM, DIM]
    return jnp.einsum("bij,bjk->bik", h.reshape(4, 8, DIM), h.reshape(4, DIM, 8)).sum()


def test_matmul_flops_count_every_trip_of_a_scan():
    w, x = jnp.ones((LAYERS, DIM, DIM)), jnp.ones((ROWS, DIM))
    compiled = jax.jit(scanned_matmuls).lower(w, x).compile()
    expected = LAYERS * 2 * ROWS * DIM * DIM + 4 * 2 * 8 * DIM * 8
    assert hlo_stats.matmul_flops(compiled.as_text()) == expected
    assert compiled.cost_analysis()["flops"] < expected / 2  # XLA's: the body once


def test_matmul_flops_of_the_gradient_count_three_products_per_scanned_layer():
    w, x = jnp.ones((LAYERS, DIM, DIM)), jnp.ones((ROWS, DIM))
    compiled = jax.jit(jax.grad(scanned_matmuls)).lower(w, x).compile()
    layer = 2 * ROWS * DIM * DIM
    # Each trip: the forward product, its weight gradient and its input gradient (the scan
    # body is one program: the first trip's unused input gradient is computed too); the
    # einsum's two input gradients (its forward value is not needed: the loss is a sum).
    expected = 3 * LAYERS * layer + 2 * (4 * 2 * 8 * DIM * 8)
    assert hlo_stats.matmul_flops(compiled.as_text()) == expected


def test_collectives_are_counted_with_their_result_bytes():
    text = """HloModule m

ENTRY %main (p: f32[8,4]) -> f32[32,4] {
  %p = f32[8,4]{1,0} parameter(0)
  %all-gather-start = (f32[8,4]{1,0}, f32[32,4]{1,0}) all-gather-start(%p), dimensions={0}
  %all-gather-done = f32[32,4]{1,0} all-gather-done(%all-gather-start)
  %all-reduce = bf16[16]{0} all-reduce(%q), to_apply=%add
  ROOT %r = f32[32,4]{1,0} copy(%all-gather-done)
}
"""
    found = hlo_stats.collective_ops(text)
    assert found["all-gather"] == {"ops": 1, "bytes": 32 * 4 * 4}
    assert found["all-reduce"] == {"ops": 1, "bytes": 16 * 2}
    assert found["all-to-all"] == {"ops": 0, "bytes": 0}
