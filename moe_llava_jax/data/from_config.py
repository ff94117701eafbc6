"""Config -> data: the data root, the tokenizer, the embedded dataset and each stage's
record sources. Shared by the trainer, prediction and the routing and inspection tools.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
from jax.experimental import multihost_utils

from moe_llava_jax.data.sources import ConcatSource, LlavaJsonSource, RecordSource
from moe_llava_jax.data.synthetic import SyntheticDataset, write_synthetic_dataset
from moe_llava_jax.data.tfds_source import tfds_source_from_spec
from moe_llava_jax.data.tokenizer import Tokenizer


def data_root(config: ml_collections.ConfigDict) -> Path:
    return Path(config.data.root or Path(config.workdir) / "data")


def load_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """`data.tokenizer`, default: the one trained on the embedded data."""
    path = config.data.tokenizer or SyntheticDataset.from_root(data_root(config)).tokenizer_json
    return Tokenizer.from_file(path, eos_token=config.data.eos_token)


def prepare_data(config: ml_collections.ConfigDict) -> tuple[SyntheticDataset, Tokenizer]:
    """Writes (or reuses) the embedded dataset under `data.root` (default: workdir/data).
    Process 0 writes it; the others wait, then read it (a shared workdir is one folder)."""
    if jax.process_index() == 0:
        write_synthetic_dataset(data_root(config), **config.data.synthetic.to_dict())
    multihost_utils.sync_global_devices("embedded dataset written")
    data = write_synthetic_dataset(data_root(config), **config.data.synthetic.to_dict())
    return data, load_tokenizer(config)


def stage_source(
    config: ml_collections.ConfigDict, name: str, data: SyntheticDataset
) -> RecordSource:
    """`stageN.data`: one source or several joined by commas (read as one, concatenated):
    'captions' / 'instruct' (embedded data), a TFDS dataset (`tfds:NAME/SPLIT@DATA_DIR`, e.g.
    written by `data.convert_to_tfds`), or a LLaVA JSON/JSONL path whose image paths are
    relative to `data.image_root`."""
    specs = [spec.strip() for spec in config[name].data.split(",") if spec.strip()]
    sources = [_one_source(config, name, spec, data) for spec in specs]
    return sources[0] if len(sources) == 1 else ConcatSource(sources)


def _one_source(
    config: ml_collections.ConfigDict, name: str, spec: str, data: SyntheticDataset
) -> RecordSource:
    embedded = {"captions": data.captions_json, "instruct": data.instruct_json}
    max_bad = config.data.max_bad_fraction
    if spec in embedded:
        return LlavaJsonSource(embedded[spec], data.root, max_bad)
    if spec.startswith("tfds:"):  # tfds:NAME/SPLIT[@DATA_DIR][?option=value&...]
        return tfds_source_from_spec(spec)
    if not Path(spec).is_file():
        raise FileNotFoundError(
            f"config key {name}.data: {spec!r} is not one of {sorted(embedded)}, not tfds:… "
            "and not a file"
        )
    return LlavaJsonSource(spec, config.data.image_root or Path(spec).parent, max_bad)
