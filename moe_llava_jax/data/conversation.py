"""Chat templates, prompt rendering and label masking for LLaVA-format conversations.

The original LLaVA code renders a whole conversation to one string, tokenizes it, and then
re-tokenizes pieces of it to find where the answers start.  When the template and the
tokenizer disagree (e.g. a separator that merges with its neighbours) the offsets drift and
the whole sample is silently masked.  Here the conversation is rendered as a list of chunks,
each tagged supervised or not, and every chunk is encoded on its own: the label mask is exact
by construction, and the inference prompt goes through the very same encoding path.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
IMAGE_PLACEHOLDER = "<image>"
# LLaVA-1.5's instruction for short-answer benchmarks (POPE, MME, GQA, ...), appended to
# the question: its question files carry it, and the papers' numbers were measured with it.
SHORT_ANSWER_INSTRUCTION = "\nAnswer the question using a single word or phrase."

_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_HUMAN = "human"
_GPT = "gpt"


class TextEncoder(Protocol):
    """Anything that turns text into token ids without adding special tokens."""

    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChatTemplate:
    """How a conversation becomes text.

    `sep` follows every user turn and `sep2` ends every answer (it is the token the model must
    learn to emit to stop).  `plain` is the stage-1 captioning format: no system prompt and no
    roles, just the image followed by its caption.
    """

    name: str
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str
    plain: bool = False

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Where a generated answer ends: `sep2` (the original's only stop string; usually the
        EOS token, which decoding also stops on by id) and, for chat templates, the next
        user turn's role marker, which an under-trained model may run on into."""
        return (self.sep2,) if self.plain else (self.sep2, f"{self.roles[0]}:")


TEMPLATES: dict[str, ChatTemplate] = {
    "plain": ChatTemplate(name="plain", system="", sep="", sep2="\n", plain=True),
    "phi": ChatTemplate(name="phi", system=_SYSTEM_PROMPT, sep2="<|endoftext|>"),
    "stablelm": ChatTemplate(name="stablelm", system=_SYSTEM_PROMPT, sep2="<|endoftext|>"),
    "qwen": ChatTemplate(name="qwen", system=_SYSTEM_PROMPT, sep2="<|endoftext|>"),
    "vicuna_v1": ChatTemplate(name="vicuna_v1", system=_SYSTEM_PROMPT, sep2="</s>"),
}


def get_template(name: str) -> ChatTemplate:
    """Look a template up by name, failing loudly so a typo in a config is caught at start-up."""
    try:
        return TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted(TEMPLATES))
        raise ValueError(f"unknown chat template {name!r}; known templates: {known}") from None


def _validate_conversation(conversations: list[dict]) -> None:
    """Reject malformed conversations instead of training on a silently mangled sample."""
    if not conversations:
        raise ValueError("conversation is empty; expected alternating human/gpt turns")
    for index, turn in enumerate(conversations):
        expected = _HUMAN if index % 2 == 0 else _GPT
        if not isinstance(turn, dict):
            raise ValueError(f"turn {index}: expected a dict with 'from' and 'value', got {turn!r}")
        if turn.get("from") != expected:
            raise ValueError(
                f"turn {index}: field 'from' is {turn.get('from')!r} but roles must alternate "
                f"human/gpt starting with human, so {expected!r} was expected"
            )
        value = turn.get("value")
        if not isinstance(value, str) or not value:
            raise ValueError(
                f"turn {index}: field 'value' must be a non-empty string, got {value!r}"
            )
    if len(conversations) % 2:
        last = len(conversations) - 1
        raise ValueError(f"turn {last}: conversation ends with a human turn without a gpt answer")


def _plain_prompt(question: str) -> str:
    """The stage-1 prompt is the image alone: the original drops any instruction text."""
    if IMAGE_PLACEHOLDER not in question:
        raise ValueError(
            f"template 'plain' needs the human turn to contain {IMAGE_PLACEHOLDER!r}, "
            f"got {question!r}"
        )
    return IMAGE_PLACEHOLDER


def _user_turn(question: str, template: ChatTemplate) -> str:
    """`USER: Q ASSISTANT:` — the answer's leading space belongs to the supervised chunk."""
    user, assistant = template.roles
    return f"{user}: {question}{template.sep}{assistant}:"


def render_segments(conversations: list[dict], template: ChatTemplate) -> list[tuple[str, bool]]:
    """Render a conversation as ordered `(text, supervised)` chunks.

    Concatenating the texts gives exactly the original LLaVA rendering
    `SYSTEM USER: Q1 ASSISTANT: A1<sep2>USER: Q2 ASSISTANT: A2<sep2>`; the supervised chunks
    are `" " + answer + sep2`, so the model learns the answer and the stop token only.
    """
    _validate_conversation(conversations)
    if template.plain:
        if len(conversations) != 2:
            raise ValueError(
                f"template 'plain' takes exactly one human/gpt pair, got {len(conversations)} turns"
            )
        return [
            (_plain_prompt(conversations[0]["value"]), False),
            (conversations[1]["value"] + template.sep2, True),
        ]
    segments: list[tuple[str, bool]] = []
    for index in range(0, len(conversations), 2):
        prefix = template.system + template.sep if index == 0 else ""
        segments.append((prefix + _user_turn(conversations[index]["value"], template), False))
        segments.append((" " + conversations[index + 1]["value"] + template.sep2, True))
    return segments


def render_prompt(question: str, template: ChatTemplate) -> str:
    """The single-turn inference prompt; identical to the first training chunk by construction."""
    if not question:
        raise ValueError("question must be a non-empty string")
    if template.plain:
        return _plain_prompt(question)
    return template.system + template.sep + _user_turn(question, template)


def _encode_with_images(text: str, tokenizer: TextEncoder, num_image_tokens: int) -> list[int]:
    """Encode text, turning each `<image>` into `num_image_tokens` IMAGE_TOKEN_INDEX slots.

    The pieces around the placeholder are encoded separately so the placeholder string never
    reaches the tokenizer (which would split it into ordinary sub-words).
    """
    pieces = text.split(IMAGE_PLACEHOLDER)
    ids: list[int] = []
    for index, piece in enumerate(pieces):
        if index > 0:
            ids.extend([IMAGE_TOKEN_INDEX] * num_image_tokens)
        if piece:
            ids.extend(tokenizer.encode(piece))
    return ids


def _check_num_image_tokens(num_image_tokens: int) -> None:
    """Zero slots would silently drop the image from the sequence; refuse it."""
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")


def _tokenize_segments(
    segments: Sequence[tuple[str, bool]], tokenizer: TextEncoder, num_image_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Encode chunk by chunk; labels copy the ids of supervised chunks (never image slots)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, supervised in segments:
        ids = _encode_with_images(text, tokenizer, num_image_tokens)
        input_ids.extend(ids)
        if supervised:
            labels.extend(i if i >= 0 else IGNORE_INDEX for i in ids)
        else:
            labels.extend([IGNORE_INDEX] * len(ids))
    return np.asarray(input_ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)


def tokenize_conversation(
    conversations: list[dict],
    template: ChatTemplate,
    tokenizer: TextEncoder,
    num_image_tokens: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and labels for one training sample.

    Returns `(input_ids [T] int32, labels [T] int32)`; labels are IGNORE_INDEX everywhere except
    on the answers and their end-of-answer separator.
    """
    _check_num_image_tokens(num_image_tokens)
    return _tokenize_segments(render_segments(conversations, template), tokenizer, num_image_tokens)


def tokenize_prompt(
    question: str, template: ChatTemplate, tokenizer: TextEncoder, num_image_tokens: int
) -> np.ndarray:
    """Inference prompt ids `[T] int32`, encoded exactly like the prompt chunk in training."""
    _check_num_image_tokens(num_image_tokens)
    ids = _encode_with_images(render_prompt(question, template), tokenizer, num_image_tokens)
    return np.asarray(ids, dtype=np.int32)
