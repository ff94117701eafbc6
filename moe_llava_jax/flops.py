"""Analytic FLOPs of one training step: the "model FLOPs" that MFU divides by.

Counted: matrix multiplications only, 2 FLOPs per multiply-add, at the shapes the step runs
(the padded batch: every position of `batch_size x max_length`; the full t x t attention
matrix, as the model computes it, masked). Not counted: biases, norms, activations,
softmax, embedding lookups, routing bookkeeping, the optimizer update (O(params), not
O(params x tokens)), remat's recomputation (hardware, not model FLOPs) and, in capacity
dispatch, the padding slots of expert buffers.

Forward, with N tokens of width d through a layer:
- a weight matmul [d_in -> d_out]: 2 N d_in d_out. Attention: q, k, v, o projections (GQA:
  k, v have num_kv_heads heads); scores q k^T and the weighted sum p v: 2 x 2 b s^2 (h hd).
- the FFN: 2 (gated) or 1 projection(s) d -> F and one F -> d. An MoE FFN counts the router
  (2 N d E) and only the k experts each token is routed to (k FFNs; plus the shared
  expert when there is one), not all E.
- vision tower: patch embedding + the blocks it runs (`select_layer`), every image;
  projector on the image tokens; LM head over every position.

Backward, per *unit* (the model as a chain in forward order: tower embeddings, each tower
block's attention and MLP, projector, token embedding, each decoder block's attention and
FFN, LM head; a norm belongs to the unit it feeds):
- weight gradients, = the unit's weight-matmul forward FLOPs, if any of its params trains;
- activation gradients, = its weight-matmul forward FLOPs + 2x its attention-score FLOPs
  (grads w.r.t. both operands), if it or any unit before it trains: gradients must flow
  back through it to reach a trainable param.
So a unit that trains with trainable units below it costs 3x its forward (the usual 6 N P
training estimate); a frozen unit above a trainable one 2x (e.g. stage 1's decoder, under
which the projector trains); a frozen unit below every trainable one 1x (the vision tower).
The approximation: the lowest trainable unit is charged the gradient w.r.t. its own input
too, which nothing needs: at most one unit's weight FLOPs too many (~1/(2 x layers) of a
stage-2 step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from moe_llava_jax import param_tree
from moe_llava_jax.models.lvlm import LVLMConfig
from moe_llava_jax.models.projector import projector_depth


@dataclasses.dataclass(frozen=True)
class Unit:
    """One link of the chain: the param paths it owns (a prefix names a module or a param),
    forward FLOPs of its weight matmuls and of its activation x activation matmuls."""

    prefixes: tuple[str, ...]
    weight_flops: float
    attention_flops: float = 0.0

    def owns(self, path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in self.prefixes)


@dataclasses.dataclass(frozen=True)
class StepFlops:
    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def attention_unit(
    prefixes: tuple[str, ...],
    batch: int,
    seq: int,
    dim: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> Unit:
    """Self-attention over [batch, seq, dim]: q, k, v, o projections and the scores."""
    tokens = batch * seq
    projections = 2 * tokens * dim * head_dim * (2 * heads + 2 * kv_heads)  # q, o + k, v
    return Unit(prefixes, projections, 2 * 2 * batch * seq**2 * heads * head_dim)


def ffn_flops(tokens: int, dim: int, hidden: int, gated: bool) -> float:
    return 2 * tokens * dim * hidden * (3 if gated else 2)


def model_units(config: LVLMConfig, batch: int, seq: int) -> list[Unit]:
    """The chain of units (module docstring) for input_ids [batch, seq] + batch images."""
    vis, dec = config.vision, config.decoder
    vis_seq = vis.num_patches + int(vis.class_token)
    embeddings = ("patch_embed", "class_embedding", "position_embedding", "pre_norm")
    patch_values = vis.patch_size**2 * 3  # RGB pixels per patch
    units = [
        Unit(
            tuple(f"vision/{name}" for name in embeddings),
            2 * batch * vis.num_patches * patch_values * vis.hidden_size,
        )
    ]
    for i in range(vis.num_blocks_to_run):
        block = f"vision/layers_{i}"
        units.append(
            attention_unit(
                (f"{block}/norm1", f"{block}/attn"),
                batch,
                vis_seq,
                vis.hidden_size,
                vis.num_heads,
                vis.num_heads,
                vis.hidden_size // vis.num_heads,
            )
        )
        units.append(
            Unit(
                (f"{block}/norm2", f"{block}/mlp"),
                ffn_flops(batch * vis_seq, vis.hidden_size, vis.intermediate_size, gated=False),
            )
        )
    image_tokens = batch * vis.num_image_tokens
    depth = projector_depth(config.projector)
    units.append(
        Unit(
            ("projector",),
            2 * image_tokens * dec.hidden_size * (vis.hidden_size + (depth - 1) * dec.hidden_size),
        )
    )
    units.append(Unit(("decoder/embed_tokens",), 0.0))  # a lookup; trains in some recipes
    tokens = batch * seq
    moe_layers = set(dec.moe_layers)
    dense_ffn = ffn_flops(tokens, dec.hidden_size, dec.intermediate_size, dec.gated_mlp)
    for i in range(dec.num_layers):
        block = f"decoder/layers_{i}"
        units.append(
            attention_unit(
                (f"{block}/input_norm", f"{block}/attn"),
                batch,
                seq,
                dec.hidden_size,
                dec.num_heads,
                dec.num_kv_heads,
                dec.resolved_head_dim,
            )
        )
        if i in moe_layers:
            moe = dec.moe
            ffn = 2 * tokens * dec.hidden_size * moe.num_experts  # router
            ffn += (moe.top_k + int(moe.shared_expert)) * dense_ffn  # only the active experts
        else:
            ffn = dense_ffn
        units.append(Unit((f"{block}/post_attn_norm", f"{block}/mlp", f"{block}/moe"), ffn))
    head = "decoder/embed_tokens" if dec.tie_embeddings else "decoder/lm_head"
    units.append(Unit(("decoder/final_norm", head), 2 * tokens * dec.hidden_size * dec.vocab_size))
    return units


def train_step_flops(
    config: LVLMConfig, trainable_mask: Mapping, batch: int, seq: int
) -> StepFlops:
    """FLOPs of one step on input_ids [batch, seq] (+ batch images) training the params the
    mask (nested like the params, or flat by '/'-joined path) marks True."""
    units = model_units(config, batch, seq)
    trained = {path for path, train in param_tree.flatten(trainable_mask).items() if train}
    unowned = sorted(p for p in trained if not any(u.owns(p) for u in units))
    if unowned:
        raise ValueError(f"flops: trainable params {unowned} belong to no counted unit")
    forward = backward = 0.0
    grads_flow = False  # does some unit at or below this one train?
    for unit in units:
        trains = any(unit.owns(path) for path in trained)
        grads_flow = grads_flow or trains
        forward += unit.weight_flops + unit.attention_flops
        if trains:
            backward += unit.weight_flops
        if grads_flow:
            backward += unit.weight_flops + 2 * unit.attention_flops
    return StepFlops(forward=forward, backward=backward)
