"""Questions about images -> answer texts: the one path `predict`, POPE and the benchmark
answer files all go through, so they prompt, batch, decode and stop identically.

A question becomes the template's single-turn prompt (`<image>\\n` + question when there is an
image), encoded exactly as in training; batches have a fixed size (the last one is padded
with copies of its last question) so decoding compiles once; each answer stops at EOS or at
the template's stop strings and is cut before the first stop string it contains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from moe_llava_jax.data.conversation import IMAGE_PLACEHOLDER, ChatTemplate, tokenize_prompt
from moe_llava_jax.data.pipeline import Preprocessing, load_model_image
from moe_llava_jax.data.tokenizer import Tokenizer
from moe_llava_jax.generate import GREEDY, GenerateFn, Sampling, StopFn


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the earliest stop string (all of it when none occurs)."""
    ends = [text.find(s) for s in stop_strings if s and s in text]
    return text[: min(ends)] if ends else text


def stop_at_strings(tokenizer: Tokenizer, stop_strings: Sequence[str]) -> StopFn | None:
    """A decoding stop predicate: the ids so far decode to text containing a stop string.

    Checked on text, not on token ids, because a BPE tokenizer spells a string differently
    depending on its neighbours. Only the last few tokens are decoded: the stop string was
    absent one token earlier, so it must end inside the newest token and start within
    `len(stop string)` characters (>= that many tokens) before it."""
    strings = [s for s in stop_strings if s]
    if not strings:
        return None
    window = max(len(s) for s in strings) + 1

    def stop(ids: Sequence[int]) -> bool:
        text = tokenizer.decode(ids[-window:])
        return any(s in text for s in strings)

    return stop


@dataclasses.dataclass(frozen=True)
class Answerer:
    """Answers questions in fixed-size batches with a `GenerateFn` bound to params."""

    generate: GenerateFn
    tokenizer: Tokenizer
    template: ChatTemplate
    prep: Preprocessing
    batch_size: int
    max_new_tokens: int
    sampling: Sampling = GREEDY

    def _prompt(self, question: str, image: str | None) -> np.ndarray:
        text = f"{IMAGE_PLACEHOLDER}\n{question}" if image else question
        return tokenize_prompt(text, self.template, self.tokenizer, self.prep.num_image_tokens)

    def _answer_batch(self, questions: Sequence[str], images: Sequence[str | None]) -> list[str]:
        real = len(questions)
        padding = self.batch_size - real
        questions = list(questions) + [questions[-1]] * padding
        images = list(images) + [images[-1]] * padding
        outputs = self.generate(
            [self._prompt(q, image) for q, image in zip(questions, images)],
            np.stack([load_model_image(image, self.prep) for image in images]),
            max_new_tokens=self.max_new_tokens,
            eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id,
            stop=stop_at_strings(self.tokenizer, self.template.stop_strings),
            sampling=self.sampling,
        )
        return [
            cut_at_stop_strings(self.tokenizer.decode(ids), self.template.stop_strings).strip()
            for ids in outputs[:real]
        ]

    def __call__(
        self, questions: Sequence[str], images: Sequence[str | None], progress: bool = False
    ) -> list[str]:
        """One answer per (question, image path or None), in order."""
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions but {len(images)} images")
        starts = range(0, len(questions), self.batch_size)
        if progress:
            starts = tqdm(starts, desc="answering", unit="batch")
        answers = []
        for start in starts:
            end = start + self.batch_size
            answers += self._answer_batch(questions[start:end], images[start:end])
        return answers
