"""TFDS datasets in ArrayRecord format as grain random-access sources of LLaVA records.

`LlavaJsonSource` keeps one small file per image, which is slow on network storage at scale
(a stat and an open per sample). A TFDS ArrayRecord dataset keeps the encoded images inside
a few large shards that `tfds.data_source` reads by index, without TensorFlow; the records
it yields here are the same dicts as `LlavaJsonSource`'s, with `image` the decoded pixels
instead of a path, so `make_example` and the whole pipeline work on either.

Two layouts are understood: a `conversations` feature holding LLaVA conversations as JSON
text (what `convert_to_tfds` writes), or an answer feature plus a question feature or fixed
prompt, which turns e.g. an image-caption dataset into single-turn conversations.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from moe_llava_jax.data.conversation import IMAGE_PLACEHOLDER
from moe_llava_jax.data.sources import _check_record

SPEC_PREFIX = "tfds:"
_SPEC_OPTIONS = (
    "image_key",
    "has_image_key",
    "conversations_key",
    "answer_key",
    "question_key",
    "prompt",
    "id_key",
)


def _has_feature(features: tfds.features.FeatureConnector, key: str) -> bool:
    """Whether `key` ("a/b" for nested features, through Sequence levels) exists."""
    for part in key.split("/"):
        while isinstance(features, tfds.features.Sequence):
            features = features.feature
        if not isinstance(features, tfds.features.FeaturesDict) or part not in features:
            return False
        features = features[part]
    return True


def _lookup(example: dict, key: str) -> Any:
    """The decoded value of the feature `key` ("a/b" for nested features)."""
    for part in key.split("/"):
        example = example[part]
    return example


def _as_text(value: Any) -> str:
    """Decoded Text features are bytes. A sequence (e.g. several captions of one image) gives
    its first element: deterministic, so a record reads the same in every epoch."""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) == 0:
            raise ValueError("is an empty sequence, expected text")
        value = value[0]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise ValueError(f"is a {type(value).__name__}, expected text")


def _as_json(value: Any) -> Any:
    """A Text feature holding JSON (the converter's `conversations`)."""
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"is not valid JSON ({error.msg} at column {error.colno})") from None


def _as_id(value: Any) -> str:
    """Ids are Text (bytes once decoded) or integers, depending on the dataset."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _as_rgb(image: Any) -> np.ndarray:
    """uint8 [H, W, 3]; grey images ([H, W] or [H, W, 1]) are repeated to three channels."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"is {image.dtype}, expected uint8 pixels")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"has shape {image.shape}, expected [H, W, 3] or [H, W, 1]")
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


class TfdsSource:
    """A grain `RandomAccessDataSource` over a prepared TFDS dataset (ArrayRecord files).

    Items are `{"id", "image": uint8 [H, W, 3] or None, "conversations", "index"}`, checked
    with the same rules as `LlavaJsonSource` records but per item, since reading a large
    dataset through at start-up is what this format exists to avoid.

    Args:
      name: TFDS name, optionally with config and version ("coco_captions/2017:1.1.0").
      split: a split name or slice ("train", "train[:90%]").
      data_dir: where the prepared dataset lives (None: TFDS's default). Nothing is ever
        downloaded: an unprepared dataset is an error.
      image_key: the Image feature; None for text-only data.
      has_image_key: a bool feature marking records whose image is a placeholder (text-only
        records in a converted dataset); used only when the dataset has it.
      conversations_key: Text feature with LLaVA conversations as JSON (when no answer_key).
      answer_key: Text feature (or sequence of Text: the first is used) answered by the
        model; turns each record into one human/gpt exchange.
      question_key / prompt: the human turn of that exchange, per record or fixed; exactly
        one with answer_key. An `<image>` line is put in front when the record has an image.
      id_key: Text or integer feature with the record id; "NAME/SPLIT/INDEX" when absent.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | os.PathLike | None = None,
        *,
        image_key: str | None = "image",
        has_image_key: str | None = "has_image",
        conversations_key: str | None = "conversations",
        answer_key: str | None = None,
        question_key: str | None = None,
        prompt: str | None = None,
        id_key: str | None = "id",
    ) -> None:
        self._name, self._split = name, split
        self._data_dir = None if data_dir is None else os.path.abspath(data_dir)
        self._source = tfds.data_source(name, split=split, data_dir=self._data_dir, download=False)
        features = self._source.dataset_info.features
        where = f"TFDS dataset {name!r} split {split!r}"
        if answer_key is None:
            if question_key is not None or prompt is not None:
                raise ValueError(f"{where}: question_key / prompt need answer_key")
            required = {"conversations_key": conversations_key}
        else:
            if (question_key is None) == (prompt is None):
                raise ValueError(f"{where}: answer_key needs exactly one of question_key, prompt")
            required = {"answer_key": answer_key}
            if prompt is None:
                required["question_key"] = question_key
        if image_key is not None:
            required["image_key"] = image_key
        for arg, key in required.items():
            if key is None or not _has_feature(features, key):
                raise ValueError(
                    f"{where}: {arg}={key!r} is not a feature; features: {sorted(features)}"
                )
        self._image_key = image_key
        self._has_image_key = (
            has_image_key if has_image_key and _has_feature(features, has_image_key) else None
        )
        self._conversations_key = conversations_key
        self._answer_key, self._question_key, self._prompt = answer_key, question_key, prompt
        self._id_key = id_key if id_key and _has_feature(features, id_key) else None
        # LlavaJsonSource's load-time skip list, which training writes to skipped.jsonl. Empty:
        # records are checked when read, and convert_to_tfds already left out (and listed)
        # the bad ones of a converted dataset.
        self.skipped: list[dict] = []

    def __len__(self) -> int:
        return len(self._source)

    def _field(self, example: dict, key: str, convert, where: str) -> Any:
        """`convert(value of feature key)`, failing with the record and field named."""
        try:
            value = _lookup(example, key)
        except KeyError:
            raise ValueError(f"{where}: field {key!r} is missing") from None
        try:
            return convert(value)
        except ValueError as error:  # includes UnicodeDecodeError
            raise ValueError(f"{where}: field {key!r} {error}") from error

    def _conversations(self, example: dict, has_image: bool, where: str) -> Any:
        if self._answer_key is None:
            return self._field(example, self._conversations_key, _as_json, where)
        answer = self._field(example, self._answer_key, _as_text, where)
        if self._prompt is None:
            question = self._field(example, self._question_key, _as_text, where)
        else:
            question = self._prompt
        if has_image:
            question = f"{IMAGE_PLACEHOLDER}\n{question}"
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    def __getitem__(self, index: int) -> dict:
        """Record `index` as a LLaVA dict with decoded pixels; errors name the dataset, split,
        record index and field."""
        index = range(len(self))[index]  # IndexError out of range; -1 -> last
        where = f"TFDS dataset {self._name!r} split {self._split!r} record {index}"
        try:
            example = self._source[index]
        except Exception as error:  # ArrayRecord / proto parsing errors have many types
            raise ValueError(f"{where}: cannot read the record: {error}") from error
        has_image = self._image_key is not None and (
            self._has_image_key is None or bool(_lookup(example, self._has_image_key))
        )
        conversations = self._conversations(example, has_image, where)
        if self._id_key is None:
            record_id = f"{self._name}/{self._split}/{index}"
        else:
            record_id = self._field(example, self._id_key, _as_id, where)
        # _check_record wants a path string for `image`; only set-or-not matters to it.
        problem = _check_record(
            {"conversations": conversations, "image": "<pixels>" if has_image else None}
        )
        if problem:
            raise ValueError(f"{where} (id {record_id!r}): {problem[1]}")
        return {
            "id": record_id,
            "image": self._field(example, self._image_key, _as_rgb, where) if has_image else None,
            "conversations": conversations,
            "index": index,
        }

    def __repr__(self) -> str:
        # Stable across processes: grain uses it to check checkpoints against the source.
        if self._answer_key is None:
            mapping = f"conversations_key={self._conversations_key!r}"
        else:
            asked = (
                f"prompt={self._prompt!r}"
                if self._prompt is not None
                else f"question_key={self._question_key!r}"
            )
            mapping = f"answer_key={self._answer_key!r}, {asked}"
        return (
            f"TfdsSource(name={self._name!r}, split={self._split!r}, "
            f"data_dir={self._data_dir!r}, image_key={self._image_key!r}, {mapping}, "
            f"size={len(self)})"
        )


def tfds_source_from_spec(spec: str) -> TfdsSource:
    """`tfds:NAME/SPLIT[@DATA_DIR][?option=value&...]` -> TfdsSource.

    NAME may carry a config and version ("coco_captions/2017:1.1.0"); SPLIT is what follows
    the last "/" and may be a slice ("train[:1%]"). Options are TfdsSource's keyword
    arguments, URL-encoded ("prompt=Describe+the+image."); an empty value means None
    ("image_key=" for text-only data). Examples:
      tfds:llava_custom/train@/data/tfds
      tfds:coco_captions/2017/train@/data/tfds?answer_key=captions/text&prompt=Describe+it.
    """
    if not spec.startswith(SPEC_PREFIX):
        raise ValueError(f"data spec {spec!r} does not start with {SPEC_PREFIX!r}")
    location, _, query = spec[len(SPEC_PREFIX) :].partition("?")
    dataset, _, data_dir = location.partition("@")
    name, _, split = dataset.rpartition("/")
    if not name or not split:
        raise ValueError(f"data spec {spec!r}: expected {SPEC_PREFIX}NAME/SPLIT[@DATA_DIR]")
    try:
        options = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as error:
        raise ValueError(f"data spec {spec!r}: malformed options: {error}") from None
    unknown = sorted({key for key, _ in options} - set(_SPEC_OPTIONS))
    if unknown:
        raise ValueError(f"data spec {spec!r}: unknown options {unknown}; known: {_SPEC_OPTIONS}")
    kwargs = {key: value or None for key, value in options}
    return TfdsSource(name, split, data_dir or None, **kwargs)
