"""The tokenizer wrapper: special tokens, round trips and error messages that name the file."""

import pytest

from moe_llava_jax.data.conversation import IMAGE_TOKEN_INDEX
from moe_llava_jax.data.tokenizer import Tokenizer, train_bpe_tokenizer

TEXTS = ["Is there a red circle in the image?", "There are two objects.", "On the left."]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe_tokenizer(TEXTS * 4, vocab_size=300)


def test_special_tokens_map_to_single_ids(tokenizer):
    assert tokenizer.encode("<|endoftext|>") == [tokenizer.eos_id]
    assert tokenizer.encode("<pad>") == [tokenizer.pad_id]
    assert tokenizer.eos_id != tokenizer.pad_id
    ids = tokenizer.encode("Yes<|endoftext|>")
    assert ids[-1] == tokenizer.eos_id and tokenizer.eos_id not in ids[:-1]


def test_encode_adds_nothing_and_decode_round_trips(tokenizer):
    text = "Is there a blue cross?\nThere are 3 objects, héllo."
    ids = tokenizer.encode(text)
    assert tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([IMAGE_TOKEN_INDEX, *ids, tokenizer.eos_id]) == text
    assert tokenizer.decode([*ids, tokenizer.eos_id], skip_special_tokens=False).endswith(
        "<|endoftext|>"
    )


def test_training_is_deterministic_and_save_load_round_trips(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    again = train_bpe_tokenizer(TEXTS * 4, vocab_size=300)
    again.save(tmp_path / "again.json")
    assert path.read_bytes() == (tmp_path / "again.json").read_bytes()
    loaded = Tokenizer.from_file(path)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_file(missing)


def test_non_tokenizer_file_names_the_path(tmp_path):
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="bogus.json"):
        Tokenizer.from_file(bogus)


def test_unknown_eos_token_is_rejected(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    with pytest.raises(ValueError, match=r"tokenizer\.json.*'</s>'"):
        Tokenizer.from_file(path, eos_token="</s>")
