"""Sequence packing (`data.packing="first_fit"`): the packer keeps every example whole and in
order, resumes exactly from its state, and a packed batch gives the model the same
per-example hidden states, loss and gradients as the same examples one per row. Length
buckets (`"bucket"`): each batch at its shortest bucket, nothing lost, exact resume."""

import flax.linen as nn
import grain
import jax
import numpy as np
import pytest

from moe_llava_jax import train_step
from moe_llava_jax.data import images as image_ops
from moe_llava_jax.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from moe_llava_jax.data import bucketing
from moe_llava_jax.data.pipeline import (
    Packing,
    Preprocessing,
    pack_first_fit,
    pad_to,
    padded_example,
)
from moe_llava_jax.models.lvlm import MoELLaVA
from moe_llava_jax.models.moe import MoEConfig
from tests.tiny_models import tiny_lvlm_config

T, PAD_ID = 40, 0
CONFIG = tiny_lvlm_config(MoEConfig(layers="1", router_init_std=1.0, dispatch="dropless"))
IMAGE_TOKENS = CONFIG.vision.num_image_tokens  # 4
PREP = Preprocessing(
    image_size=CONFIG.vision.image_size,
    processor=image_ops.get_image_processor("clip"),
    pad_to_square=False,
    num_image_tokens=IMAGE_TOKENS,
    max_length=T,
)


def examples(count: int, seed: int = 0) -> list[dict]:
    """Unpadded examples as `unpadded_example` makes them: a prompt (with the image's
    placeholders when it has one), then a supervised answer; lengths 7..26."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        has_image = rng.random() < 0.6
        prompt = list(rng.integers(1, 40, rng.integers(2, 6)))
        if has_image:
            prompt = prompt[:1] + [IMAGE_TOKEN_INDEX] * IMAGE_TOKENS + prompt[1:]
        answer = list(rng.integers(1, 40, rng.integers(5, 17)))
        out.append({
            "input_ids": np.array(prompt + answer, np.int32),
            "labels": np.array([IGNORE_INDEX] * len(prompt) + answer, np.int32),
            "images": rng.normal(size=(int(has_image), 16, 16, 3)).astype(np.float32),
        })
    return out


def packed_rows(items: list[dict], packing: Packing) -> grain.IterDataset:
    return pack_first_fit(grain.MapDataset.source(items).to_iter_dataset(), PREP, PAD_ID, packing)


def assert_resumes_exactly(dataset: grain.IterDataset, after: int, then: int) -> None:
    """A fresh iterator given the state after `after` elements yields the next `then`."""
    run = iter(dataset)
    for _ in range(after):
        next(run)
    state = run.get_state()
    expected = [next(run) for _ in range(then)]
    resumed = iter(dataset)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_rows_hold_every_example_whole_in_order_with_its_images():
    items = examples(24)
    rows = list(packed_rows(items, Packing("first_fit", bins=3, image_slots=2)))
    found = []
    for row in rows:
        assert row["input_ids"].shape == (T,) and row["images"].shape == (2, 16, 16, 3)
        slot = 0
        for segment in range(1, row["segments"].max() + 1):
            where = np.flatnonzero(row["segments"] == segment)
            np.testing.assert_array_equal(row["positions"][where], np.arange(len(where)))
            ids = row["input_ids"][where]
            index = next(i for i, x in enumerate(items) if np.array_equal(x["input_ids"], ids))
            labels = items[index]["labels"].copy()
            labels[0] = IGNORE_INDEX  # the previous example's last token must not predict it
            np.testing.assert_array_equal(row["labels"][where], labels)
            for image in items[index]["images"]:  # its image in the next slot
                np.testing.assert_array_equal(row["images"][slot], image)
                slot += 1
            found.append(index)
        pads = row["segments"] == 0
        assert (row["labels"][pads] == IGNORE_INDEX).all()
        assert (row["input_ids"][pads] == PAD_ID).all()
        assert not row["images"][slot:].any()
    assert sorted(found) == list(range(len(items)))  # none lost, none twice
    assert len(rows) < len(items) / 2  # rows really hold several examples


def test_a_resumed_packer_packs_the_same_rows():
    dataset = packed_rows(examples(40, seed=1), Packing("first_fit", bins=4, image_slots=2))
    assert_resumes_exactly(dataset, after=5, then=6)


def test_bad_packing_settings_name_the_key():
    with pytest.raises(ValueError, match="data.packing='best'"):
        Packing("best")
    with pytest.raises(ValueError, match="data.packing_bins=0"):
        Packing("first_fit", bins=0)


def test_a_packed_batch_gives_the_examples_hidden_states_loss_and_gradients():
    """8 examples packed into rows vs one example per row: the hidden state of every real
    token, the answer-token CE and its gradients w.r.t. all params agree (dropless MoE, so no
    token's expert depends on which others share its group; aux and z losses off: they are
    means over a routing group, which packing changes by design)."""
    items = examples(8, seed=2)
    packed = list(packed_rows(items, Packing("first_fit", bins=4, image_slots=2)))
    packed = {k: np.stack([row[k] for row in packed]) for k in packed[0]}
    unpacked = [padded_example(x, T, PAD_ID) for x in items]
    unpacked = {
        k: np.stack([row[k] for row in unpacked]) for k in ("input_ids", "labels", "images")
    }
    assert len(packed["input_ids"]) < len(items)
    model = MoELLaVA(CONFIG)
    variables = model.init(jax.random.key(0), unpacked["input_ids"][:1], unpacked["images"][:1])
    params = nn.unbox(variables["params"])

    @jax.jit
    def hidden(batch):
        return model.apply(
            {"params": params},
            batch["input_ids"],
            batch["images"],
            positions=batch.get("positions"),
            segments=batch.get("segments"),
            head=False,
        )[0]

    packed_hidden, unpacked_hidden = hidden(packed), hidden(unpacked)
    for row, segments in enumerate(packed["segments"]):
        for segment in range(1, segments.max() + 1):
            where = np.flatnonzero(segments == segment)
            ids = packed["input_ids"][row, where]
            index = next(i for i, x in enumerate(items) if np.array_equal(x["input_ids"], ids))
            np.testing.assert_allclose(
                packed_hidden[row, where],
                unpacked_hidden[index, : len(where)],
                rtol=1e-5,
                atol=1e-5,
            )

    @jax.jit
    def loss_and_grads(batch):
        def loss(p):
            return train_step.compute_loss(
                model, p, batch, jax.random.key(1), aux_loss_coef=0.0, deterministic=True
            )

        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, metrics["answer_tokens"], grads

    packed_loss, packed_tokens, packed_grads = loss_and_grads(packed)
    loss, tokens, grads = loss_and_grads(unpacked)
    answers = sum(int((x["labels"][1:] != IGNORE_INDEX).sum()) for x in items)
    assert int(packed_tokens) == int(tokens) == answers
    np.testing.assert_allclose(packed_loss, loss, rtol=1e-5)
    paths_and_grads = jax.tree_util.tree_leaves_with_path(packed_grads)
    for (path, got), want in zip(paths_and_grads, jax.tree.leaves(grads)):
        np.testing.assert_allclose(
            got, want, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )


def test_bucket_batches_pad_to_the_shortest_bucket_and_resume_exactly():
    items = examples(64, seed=3)
    lengths = bucketing.bucket_lengths(T, 4)
    assert lengths == (16, 24, 32, 40)
    dataset = bucketing.BucketBatchIterDataset(
        grain.MapDataset.source(items).repeat(None).to_iter_dataset(),
        lengths=lengths,
        batch_size=4,
        window=4,
        pad=lambda example, length: padded_example(example, length, PAD_ID),
    )
    run = iter(dataset)
    batches = [next(run) for _ in range(16)]  # 4 windows: every example once
    seen = []
    for batch in batches:
        length = batch["input_ids"].shape[1]
        real = (batch["labels"] != IGNORE_INDEX) | (batch["input_ids"] != PAD_ID)
        longest = max(int(np.flatnonzero(row).max()) + 1 for row in real)
        assert length == min(x for x in lengths if x >= longest)
        for ids in batch["input_ids"]:
            seen.append(next(
                i for i, x in enumerate(items)
                if len(x["input_ids"]) <= length
                and np.array_equal(pad_to(x["input_ids"], length, PAD_ID), ids)
            ))
    assert sorted(seen) == list(range(64))
    assert len({b["input_ids"].shape[1] for b in batches}) > 1
    assert_resumes_exactly(dataset, after=6, then=5)  # mid-window


def test_bucket_lengths_are_multiples_of_8_up_to_max_length():
    assert bucketing.bucket_lengths(2624, 4) == (656, 1312, 1968, 2624)
    assert bucketing.bucket_lengths(100, 3) == (40, 72, 100)
    with pytest.raises(ValueError, match="data.buckets=0"):
        bucketing.bucket_lengths(100, 0)
