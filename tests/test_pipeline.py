"""Records -> fixed-shape examples: placeholders, truncation, errors naming the record."""

import numpy as np
import pytest

from moe_llava_jax.data.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    get_template,
    tokenize_conversation,
)
from moe_llava_jax.data.images import IMAGE_PROCESSORS
from moe_llava_jax.data.pipeline import Preprocessing, make_example
from moe_llava_jax.data.tokenizer import train_bpe_tokenizer

RECORD = {
    "id": "r1",
    "image": None,
    "conversations": [
        {"from": "human", "value": "<image>\nIs there a red circle in the image?"},
        {"from": "gpt", "value": "Yes"},
    ],
}


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [
        get_template("phi").system,
        "USER: Is there a red circle in the image? ASSISTANT: Yes",
    ]
    return train_bpe_tokenizer(corpus * 5, 300)


def prep(max_length):
    return Preprocessing(
        image_size=16,
        processor=IMAGE_PROCESSORS["siglip"],
        pad_to_square=True,
        num_image_tokens=4,
        max_length=max_length,
    )


def test_example_has_placeholders_answer_labels_and_padding(tokenizer):
    ex = make_example(RECORD, tokenizer, get_template("phi"), prep(128))
    assert ex["input_ids"].shape == ex["labels"].shape == (128,)
    assert (ex["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 4
    supervised = ex["labels"] != IGNORE_INDEX
    assert (
        tokenizer.decode(ex["labels"][supervised].tolist(), skip_special_tokens=False)
        == " Yes<|endoftext|>"
    )
    assert ex["images"].shape == (16, 16, 3) and not ex["images"].any()  # text-only zeros


def test_truncation_that_drops_every_answer_names_the_record(tokenizer):
    _, labels = tokenize_conversation(RECORD["conversations"], get_template("phi"), tokenizer, 4)
    first_answer = int(np.flatnonzero(labels != IGNORE_INDEX)[0])
    make_example(RECORD, tokenizer, get_template("phi"), prep(first_answer + 1))  # one kept: fine
    with pytest.raises(ValueError, match="'r1'.*no answer token"):
        make_example(RECORD, tokenizer, get_template("phi"), prep(first_answer))


def test_truncation_that_cuts_the_image_names_the_record(tokenizer):
    record = dict(
        RECORD,
        conversations=[
            {"from": "human", "value": "Is there a red circle in the image? " * 3 + "<image>"},
            {"from": "gpt", "value": "Yes"},
        ],
    )
    ids, _ = tokenize_conversation(record["conversations"], get_template("phi"), tokenizer, 4)
    last_image = int(np.flatnonzero(ids == IMAGE_TOKEN_INDEX)[-1])
    with pytest.raises(ValueError, match="'r1'.*image placeholders"):
        make_example(record, tokenizer, get_template("phi"), prep(last_image))
