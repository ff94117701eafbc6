"""Template stop strings: the decoding predicate fires at the first token that completes one,
and the answer text is cut before it."""

import pytest

from moe_llava_jax.answering import cut_at_stop_strings, stop_at_strings
from moe_llava_jax.data.conversation import get_template
from moe_llava_jax.data.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["USER: What color is the square? ASSISTANT: It is blue.", "A red circle.\n"] * 20
    return train_bpe_tokenizer(texts, vocab_size=300)


def test_template_stop_strings():
    assert get_template("phi").stop_strings == ("<|endoftext|>", "USER:")
    assert get_template("vicuna_v1").stop_strings == ("</s>", "USER:")
    assert get_template("plain").stop_strings == ("\n",)


def test_cut_at_the_earliest_stop_string():
    assert cut_at_stop_strings("It is blue. USER: and\nmore", ("\n", "USER:")) == "It is blue. "
    assert cut_at_stop_strings("It is blue.", ("USER:",)) == "It is blue."
    assert cut_at_stop_strings("abc", ("", "x")) == "abc"


def test_stop_predicate_fires_exactly_when_the_text_first_contains_a_stop_string(tokenizer):
    text = "It is blue. USER: What color"
    ids = tokenizer.encode(text)
    stop = stop_at_strings(tokenizer, ("USER:",))
    fired = [n for n in range(1, len(ids) + 1) if stop(ids[:n])]
    first = min(n for n in range(1, len(ids) + 1) if "USER:" in tokenizer.decode(ids[:n]))
    assert fired[0] == first
    assert "USER:" not in tokenizer.decode(ids[: first - 1])
    assert stop_at_strings(tokenizer, ("",)) is None
