"""MoE FFN step time: dispatch modes vs a dense FFN of equal active FLOPs, in one process.

    python -m benchmarks.moe_layer [--repeats 5] [--tokens 2048] [--embed 256] [--hidden 512]

One training step of the FFN alone (forward + backward w.r.t. params and input, gating
noise on) for:
- dense: one SwiGLU FFN with hidden size k * F, the FLOPs of the k experts a token visits;
- naive: every expert on every token, outputs weighted by the (mostly zero) gates: E / k x
  the dense FLOPs, the cost a "just vmap the experts" MoE pays;
- capacity: `MoELayer` with dispatch="capacity" (capacity factor 1.5, as in training);
- dropless: `MoELayer` with dispatch="dropless" and the backend's grouped matmul, plus, where
  that is not ragged_dot, dropless with `jax.lax.ragged_dot` for comparison.
Then the step time of both modes for E = 4, 8, 16 experts at k = 2: with the active FLOPs
fixed, a good dispatch keeps the E=16 / E=4 ratio near 1. Medians over repeats, after a
warm-up call that compiles.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Hashable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_llava_jax.models import moe
from moe_llava_jax.models.dropless import dropless_experts
from moe_llava_jax.models.grouped_matmul import default_implementation
from moe_llava_jax.models.mlp import MLP, FFNConfig, ffn_apply, joined_projections

TOP_K = 2
AUX_COEF = 0.01


def median_seconds(
    steps: dict[Hashable, Callable[[], object]], repeats: int
) -> dict[Hashable, float]:
    """Median seconds per step, after a compiling warm-up call. Repeats are interleaved
    (every step once per round) so that a load change on the machine hits all alike."""
    for step in steps.values():
        jax.block_until_ready(step())
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def train_step(apply: Callable, params: dict, x: jax.Array) -> Callable[[], object]:
    """grad w.r.t. (params, x) of mean(out^2) + 0.01 * aux loss, as a zero-argument call.

    `apply(params, x, rng) -> (out, aux_loss)`; the gating rng is fixed across calls."""

    def loss(params, x):
        out, aux = apply(params, x, jax.random.key(1))
        return jnp.mean(jnp.square(out)) + AUX_COEF * aux

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda: step(params, x)


def moe_layer(num_experts: int, ffn: FFNConfig, dispatch: str) -> moe.MoELayer:
    config = moe.MoEConfig(num_experts=num_experts, top_k=TOP_K, dispatch=dispatch)
    return moe.MoELayer(config, ffn)


def layer_apply(layer: moe.MoELayer) -> Callable:
    def apply(params, x, rng):
        out, stats = layer.apply({"params": params}, x, False, rngs={"gating": rng})
        return out, stats["aux_loss"]

    return apply


def routed_apply(num_experts: int, ffn: FFNConfig, experts: Callable) -> Callable:
    """The MoE layer's router, then `experts(params, tokens, routing)` with nothing dropped."""

    def apply(params, x, rng):
        tokens = x.reshape(1, -1, x.shape[-1])  # [g, s, d]
        logits = tokens @ params["router"]["kernel"]  # [g, s, E]
        routing = moe.route_top_k(logits, TOP_K, capacity=tokens.shape[1], noise_rng=rng)
        return experts(params["experts"], tokens, routing).reshape(x.shape), routing.aux_loss

    return apply


def naive_experts(num_experts: int, ffn: FFNConfig) -> Callable:
    def experts(params, tokens, routing):  # every expert on every token: [E, s, d]
        everyone = jnp.broadcast_to(tokens, (num_experts, *tokens.shape[1:]))  # g = 1
        y = ffn_apply(
            everyone, ffn, lambda h, names: moe.stacked_linear(h, joined_projections(params, names))
        )
        onehot = jax.nn.one_hot(routing.expert_index, num_experts)  # [g, s, k, E]
        gates = jnp.einsum("gske,gsk->gse", onehot, routing.gate)
        return jnp.einsum("esd,gse->gsd", y, gates)

    return experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--embed", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512, help="each expert's FFN size F")
    parser.add_argument("--experts", default="4,8,16", help="E values of the scaling table")
    args = parser.parse_args()

    kernel = default_implementation()
    print(
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"grouped matmul: {kernel}; tokens {args.tokens}, embed {args.embed}, "
        f"expert FFN {args.hidden} (SwiGLU), k={TOP_K}; fwd+bwd medians of {args.repeats}"
    )
    x = jax.random.normal(jax.random.key(0), (2, args.tokens // 2, args.embed))  # [b, t, d]
    ffn = FFNConfig(args.embed, args.hidden, "silu", gated=True, use_bias=False)
    dense_ffn = FFNConfig(args.embed, TOP_K * args.hidden, "silu", gated=True, use_bias=False)

    def init(layer: nn.Module, *call_args) -> dict:
        return nn.unbox(layer.init(jax.random.key(2), x, *call_args)["params"])

    dense = MLP(dense_ffn)
    num_experts = 4
    params = init(moe_layer(num_experts, ffn, "capacity"), True)
    steps = {
        "dense (equal active FLOPs)": train_step(
            lambda p, x, rng: (dense.apply({"params": p}, x), 0.0), init(dense), x
        ),
        "naive (all experts, all tokens)": train_step(
            routed_apply(num_experts, ffn, naive_experts(num_experts, ffn)), params, x
        ),
        "capacity (cf 1.5)": train_step(
            layer_apply(moe_layer(num_experts, ffn, "capacity")), params, x
        ),
        f"dropless ({kernel})": train_step(
            layer_apply(moe_layer(num_experts, ffn, "dropless")), params, x
        ),
    }
    if kernel != "ragged_dot":

        def ragged(params, tokens, routing):
            y = dropless_experts(
                tokens[0],
                routing.expert_index[0],
                routing.gate[0],
                params,
                ffn,
                num_experts,
                implementation="ragged_dot",
            )
            return y[None]

        steps["dropless (ragged_dot)"] = train_step(
            routed_apply(num_experts, ffn, ragged), params, x
        )
    seconds = median_seconds(steps, args.repeats)
    dense_seconds = seconds["dense (equal active FLOPs)"]
    print(f"\nE={num_experts}, dense FFN size {TOP_K * args.hidden}:\n")
    print("| FFN | ms | / dense |")
    print("|---|---|---|")
    for name, t in seconds.items():
        print(f"| {name} | {1e3 * t:.1f} | {t / dense_seconds:.2f} |")

    counts = [int(e) for e in args.experts.split(",")]
    steps = {}
    for dispatch in moe.DISPATCH_MODES:
        for e in counts:
            layer = moe_layer(e, ffn, dispatch)
            steps[dispatch, e] = train_step(layer_apply(layer), init(layer, True), x)
    seconds = median_seconds(steps, args.repeats)
    print(f"\nScaling with E at k={TOP_K} (ms; active FLOPs fixed):\n")
    header = " | ".join(f"E={e}" for e in counts)
    print(f"| dispatch | {header} | E={counts[-1]}/E={counts[0]} |")
    print("|---|" + "---|" * (len(counts) + 1))
    for dispatch in moe.DISPATCH_MODES:
        cells = " | ".join(f"{1e3 * seconds[dispatch, e]:.1f}" for e in counts)
        ratio = seconds[dispatch, counts[-1]] / seconds[dispatch, counts[0]]
        print(f"| {dispatch} | {cells} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
