"""VQA answer normalisation and VQA accuracy, as the official VQA evaluation applies them.

VQA-style benchmarks (VQAv2, TextVQA) compare a free-form answer with ten human answers, so
both sides are first normalised: "Two dogs." and "2 dogs" must count as the same answer. The
steps are those of the official VQA evaluation (`processPunctuation`, `processDigitArticle`),
preceded by the light tokenisation of the EvalAI answer processor, which is what LLaVA and
MoE-LLaVA apply before a VQAv2 submission and when scoring TextVQA. The rules are reproduced
with their quirks (noted where they occur) because a "cleaner" normaliser would give numbers
that do not compare with published ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# The official contraction table: an answer word written without its apostrophe gets it back.
# Four official keys are left out because they can never match (the text is lower-cased
# first): "Id've", "I'dve", "Im", "Ive"; so are the identities "let's" and "she's".
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",  # sic: the official table maps this one backwards
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES = frozenset({"a", "an", "the"})

# The official marks, one character each. Not among them: apostrophes (they belong to
# contractions), periods (their own rule below) and colons (kept, as officially).
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'

_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# Meant as "a period not between digits", but the official look-behind is mistyped into a
# look-ahead that always holds, so in effect: a period not followed by a digit ("2.5" stays,
# "dogs." and "5." lose it).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official call passes re.UNICODE (32) where `count` goes: at most 32 periods are removed.
_MAX_PERIODS_REMOVED = 32

# Human answers that count fully: min(#matching / 3, 1).
_FULL_CREDIT_MATCHES = 3


def process_punctuation(text: str) -> str:
    """The official VQA punctuation step.

    A punctuation mark touching a space ("dog !") is deleted, one inside a word ("t-shirt")
    becomes a space; if the text has a comma between digits anywhere ("1,000"), every mark is
    deleted instead, so that numbers keep their digits together. Both tests look at the input
    text, not at the partly processed one. Periods not followed by a digit are then removed.
    """
    digits_with_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or digits_with_comma else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """The official VQA word step: lower-case, number words up to ten become digits
    ("two" -> "2", "none" -> "0"), the articles a/an/the are dropped, and apostrophe-less
    contractions get their apostrophe back ("dont" -> "don't"); words are re-joined by
    single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def _tokenize(text: str) -> str:
    """The EvalAI processor's first step: lower-case, delete commas and question marks, split
    the possessive "'s" off its word ("man's" -> "man 's"), and turn tabs and newlines into
    spaces. Deleting commas here means the comma-between-digits rule of
    `process_punctuation` never fires after it: "1,000" is already "1000"."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Normalises a free-form answer as the EvalAI answer processor used by LLaVA does.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    """
    return process_digit_article(process_punctuation(_tokenize(text)))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (ten in VQAv2 and TextVQA).

    An answer is fully right when at least 3 humans gave it: min(#matching / 3, 1). To make
    that robust to which humans were asked, the official metric averages it over the n
    leave-one-out subsets of n-1 humans. With 10 humans, 1, 2 and 3 matches give 0.3, 0.6
    and 0.9 rather than 1/3, 2/3 and 1. Prediction and human answers are both normalised
    with `normalize_answer`, as in LLaVA's TextVQA evaluator.
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(answer) == predicted for answer in human_answers]
    total = sum(matches)
    per_subset = [min((total - left_out) / _FULL_CREDIT_MATCHES, 1.0) for left_out in matches]
    return sum(per_subset) / len(per_subset)
