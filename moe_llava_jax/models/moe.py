"""Top-k routed mixture-of-experts FFN with capacity-based dispatch (MoE-LLaVA semantics).

Router: fp32 linear (no bias) -> softmax over E experts per token -> top-k choices.
Choice 1 is the argmax; later choices are argmaxes over the remaining experts of the logits
plus Gumbel noise when `noise` is on (the original's `top2gating` does this in training *and*
eval; here eval noise is a separate switch, off by default, so greedy decoding is
deterministic). Each expert owns `capacity` slots per group of tokens; slots are handed out
to all first choices in token order, then all second choices, ...; a choice that finds its
expert full is dropped. With top_k >= 2 the kept gate values of a token are renormalised to
sum to 1 (DeepSpeed `top2gating`: one survivor gets weight 1; no survivor -> MoE output 0 and
the residual carries the token). With top_k = 1 the gate is the raw router probability of the
chosen expert, as in DeepSpeed's `top1gating` (and Switch): renormalising a single choice
would make it 1 and cut the router off from the loss's gradient. Not reproduced from
`top1gating`: its random token selection (`use_rts`) on overflow; here the first tokens in
order keep their slots, as for top-2.

Router statistics per layer: the aux (balance) loss, the ST-MoE z-loss
`mean_tokens(logsumexp(logits)^2)` (keeps logits small; weighted by `router_z_loss_coef`,
0 in the paper), the mean routing entropy, expert loads and the dropped fraction. An optional
shared expert (DeepSeekMoE) is a dense FFN every token passes through, added to the routed
output.

Two dispatch modes (`MoEConfig.dispatch`), same router, gates and statistics:
- "capacity" (the original's): tokens are gathered into `[groups, experts, capacity, embed]`
  buffers by index and combined by index (O(tokens * embed)), instead of one-hot
  `[tokens, experts, capacity]` einsums (O(tokens * experts * capacity * embed)).
- "dropless": no capacity, no drop (dropped_fraction 0; the gates are those of capacity mode
  when nothing is dropped). The (token, choice) assignments are sorted by expert and the
  experts run as grouped matmuls over the sorted rows, so the FLOPs are the routed ones;
  with an `expert` mesh axis, tokens travel to their experts' devices by all-to-all
  (`dropless.py`); a "ragged" exchange bounds the receive buffers and drops (and counts in
  dropped_fraction) the rows past them.
Both modes read the same expert params [E, ...] (declared by the vmapped `MLP`) and compute
them with the same `mlp.ffn_apply` (capacity: through `pieced_ffn`), so checkpoints and
upcycling do not depend on the mode.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from moe_llava_jax.models import layers
from moe_llava_jax.models.dropless import routed_experts
from moe_llava_jax.models.mlp import MLP, FFNConfig
from moe_llava_jax.models.pieced_ffn import check_pieces, pieced_ffn

PLACEMENTS = ("sparse", "first_half", "second_half", "dense")
DISPATCH_MODES = ("capacity", "dropless")
GROUPINGS = ("local", "global")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 4
    top_k: int = 2
    capacity_factor: float = 1.5  # training
    eval_capacity_factor: float = 2.0
    min_capacity: int = 0
    second_expert_noise: bool = True  # Gumbel noise on choices >= 2 in training (original)
    eval_second_expert_noise: bool = False  # original: True (non-deterministic greedy decode)
    # The router's fresh init: "normal" N(0, router_init_std), or "torch", PyTorch's nn.Linear
    # default U(+-1/sqrt(d)) that the original's `gate.wg` gets when stage 3 upcycles.
    router_init: str = "normal"
    router_init_std: float = 0.02
    # Routing groups (each with its own capacity, aux loss and token order): "local" routes
    # each device's share of the micro-batch as `num_groups` groups of its own, as DeepSpeed
    # routes each rank's tokens (the group count then grows with the batch's devices);
    # "global" routes the whole micro-batch as `num_groups` groups, whatever the mesh.
    num_groups: int = 1
    groups: str = "local"  # a GROUPINGS name
    layers: str = "sparse"  # a PLACEMENTS name or comma-separated layer indices, e.g. "0,3"
    shared_expert: bool = False  # an always-on dense FFN added to the routed output
    dispatch: str = "capacity"  # a DISPATCH_MODES name: "dropless" computes every choice
    # Dropless over an `expert` mesh axis: "dense" all-to-all of worst-case buffers, or
    # "ragged" (only the routed rows, into receive buffers of receive_factor x a device's
    # balanced share; rows past them dropped and counted). `models/dropless.py`.
    exchange: str = "dense"
    receive_factor: float = 2.0
    # Capacity dispatch: the experts' backward runs this many slices of their mlp axis one
    # after another (`pieced_ffn.py`: same numbers, ~1/pieces of the [g, E, C, F] temporaries).
    backward_pieces: int = 1


def moe_layer_indices(placement: str, num_layers: int) -> tuple[int, ...]:
    """Which decoder layers get an MoE FFN (`moe.layers` in the config)."""
    if placement == "sparse":
        return tuple(range(0, num_layers, 2))
    if placement == "first_half":
        return tuple(range(num_layers // 2))
    if placement == "second_half":
        return tuple(range(num_layers // 2, num_layers))
    if placement == "dense":
        return tuple(range(num_layers))
    try:
        indices = tuple(sorted({int(i) for i in placement.split(",")}))
    except ValueError:
        raise ValueError(
            f"config key model.moe.layers={placement!r}: expected one of {PLACEMENTS} "
            "or comma-separated layer indices"
        ) from None
    if not indices or indices[0] < 0 or indices[-1] >= num_layers:
        raise ValueError(
            f"config key model.moe.layers={placement!r}: indices must lie in [0, {num_layers})"
        )
    return indices


def expert_capacity(
    tokens_per_group: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int
) -> int:
    """C = ceil((S / E) * (k * capacity_factor)), at least `min_capacity`, rounded as
    DeepSpeed's `_capacity` computes it: a float32 product of float32(S / E) and float32(k *
    capacity_factor). In exact arithmetic some factors land one slot higher (S=50, E=2,
    factor 1.1: 55 there, ceil(55.000000000000007) = 56 in float64)."""
    product = np.float32(tokens_per_group / num_experts) * np.float32(top_k * capacity_factor)
    return max(math.ceil(product), min_capacity)


class Routing(NamedTuple):
    expert_index: jax.Array  # [groups, tokens, k] int32: the k chosen experts, in choice order
    slot: (
        jax.Array
    )  # [groups, tokens, k] int32: slot in the expert's buffer; == capacity if dropped
    gate: jax.Array  # [groups, tokens, k] f32: see the module docstring; 0 where dropped
    aux_loss: jax.Array  # []: E * sum_e f_e * P_e, mean over groups
    z_loss: jax.Array  # []: mean over tokens of logsumexp(logits)^2
    entropy: jax.Array  # []: mean over tokens of the entropy (nats) of the router softmax
    expert_load: jax.Array  # [E]: fraction of (token, choice) assignments per expert, pre-drop
    dropped_fraction: jax.Array  # []: fraction of (token, choice) assignments dropped


def masked_mean(x: jax.Array, weights: jax.Array | None, axis) -> jax.Array:
    """float32 mean of x over `axis`, counting only where weights (broadcast to x) are 1."""
    if weights is None:
        return jnp.mean(x, axis=axis, dtype=jnp.float32)
    x = x.astype(jnp.float32)
    weights = jnp.broadcast_to(weights, x.shape).astype(jnp.float32)
    return jnp.sum(x * weights, axis=axis) / jnp.maximum(jnp.sum(weights, axis=axis), 1)


def route_top_k(
    logits: jax.Array,
    top_k: int,
    capacity: int,
    noise_rng: jax.Array | None = None,
    real: jax.Array | None = None,
) -> Routing:
    """Top-k gating with capacity, on router logits [groups, tokens, experts] (fp32).

    `real` [groups, tokens] bool marks the tokens that are not padding (None: all are): a
    pad takes no capacity slot, gets gate 0 (it is dropped, uncounted) and is left out of
    every mean (f_e, P_e, z-loss, entropy, load, dropped fraction), so routing a packed row
    routes its examples' tokens as if the pads were not there."""
    num_experts = logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    probs = jax.nn.softmax(logits, axis=-1)  # [g, s, e]
    noisy = logits
    if noise_rng is not None:
        noisy = logits + jax.random.gumbel(noise_rng, logits.shape, logits.dtype)
    taken = jnp.zeros(logits.shape, bool)
    choices = []
    for j in range(top_k):
        scores = jnp.where(taken, -jnp.inf, logits if j == 0 else noisy)
        choice = jnp.argmax(scores, axis=-1)  # [g, s]
        taken = taken | jax.nn.one_hot(choice, num_experts, dtype=bool)
        choices.append(choice)
    expert_index = jnp.stack(choices, axis=-1).astype(jnp.int32)  # [g, s, k]
    onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [g, s, k, e]
    if real is not None:
        onehot = onehot * real[:, :, None, None]  # a pad chooses nothing

    # Queue order per expert: every token's 1st choice (token order), then 2nd choices, ...
    queue = rearrange(onehot, "g s k e -> g (k s) e")
    position = rearrange(jnp.cumsum(queue, axis=1) - 1, "g (k s) e -> g s k e", k=top_k)
    slot = jnp.sum(position * onehot, axis=-1)  # [g, s, k]
    kept = slot < capacity if real is None else (slot < capacity) & real[:, :, None]

    gate = jnp.take_along_axis(probs, expert_index, axis=-1) * kept  # [g, s, k]
    if top_k > 1:
        gate = gate / jnp.maximum(gate.sum(-1, keepdims=True), jnp.finfo(gate.dtype).eps)

    per_token = None if real is None else real[:, :, None]  # [g, s, 1]
    top1_fraction = masked_mean(onehot[:, :, 0].astype(jnp.float32), per_token, 1)  # f_e [g, e]
    mean_prob = masked_mean(probs, per_token, 1)  # P_e: [g, e]
    aux_loss = jnp.mean(num_experts * jnp.sum(top1_fraction * mean_prob, axis=-1))
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # [g, s, e]
    per_choice = None if real is None else real[:, :, None, None]  # [g, s, 1, 1]
    return Routing(
        expert_index=expert_index,
        slot=jnp.where(kept, slot, capacity),
        gate=gate,
        aux_loss=aux_loss,
        z_loss=masked_mean(jax.nn.logsumexp(logits, axis=-1) ** 2, real, None),
        entropy=masked_mean(-jnp.sum(probs * log_probs, axis=-1), real, None),
        expert_load=masked_mean(onehot.astype(jnp.float32), per_choice, (0, 1, 2)),
        dropped_fraction=masked_mean(~kept, per_token, None),
    )


def _flat_slot(routing: Routing, capacity: int, num_experts: int) -> jax.Array:
    """[g, s, k] index into a flattened [E * C] buffer; dropped choices -> E * C (a trash slot)."""
    return jnp.where(
        routing.slot < capacity,
        routing.expert_index * capacity + routing.slot,
        num_experts * capacity,
    )


def dispatch(x: jax.Array, routing: Routing, num_experts: int, capacity: int) -> jax.Array:
    """Gathers tokens x [g, s, d] into expert buffers [g, E, C, d] (empty slots are 0)."""
    groups, tokens, _ = x.shape
    flat_slot = _flat_slot(routing, capacity, num_experts)  # [g, s, k]
    token_id = jnp.broadcast_to(jnp.arange(tokens)[:, None], flat_slot.shape[1:])  # [s, k]

    def slot_to_token(slots: jax.Array) -> jax.Array:  # [s, k] -> [E * C]
        owner = jnp.full((num_experts * capacity + 1,), tokens, jnp.int32)
        return owner.at[slots.reshape(-1)].set(token_id.reshape(-1))[:-1]

    owner = jax.vmap(slot_to_token)(flat_slot)  # [g, E*C]; `tokens` marks an empty slot
    x_padded = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)  # [g, s + 1, d]
    buffers = jnp.take_along_axis(x_padded, owner[..., None], axis=1)  # [g, E*C, d]
    return rearrange(buffers, "g (e c) d -> g e c d", e=num_experts)


def combine(y: jax.Array, routing: Routing) -> jax.Array:
    """Expert outputs y [g, E, C, d] -> tokens [g, s, d] = sum_k gate_k * y[e_k, slot_k]."""
    num_experts, capacity = y.shape[1], y.shape[2]
    flat = rearrange(y, "g e c d -> g (e c) d")
    flat = jnp.concatenate([flat, jnp.zeros_like(flat[:, :1])], axis=1)  # trash slot reads 0
    flat_slot = _flat_slot(routing, capacity, num_experts)
    picked = jax.vmap(lambda buf, idx: buf[idx])(flat, flat_slot)  # [g, s, k, d]
    return jnp.einsum("gskd,gsk->gsd", picked, routing.gate.astype(y.dtype))


ROUTER_INITS = ("normal", "torch")


def router_initializer(config: MoEConfig) -> nn.initializers.Initializer:
    """`config.router_init`: N(0, router_init_std), or U(+-1/sqrt(fan_in)) as PyTorch
    initialises an nn.Linear (variance 1/(3 fan_in))."""
    if config.router_init == "normal":
        return nn.initializers.normal(config.router_init_std)
    if config.router_init == "torch":
        return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    raise ValueError(
        f"config key model.moe.router_init={config.router_init!r}: expected one of {ROUTER_INITS}"
    )


def routing_groups(config: MoEConfig, batch: int) -> tuple[int, bool]:
    """(How many routing groups a micro-batch of `batch` rows splits into, whether they are
    split over the batch's devices). "local": `num_groups` per device of the logical `batch`
    axis in context (1 device without a mesh); a batch that does not split that way (a
    decoding batch of 1 on 4 devices) falls back to `num_groups` groups in all."""
    if config.groups not in GROUPINGS:
        raise ValueError(f"config key model.moe.groups={config.groups!r}: expected one of {GROUPINGS}")
    mesh = jax.sharding.get_abstract_mesh()
    devices = 1 if mesh.empty else layers.batch_devices_in_context(mesh)
    groups = config.num_groups * devices
    if config.groups == "local" and devices > 1 and batch % groups == 0:
        return groups, True
    if batch % config.num_groups:
        raise ValueError(
            f"batch {batch} is not divisible by model.moe.num_groups={config.num_groups}"
        )
    return config.num_groups, False


def on_expert_devices(buffers: jax.Array, local: bool) -> jax.Array:
    """Expert buffers [g, E, C, d] where the expert FFN runs: E split over the mesh axes of the
    logical `expert` axis; with `local` groups, g stays split over the batch's other axes
    (each device keeps its own groups; tokens cross devices only to reach an expert on an
    `expert` axis of size > 1: an all-to-all). A no-op without a context mesh and rules."""
    if not local:
        return nn.with_logical_constraint(buffers, (None, "expert", None, None))
    mesh = jax.sharding.get_abstract_mesh()
    expert_axes = layers.mesh_axes_in_context("expert", mesh)
    batch_axes = tuple(a for a in layers.mesh_axes_in_context("batch", mesh) if a not in expert_axes)
    spec = jax.sharding.PartitionSpec(batch_axes or None, expert_axes or None)
    return jax.lax.with_sharding_constraint(buffers, jax.sharding.NamedSharding(mesh, spec))


def stacked_linear(rows: jax.Array, params: Mapping[str, jax.Array]) -> jax.Array:
    """Every expert's projection on its own rows: [E, rows, a] -> [E, rows, b]."""
    y = jnp.einsum("era,eab->erb", rows, params["kernel"])
    if "bias" in params:
        y = y + params["bias"][:, None, :]
    return y


class MoELayer(nn.Module):
    """Router + E stacked experts (params [E, ...] of the same `MLP`, vmapped), plus the
    `shared_expert` MLP when `config.shared_expert`; `config.dispatch` picks how the
    experts run (module docstring)."""

    config: MoEConfig
    ffn: FFNConfig  # every expert's shape: the dense FFN it is upcycled from
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, deterministic: bool, real: jax.Array | None = None
    ) -> tuple[jax.Array, dict]:
        """x [b, t, d], real [b, t] bool (None: no padding; `route_top_k`) -> [b, t, d],
        router statistics."""
        cfg = self.config
        if cfg.dispatch not in DISPATCH_MODES:
            raise ValueError(
                f"config key model.moe.dispatch={cfg.dispatch!r}: expected one of {DISPATCH_MODES}"
            )
        batch = x.shape[0]
        num_groups, local = routing_groups(cfg, batch)
        # [g, s, d]: group i = rows i * b / g ...; with local groups, device i's rows.
        tokens = rearrange(x, "(g b) t d -> g (b t) d", g=num_groups)
        if local:
            tokens = layers.batch_sharded(tokens)
        router = layers.Dense(
            cfg.num_experts,
            use_bias=False,
            dtype=jnp.float32,
            kernel_init=layers.logical_init(router_initializer(cfg), ("embed", None)),
            name="router",
        )
        logits = router(tokens.astype(jnp.float32))  # [g, s, E]
        check_pieces(cfg.backward_pieces, self.ffn)
        if cfg.dispatch == "dropless" and cfg.backward_pieces != 1:
            raise ValueError(
                f"config key model.moe.backward_pieces={cfg.backward_pieces}: only capacity "
                "dispatch runs the experts' backward in pieces (model.moe.dispatch='dropless')"
            )
        if cfg.dispatch == "dropless":
            # A token picks an expert at most once: s slots per expert drop nothing.
            capacity = tokens.shape[1]
        else:
            capacity = expert_capacity(
                tokens.shape[1],
                cfg.num_experts,
                cfg.top_k,
                cfg.eval_capacity_factor if deterministic else cfg.capacity_factor,
                cfg.min_capacity,
            )
        noise = cfg.eval_second_expert_noise if deterministic else cfg.second_expert_noise
        rng = self.make_rng("gating") if noise and cfg.top_k > 1 else None
        if real is not None:
            real = rearrange(real, "(g b) t -> g (b t)", g=num_groups)
        routing = route_top_k(logits, cfg.top_k, capacity, rng, real)
        # Free unless "intermediates" is mutable: the routing analysis reads it.
        self.sow("intermediates", "expert_index", routing.expert_index)

        # The vmapped MLP declares the experts' params [E, ...] (names, init, logical axes:
        # what checkpoints and upcycling see); both modes then apply them via `mlp.ffn_apply`.
        experts = nn.vmap(
            MLP,
            in_axes=1,
            out_axes=1,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            metadata_params={nn.PARTITION_NAME: "expert"},
        )(self.ffn, self.dtype, name="experts")
        if self.is_initializing():  # one call on a dummy [g=1, E, C=1, d] creates the params
            experts(jnp.zeros((1, cfg.num_experts, 1, x.shape[-1]), self.dtype))
        # As nn.Dense does with dtype=self.dtype: compute in self.dtype.
        params = jax.tree.map(
            lambda p: jnp.asarray(p, self.dtype), nn.unbox(experts.variables["params"])
        )
        if cfg.dispatch == "dropless":
            # Groups only matter to capacity: (g (b t)) flattens like ((g b) t).
            choices = x.shape[:2] + (cfg.top_k,)  # [b, t, k]
            out, overflow = routed_experts(  # [b, t, d]
                x.astype(self.dtype),
                routing.expert_index.reshape(choices),
                routing.gate.reshape(choices),
                params,
                self.ffn,
                cfg.exchange,
                cfg.receive_factor,
            )
            routing = routing._replace(dropped_fraction=routing.dropped_fraction + overflow)
        else:
            tokens = tokens.astype(self.dtype)
            buffers = dispatch(tokens, routing, cfg.num_experts, capacity)  # [g, E, C, d]
            # Under a context mesh and rules (sharding.mesh_context, as train.run): the
            # buffers live on their experts' devices, so GSPMD moves tokens there and back.
            buffers = on_expert_devices(buffers, local)
            # Groups and slots merged into rows, once for the whole FFN: XLA:CPU computes the
            # kernel gradient of a contraction over two dims (g, C) several times slower, and
            # on TPU each [g, E, C, F] <-> [E, g C, F] relayout of the hidden units is a copy.
            rows = rearrange(buffers, "g e c d -> e (g c) d")
            y = pieced_ffn(  # [E, g C, d]
                rows,
                params,
                self.ffn,
                # One product per projection: joining the kernels would copy every expert's
                # weights at each call, a decoding step's main memory traffic (the pieced
                # backward of training joins the in-projections: small next to activations).
                lambda h, p, names: jnp.concatenate(
                    [stacked_linear(h, p[name]) for name in names], axis=-1
                ),
                1 if deterministic else cfg.backward_pieces,  # no backward to run in pieces
            )
            y = on_expert_devices(rearrange(y, "e (g c) d -> g e c d", g=num_groups), local)
            if local:
                y = layers.batch_sharded(y)  # back to its tokens' devices
            routed = combine(y, routing)  # [g, s, d]
            out = rearrange(routed, "g (b t) d -> (g b) t d", b=batch // num_groups)
        if cfg.shared_expert:
            out = out + MLP(self.ffn, self.dtype, name="shared_expert")(x)  # [b, t, d]
        stats = {
            "aux_loss": routing.aux_loss,
            "z_loss": routing.z_loss,
            "router_entropy": routing.entropy,
            "expert_load": routing.expert_load,
            "dropped_fraction": routing.dropped_fraction,
        }
        return out, stats
