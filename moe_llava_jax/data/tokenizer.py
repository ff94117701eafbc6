"""A thin wrapper over HuggingFace `tokenizers` with the few operations the pipeline needs.

The wrapper pins down the behaviour the chat templates rely on: `encode` never adds BOS/EOS
on its own (the template decides where separators go), while special-token strings written in
the text (e.g. `<|endoftext|>` as sep2) still map to their single id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

DEFAULT_EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"


class Tokenizer:
    """Encode/decode text with a `tokenizers.Tokenizer`, exposing eos and pad ids."""

    def __init__(self, inner: tokenizers.Tokenizer, eos_token: str = DEFAULT_EOS_TOKEN):
        eos_id = inner.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"eos token {eos_token!r} is not in the tokenizer vocabulary")
        self._inner = inner
        self._eos_token = eos_token
        self._eos_id = eos_id

    @classmethod
    def from_file(cls, path: str | Path, eos_token: str = DEFAULT_EOS_TOKEN) -> Tokenizer:
        """Load a `tokenizer.json`, naming the path in every failure so configs are easy to fix."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            inner = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path} is not a valid tokenizer.json: {error}") from error
        try:
            return cls(inner, eos_token)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens added."""
        return self._inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; negative ids (image placeholders, ignore labels) are dropped."""
        kept = [int(i) for i in ids if int(i) >= 0]
        return self._inner.decode(kept, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Size including added special tokens: the embedding table must cover all of them."""
        return self._inner.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """`<pad>` when the vocabulary has it; otherwise eos, as is usual for GPT-style models."""
        pad_id = self._inner.token_to_id(PAD_TOKEN)
        return self._eos_id if pad_id is None else pad_id

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as `tokenizer.json` (pretty JSON keeps diffs of it readable)."""
        Path(path).write_text(self._inner.to_str(pretty=True), encoding="utf-8")


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = (DEFAULT_EOS_TOKEN, PAD_TOKEN),
) -> Tokenizer:
    """Train a byte-level BPE tokenizer from an iterator of texts.

    Byte-level means every string is encodable (no unknown token), and without a prefix space
    a chunk starting with " answer" and one starting with "USER" tokenize as written, which the
    chunk-wise encoding in `conversation.py` relies on.  Training is deterministic for the
    same input, so the embedded dataset is reproducible.  The first special token is the eos.
    """
    if not special_tokens:
        raise ValueError("special_tokens must contain at least the eos token")
    inner = tokenizers.Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    inner.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(inner, eos_token=special_tokens[0])
