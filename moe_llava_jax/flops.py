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
  (grads w.r.t. both operands), if a unit before it trains: gradients must flow back
  through it to reach a trainable param. If only the unit itself trains, it needs the
  gradients of its own inner activations, not of its input: its output projection's share
  (attention's o_proj, the FFN's down projection, the projector's layers after the first)
  plus 2x its scores.
So a unit that trains with trainable units below it costs 3x its forward (the usual 6 N P
training estimate); a frozen unit above a trainable one 2x (e.g. stage 1's decoder, under
which the projector trains); a frozen unit below every trainable one 1x (the vision tower).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from moe_llava_jax import param_tree
from moe_llava_jax.data.conversation import IMAGE_TOKEN_INDEX
from moe_llava_jax.models.lvlm import LVLMConfig
from moe_llava_jax.models.projector import projector_depth


@dataclasses.dataclass(frozen=True)
class Unit:
    """One link of the chain: the param paths it owns (a prefix names a module or a param),
    forward FLOPs of its weight matmuls, of its activation x activation matmuls, and of the
    weight matmuls its own weight gradients must backpropagate through."""

    prefixes: tuple[str, ...]
    weight_flops: float
    attention_flops: float = 0.0
    output_flops: float = 0.0  # the weight matmuls after its first (see the module docstring)

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
    scores = 2 * 2 * batch * seq**2 * heads * head_dim
    return Unit(prefixes, projections, scores, output_flops=2 * tokens * dim * head_dim * heads)


def ffn_flops(tokens: int, dim: int, hidden: int, gated: bool) -> float:
    return 2 * tokens * dim * hidden * (3 if gated else 2)


def ffn_output_flops(tokens: int, dim: int, hidden: int) -> float:
    """The FFN's down projection, [hidden -> dim]."""
    return 2 * tokens * dim * hidden


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
                output_flops=ffn_output_flops(
                    batch * vis_seq, vis.hidden_size, vis.intermediate_size
                ),
            )
        )
    image_tokens = batch * vis.num_image_tokens
    depth = projector_depth(config.projector)
    later_layers = 2 * image_tokens * dec.hidden_size * (depth - 1) * dec.hidden_size
    units.append(
        Unit(
            ("projector",),
            2 * image_tokens * dec.hidden_size * vis.hidden_size + later_layers,
            output_flops=later_layers,
        )
    )
    units.append(Unit(("decoder/embed_tokens",), 0.0))  # a lookup; trains in some recipes
    tokens = batch * seq
    moe_layers = set(dec.moe_layers)
    dense_ffn = ffn_flops(tokens, dec.hidden_size, dec.intermediate_size, dec.gated_mlp)
    dense_out = ffn_output_flops(tokens, dec.hidden_size, dec.intermediate_size)
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
        active = 1  # FFNs each token runs
        ffn = 0.0
        if i in moe_layers:
            moe = dec.moe
            ffn = 2 * tokens * dec.hidden_size * moe.num_experts  # router
            active = moe.top_k + int(moe.shared_expert)  # only the routed experts, not all E
        units.append(
            Unit(
                (f"{block}/post_attn_norm", f"{block}/mlp", f"{block}/moe"),
                ffn + active * dense_ffn,
                output_flops=active * dense_out,
            )
        )
    head = "decoder/embed_tokens" if dec.tie_embeddings else "decoder/lm_head"
    units.append(Unit(("decoder/final_norm", head), 2 * tokens * dec.hidden_size * dec.vocab_size))
    return units


_DECODER_LAYER = re.compile(r"decoder/layers_(\d+)/(.+)")


def _chain(config: LVLMConfig, trainable_mask: Mapping, batch: int, seq: int):
    """The units in forward order with (whether it trains, whether a unit below it trains)."""
    units = model_units(config, batch, seq)
    trained = {path for path, train in param_tree.flatten(trainable_mask).items() if train}
    unowned = sorted(p for p in trained if not any(u.owns(p) for u in units))
    if unowned:
        raise ValueError(f"flops: trainable params {unowned} belong to no counted unit")
    below = False  # does some unit before this one train?
    for unit in units:
        trains = any(unit.owns(path) for path in trained)
        yield unit, trains, below
        below = below or trains


def activation_gradient_flops(unit: Unit, trains: bool, below: bool) -> float:
    """The unit's activation-gradient FLOPs (module docstring): through all of it when a
    unit below trains, through its output projections and scores when only it trains."""
    if below:
        return unit.weight_flops + 2 * unit.attention_flops
    if trains:
        return unit.output_flops + 2 * unit.attention_flops
    return 0.0


def unit_step_flops(unit: Unit, trains: bool, below: bool) -> StepFlops:
    """The unit's forward and backward FLOPs in a step (module docstring)."""
    return StepFlops(
        forward=unit.weight_flops + unit.attention_flops,
        backward=(unit.weight_flops if trains else 0.0)
        + activation_gradient_flops(unit, trains, below),
    )


def train_step_flops(
    config: LVLMConfig, trainable_mask: Mapping, batch: int, seq: int
) -> StepFlops:
    """FLOPs of one step on input_ids [batch, seq] (+ batch images) training the params the
    mask (nested like the params, or flat by '/'-joined path) marks True."""
    steps = [unit_step_flops(*link) for link in _chain(config, trainable_mask, batch, seq)]
    return StepFlops(
        forward=sum(s.forward for s in steps), backward=sum(s.backward for s in steps)
    )


@dataclasses.dataclass(frozen=True)
class WorkRates:
    """Model FLOPs of a step per unit of work, so that a step can count the work of its
    real examples (packed or padded rows alike) instead of every padded position: an image
    (vision tower + projector), a token (the decoder's and LM head's weight matmuls), a
    query-key pair of the decoder's attention scores (an example of n tokens has n^2, as
    the unmasked count above has seq^2 per row)."""

    per_image: float
    per_token: float
    per_pair: float

    def flops(self, images: float, tokens: float, pairs: float) -> float:
        return images * self.per_image + tokens * self.per_token + pairs * self.per_pair


def batch_work(batch: Mapping[str, np.ndarray], num_image_tokens: int) -> tuple[int, int, int]:
    """(images, tokens, attention pairs) of a host batch's real examples: packed rows count
    each segment (`segments`), padded rows their `length` (`data/pipeline.py`)."""
    if "segments" in batch:
        lengths = np.concatenate([np.bincount(row)[1:] for row in batch["segments"]])
    else:
        lengths = np.asarray(batch["length"])
    lengths = lengths.astype(np.int64)
    images = int(np.sum(batch["input_ids"] == IMAGE_TOKEN_INDEX)) // num_image_tokens
    return images, int(lengths.sum()), int(np.sum(lengths**2))


def train_step_rates(config: LVLMConfig, trainable_mask: Mapping, seq: int) -> WorkRates:
    """The step's `WorkRates` (which units train, as in `train_step_flops`): for b rows of
    `seq` tokens and an image each, `rates.flops(b, b * seq, b * seq**2)` is
    `train_step_flops(..., b, seq).total`."""
    image = token = pair = 0.0
    for unit, trains, below in _chain(config, trainable_mask, 1, seq):
        total = unit_step_flops(unit, trains, below).total
        if not unit.prefixes[0].startswith("decoder/"):  # tower, projector: per image
            image += total
            continue
        scores = unit.attention_flops * (3 if trains or below else 1)  # fwd + 2x in the bwd
        token += (total - scores) / seq
        pair += scores / seq**2
    return WorkRates(image, token, pair)


def designed_overheads(
    config: LVLMConfig,
    trainable_mask: Mapping,
    batch: int,
    seq: int,
    *,
    remat: bool,
    expert_slots_per_token: float,
    query_chunk: int = 0,
    attention_kernel: bool = False,
) -> dict[str, float]:
    """Matmul FLOPs a compiled step runs beyond `train_step_flops` by design, so that a
    compiled program can be checked for work nobody asked for (`aot.py`):
    - "remat_recompute": the backward recomputes the forward of the LM head, whose chunks run
      under `jax.checkpoint` (`answer_loss.py`), and under `model.remat` of every decoder
      layer it needs gradients from (its params train or a layer below does; the vision
      tower gets no backward). "unit" remat recomputes whole units: the same layers when the
      lowest trainable layer starts a unit, as in the presets.
    - "capacity_padding": capacity dispatch runs each MoE layer's experts on all E x C slots
      of their buffers (`expert_slots_per_token` per token, e.g. k x capacity factor) where
      the analytic count has k: the extra slots cost what routed ones do, in the forward,
      the recompute and the backward.
    - "attention_chunks": the xla attention in chunks of `query_chunk` queries (0: none)
      pads the queries to a whole number of chunks, and the backward of a decoder layer's
      attention recomputes each chunk's scores q k^T (each chunk runs under
      `jax.checkpoint`; p v is not needed again).
    - "attention_kernel" (negative): with `attention_kernel` the scores and p v run inside a
      fused kernel (splash, cuDNN), a custom call the program's matmul count does not see:
      every pass over them the analytic count and the recompute have is taken out.
    """
    moe, dec = config.decoder.moe, config.decoder
    tokens = batch * seq
    head = "decoder/embed_tokens" if dec.tie_embeddings else "decoder/lm_head"
    chain = list(_chain(config, trainable_mask, batch, seq))
    layers = [(_DECODER_LAYER.fullmatch(u.prefixes[0]), u, t, b) for u, t, b in chain]
    # Decoder layers the backward passes through (their params train or a layer below does).
    backward_layers = {int(m[1]) for m, _, t, b in layers if m and (t or b)}
    chunked = 0 < query_chunk < seq and not attention_kernel
    padded_queries = -(-seq // query_chunk) * query_chunk if chunked else seq
    recompute = padding = attention = in_kernel = 0.0
    for layer, unit, trains, below in layers:
        in_backward = trains or below
        if in_backward and unit.owns(head):
            recompute += unit.weight_flops + unit.attention_flops
        recomputed = bool(layer) and remat and int(layer[1]) in backward_layers
        if attention_kernel:  # every unit's scores (the tower's too): forward, recompute, backward
            in_kernel -= unit.attention_flops * (1 + recomputed + 2 * in_backward)
        if not layer:
            continue
        index, module = int(layer[1]), layer[2]  # decoder/layers_{index}/<module>...
        if recomputed:
            recompute += unit.weight_flops + unit.attention_flops
        if module == "input_norm":  # the attention unit: scores over padded queries
            passes = 1 + recomputed + 2 * in_backward
            # A chunk's backward recomputes its probabilities (q k^T), not p v: half its FLOPs.
            chunk_recompute = 0.5 if chunked and in_backward else 0.0
            attention += unit.attention_flops * (
                padded_queries / seq * (passes + chunk_recompute) - passes
            )
        if moe is not None and module == "post_attn_norm" and index in dec.moe_layers:
            # One expert FFN on every token, as a unit of its own (output: its down projection).
            expert = Unit(
                unit.prefixes,
                ffn_flops(tokens, dec.hidden_size, dec.intermediate_size, dec.gated_mlp),
                output_flops=ffn_output_flops(tokens, dec.hidden_size, dec.intermediate_size),
            )
            passes = expert.weight_flops * (1 + recomputed + trains)
            passes += activation_gradient_flops(expert, trains, below)
            padding += (expert_slots_per_token - moe.top_k) * passes
    return {
        "remat_recompute": recompute,
        "capacity_padding": padding,
        "attention_chunks": attention,
        "attention_kernel": in_kernel,
    }
