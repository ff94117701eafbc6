"""Chat rendering and label masking: the exact strings and the exact supervised positions."""

import numpy as np
import pytest

from moe_llava_jax.data.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    get_template,
    render_prompt,
    render_segments,
    tokenize_conversation,
    tokenize_prompt,
)
from moe_llava_jax.data.tokenizer import train_bpe_tokenizer

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat is in the image?"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "Is it on the left?"},
    {"from": "gpt", "value": "Yes"},
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [SYSTEM, "USER: What is in the image? ASSISTANT: A red circle.", "On the left? Yes"]
    return train_bpe_tokenizer(texts * 3, vocab_size=300)


def test_phi_rendering_matches_llava_string():
    segments = render_segments(CONVERSATION, get_template("phi"))
    expected = (
        SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT: A red circle.<|endoftext|>"
        "USER: Is it on the left? ASSISTANT: Yes<|endoftext|>"
    )
    assert "".join(text for text, _ in segments) == expected
    assert segments == [
        (SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT:", False),
        (" A red circle.<|endoftext|>", True),
        ("USER: Is it on the left? ASSISTANT:", False),
        (" Yes<|endoftext|>", True),
    ]


def test_vicuna_uses_its_own_end_token():
    segments = render_segments(CONVERSATION[:2], get_template("vicuna_v1"))
    assert segments[-1] == (" A red circle.</s>", True)


def test_labels_cover_exactly_answers_and_end_token(tokenizer):
    template = get_template("phi")
    ids, labels = tokenize_conversation(CONVERSATION, template, tokenizer, num_image_tokens=5)
    assert ids.dtype == np.int32 and labels.dtype == np.int32 and ids.shape == labels.shape

    answer1 = tokenizer.encode(" A red circle.<|endoftext|>")
    answer2 = tokenizer.encode(" Yes<|endoftext|>")
    prompt1 = tokenize_prompt("<image>\nWhat is in the image?", template, tokenizer, 5)
    prompt2 = tokenizer.encode("USER: Is it on the left? ASSISTANT:")
    expected_ids = [*prompt1, *answer1, *prompt2, *answer2]
    expected_labels = (
        [IGNORE_INDEX] * len(prompt1) + answer1 + [IGNORE_INDEX] * len(prompt2) + answer2
    )
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(labels, expected_labels)
    assert answer1[-1] == answer2[-1] == tokenizer.eos_id

    image_positions = np.flatnonzero(ids == IMAGE_TOKEN_INDEX)
    system_user = tokenizer.encode(SYSTEM + " USER: ")
    np.testing.assert_array_equal(image_positions, len(system_user) + np.arange(5))


def test_prompt_is_training_prefix_up_to_first_answer(tokenizer):
    template = get_template("phi")
    question = "<image>\nWhat is in the image?"
    prompt = tokenize_prompt(question, template, tokenizer, num_image_tokens=3)
    ids, labels = tokenize_conversation(CONVERSATION, template, tokenizer, num_image_tokens=3)
    first_answer = int(np.flatnonzero(labels != IGNORE_INDEX)[0])
    np.testing.assert_array_equal(prompt, ids[:first_answer])
    assert render_prompt(question, template).endswith("ASSISTANT:")


def test_plain_template_supervises_caption_only(tokenizer):
    template = get_template("plain")
    caption = {"from": "gpt", "value": "A red circle."}
    conversation = [{"from": "human", "value": "<image>"}, caption]
    segments = render_segments(conversation, template)
    assert segments == [("<image>", False), ("A red circle.\n", True)]
    # Like the original, the stage-1 prompt is the image alone; instruction text is dropped.
    described = [{"from": "human", "value": "Describe it.\n<image>"}, caption]
    assert render_segments(described, template) == segments
    with pytest.raises(ValueError, match="plain.*<image>"):
        render_segments([{"from": "human", "value": "Describe it."}, caption], template)
    ids, labels = tokenize_conversation(conversation, template, tokenizer, num_image_tokens=4)
    caption = tokenizer.encode("A red circle.\n")
    np.testing.assert_array_equal(ids, [IMAGE_TOKEN_INDEX] * 4 + caption)
    np.testing.assert_array_equal(labels, [IGNORE_INDEX] * 4 + caption)
    assert render_prompt("<image>", template) == "<image>"


def test_bad_role_order_names_the_turn():
    bad = [CONVERSATION[0], {"from": "human", "value": "again?"}]
    with pytest.raises(ValueError, match=r"turn 1: field 'from'"):
        render_segments(bad, get_template("phi"))


@pytest.mark.parametrize(
    "conversation, message",
    [
        ([], "empty"),
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}], "turn 1: field 'value'"),
        ([{"from": "human", "value": "hi"}], r"turn 0: .*without a gpt answer"),
    ],
)
def test_malformed_conversations_raise(conversation, message):
    with pytest.raises(ValueError, match=message):
        render_segments(conversation, get_template("phi"))


def test_unknown_template_lists_known_ones():
    with pytest.raises(ValueError, match=r"'llama9'.*phi.*vicuna_v1"):
        get_template("llama9")


def test_image_slots_are_never_supervised(tokenizer):
    conversation = [{"from": "human", "value": "Draw it."}, {"from": "gpt", "value": "<image>"}]
    ids, labels = tokenize_conversation(conversation, get_template("phi"), tokenizer, 2)
    assert (ids == IMAGE_TOKEN_INDEX).sum() == 2
    assert IMAGE_TOKEN_INDEX not in labels and labels[-1] == tokenizer.eos_id
