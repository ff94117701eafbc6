"""Is an identical copy of the dense FFN a good start for every expert? Stage 3 from one
shared stage-2 checkpoint under each upcycling mode, plus a dense continuation, over seeds.

    python -m moe_llava_jax.experiments.ablation --config=configs/ablation.py

Stages 1 and 2 run once (or resume) in `workdir`; every variant is then a stage-3 copy named
`{mode}_seed{s}` (its own directory under `workdir`, `init_from` the shared stage 2), trained
with the same steps, data order and gating noise for a given seed. The dense baseline trains
the same layers' dense FFNs instead of experts. Written to `workdir`: `ablation.json` (every
run), `ablation.md` (mean ± spread over seeds), `ablation_loss.png` (training CE curves).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from moe_llava_jax import cli, param_tree, sharding, trainer, upcycling
from moe_llava_jax.data import from_config
from moe_llava_jax.evaluate import pope
from moe_llava_jax.models.moe import moe_layer_indices

DENSE = "dense"


def variant_config(
    config: ml_collections.ConfigDict, mode: str, seed: int
) -> tuple[ml_collections.ConfigDict, str]:
    """The base config with stage 3 copied under the variant's name and its seed/mode set."""
    name = f"{mode}_seed{seed}"
    config = config.copy_and_resolve_references()
    config.unlock()
    config.seed = seed
    variant = {**config.stage3.to_dict(), "name": name}
    if mode == DENSE:
        # Train the dense FFNs of exactly the layers MoE would replace: same positions, 1/E
        # of the parameters, no router.
        num_layers = config.model.decoder.num_layers
        layers = "|".join(map(str, moe_layer_indices(config.model.moe.layers, num_layers)))
        rules = [(rf"decoder/layers_({layers})/mlp/.*", True), (".*", False)]
        variant.update(moe=False, trainable=rules)
    else:
        config.upcycle.update(mode=mode, seed=seed)
    config[name] = ml_collections.ConfigDict(variant)
    config.run_stages = f"stage1,stage2,{name}"
    return config, name


def expert_cosine_distance(params: Mapping) -> float:
    """`params` in the canonical layout (`layers_{i}`, `Stage.canonical`). Mean over MoE layers of the mean pairwise cosine distance between experts' weights
    (all of an expert's tensors flattened into one vector): 0 for identical copies."""
    flat = param_tree.flatten(params)
    layers: dict[str, list[np.ndarray]] = {}
    for path, value in flat.items():
        if "/moe/experts/" in path:
            layer = path.split("/moe/")[0]
            layers.setdefault(layer, []).append(np.asarray(value).reshape(value.shape[0], -1))
    distances = []
    for tensors in layers.values():
        experts = np.concatenate(tensors, axis=1)  # [E, all weights]
        unit = experts / np.linalg.norm(experts, axis=1, keepdims=True)
        cosine = unit @ unit.T
        pairs = np.triu_indices(len(experts), k=1)
        distances.append(float(np.mean(1 - cosine[pairs])))
    return float(np.mean(distances))


def modality_divergence(summary: Mapping) -> float:
    """Mean over MoE layers of the total-variation distance between image and text tokens'
    top-1 expert load: 0 = both modalities use experts alike, 1 = disjoint experts."""
    load = np.asarray(summary["top1_load"])  # [layers, modalities (image, text), experts]
    return float(np.mean(0.5 * np.abs(load[:, 0] - load[:, 1]).sum(-1)))


def training_curve(metrics_path: Path) -> tuple[list[int], list[float]]:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return [r["step"] for r in rows], [r["ce"] for r in rows]


def run_variant(
    base: ml_collections.ConfigDict, mode: str, seed: int, mesh, data, tokenizer
) -> dict:
    """Train one stage-3 variant, then measure it: POPE, expert distances, routing."""
    config, name = variant_config(base, mode, seed)
    stage = trainer.Stage(config, name, mesh, tokenizer.vocab_size)
    source = from_config.stage_source(config, name, data)
    params = trainer.train_stage(stage, source, tokenizer)
    steps, ce = training_curve(Path(config.workdir) / name / "metrics.jsonl")
    tail = max(1, len(ce) // 10)
    result = {
        "mode": mode,
        "seed": seed,
        "steps": steps,
        "ce": ce,
        "final_ce": float(np.mean(ce[-tail:])),  # mean of the last 10% of logged points
        "pope": trainer.run_pope(
            config, stage, params, tokenizer, data.root, data.eval_annotations_json
        ),
    }
    if mode != DENSE:
        summary = trainer.analyse_routing(stage, params, source, tokenizer)
        result["expert_distance"] = expert_cosine_distance(stage.canonical(params))
        result["modality_divergence"] = modality_divergence(summary)
    return result


def _mean_spread(values: Sequence[float], digits: int) -> str:
    """'mean ± half-range' over seeds (half the max - min: with 2 seeds, the distance of each
    seed from the mean)."""
    values = np.asarray(values, float)
    half_range = (values.max() - values.min()) / 2
    return f"{values.mean():.{digits}f} ± {half_range:.{digits}f}"


def markdown_table(results: Sequence[dict], modes: Sequence[str]) -> str:
    header = (
        "| stage 3 | final train CE | POPE acc random | popular | adversarial "
        "| expert cosine distance | image/text routing TV |"
    )
    lines = [header, "|" + "---|" * 7]
    for mode in modes:
        runs = [r for r in results if r["mode"] == mode]
        cells = [_mean_spread([r["final_ce"] for r in runs], 4)]
        cells += [
            _mean_spread([r["pope"][split]["accuracy"] for r in runs], 3) for split in pope.SPLITS
        ]
        for key in ("expert_distance", "modality_divergence"):
            cells.append(_mean_spread([r[key] for r in runs], 3) if key in runs[0] else "—")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(results: Sequence[dict], modes: Sequence[str], path: Path) -> None:
    """Training CE per mode: mean over seeds, band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for mode in modes:
        runs = [r for r in results if r["mode"] == mode]
        steps, curves = runs[0]["steps"], np.asarray([r["ce"] for r in runs])
        ax.plot(steps, curves.mean(0), label=mode)
        ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.2)
    ax.set_xlabel("stage-3 step")
    ax.set_ylabel("train answer CE")
    ax.set_yscale("log")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def run(config: ml_collections.ConfigDict) -> list[dict]:
    modes = [m for m in config.ablation.modes.split(",") if m]
    seeds = [int(s) for s in config.ablation.seeds.split(",") if s]
    unknown = set(modes) - set(upcycling.UPCYCLE_MODES) - {DENSE}
    if unknown:
        raise ValueError(
            f"config key ablation.modes: unknown {sorted(unknown)}; known: "
            f"{[*upcycling.UPCYCLE_MODES, DENSE]}"
        )
    if DENSE in modes and config.model.scan_layers:
        raise ValueError(
            "config key ablation.modes: the dense baseline trains the FFNs of only the layers "
            "MoE would replace, which a scanned stack cannot single out: set "
            "model.scan_layers=False (configs/ablation.py does)"
        )
    trainer.validate_config(config)
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data, tokenizer = from_config.prepare_data(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    rules = sharding.rules_from_config(config.sharding_rules)
    with sharding.mesh_context(mesh, rules):  # as in trainer.run
        for name in ("stage1", "stage2"):  # the shared start (resumed when already trained)
            stage = trainer.Stage(config, name, mesh, tokenizer.vocab_size)
            trainer.train_stage(stage, from_config.stage_source(config, name, data), tokenizer)
        results = [
            run_variant(config, mode, seed, mesh, data, tokenizer)
            for mode, seed in itertools.product(modes, seeds)
        ]
    (workdir / "ablation.json").write_text(json.dumps(results, indent=1))
    table = markdown_table(results, modes)
    (workdir / "ablation.md").write_text(table + "\n")
    plot_curves(results, modes, workdir / "ablation_loss.png")
    print(table)
    return results


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    start = time.time()
    config = flags.FLAGS.config
    # Every variant compiles the same programs: the persistent cache compiles them once.
    if (cache := trainer.compilation_cache_dir(config)) is not None:
        cli.enable_compilation_cache(cache, min_compile_seconds=0.5)
    run(config)
    print(f"done in {time.time() - start:.0f}s; workdir: {config.workdir}")


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "An ablation config file.")
    cli.run(main)
