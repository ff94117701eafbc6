"""Parameter shardings of one real preset, pinned by a golden file (as MaxText keeps them):
StableLM-2-1.6B + CLIP-L/14-336 with MoE (4 experts, top 2, sparse layers), as
`build.model_config` (the trainer's) builds it from `configs/common.py`, placed by the config's
`sharding_rules` on a data 2 x fsdp 2 x expert 2 x tensor 1 mesh. A change of the rules or
of the param tree that reshards anything fails here, listing the params that moved, instead
of showing up as a slower (or out-of-memory) run. Abstract only: `eval_shape` of the init
and an abstract mesh, so nothing real-size is allocated and no devices are needed.

After an intended change, regenerate (and review the diff of) the golden file:
    python -m tests.test_sharding_golden --regenerate
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from configs import common, models
from moe_llava_jax import build, sharding
from moe_llava_jax.models.lvlm import MoELLaVA

GOLDEN = Path(__file__).parent / "golden" / "param_shardings_stablelm2_clip_l.json"
REGENERATE = "python -m tests.test_sharding_golden --regenerate"
MESH = AbstractMesh(
    (2, 2, 2, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES)
)


def preset_config() -> ml_collections.ConfigDict:
    """The MoE-Tuning config with the real backbones in place of the tiny model."""
    config = common.moe_tuning_config("stage3", "")
    config.model.decoder = models.decoder("stablelm-2-1.6b")
    config.model.vision = models.vision("clip-l-14-336")
    config.model.moe.update(num_experts=4, top_k=2, layers="sparse")
    return config


def abstract_boxed_params(config: ml_collections.ConfigDict):
    """The stage-3 model's params as `nn.LogicallyPartitioned` boxes of ShapeDtypeStructs."""
    model_cfg = build.model_config(config, config.model.decoder.vocab_size, with_moe=True)
    size = model_cfg.vision.image_size
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)  # [batch, seq]
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)  # [batch, h, w, c]

    def init(ids, images):
        rngs = {"params": jax.random.key(0), "gating": jax.random.key(1)}
        return MoELLaVA(model_cfg).init(rngs, ids, images)["params"]

    return jax.eval_shape(init, ids, images)


def flat(tree) -> dict[str, object]:
    """{"decoder/layers_0/.../kernel": leaf} of a params-keyed tree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(key.key) for key in path): leaf for path, leaf in leaves}


def param_shardings(config: ml_collections.ConfigDict) -> dict[str, NamedSharding]:
    """{param path: NamedSharding on MESH} under the config's `sharding_rules`."""
    rules = sharding.rules_from_config(config.sharding_rules)
    return flat(sharding.logical_shardings(abstract_boxed_params(config), MESH, rules))


def spec_as_list(named: NamedSharding) -> list:
    """The PartitionSpec as JSON keeps it: one entry per dim, a mesh axis, a list or None."""
    return [list(axes) if isinstance(axes, tuple) else axes for axes in named.spec]


def golden_specs() -> dict[str, list]:
    return {path: spec_as_list(s) for path, s in param_shardings(preset_config()).items()}


def write_golden() -> None:
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(golden_specs(), sort_keys=True, indent=1) + "\n")


def test_param_shardings_match_the_golden_file():
    got, want = golden_specs(), json.loads(GOLDEN.read_text())
    differing = [
        f"{path}: golden {want.get(path, 'absent')}, now {got.get(path, 'absent')}"
        for path in sorted(set(got) | set(want))
        if got.get(path) != want.get(path)
    ]
    assert not differing, (
        f"{len(differing)} param shardings differ from {GOLDEN.name} (first 20):\n  "
        + "\n  ".join(differing[:20])
        + f"\nIf the change is intended, regenerate it: {REGENERATE}"
    )


def test_preset_places_experts_over_expert_and_embeds_over_fsdp_evenly():
    """What the golden file must keep saying, whatever it is regenerated to (and whichever
    layout, scanned or not, the config builds)."""
    config = preset_config()
    shardings = param_shardings(config)
    shapes = flat(nn.unbox(abstract_boxed_params(config)))
    expert_kernels = [p for p in shardings if "/experts/" in p and p.endswith("kernel")]
    for path in expert_kernels:
        assert "expert" in shardings[path].spec, path  # [E, ...]: E over expert
    # All of them: gate, up, down [E=4, 2048, 5632] in each of the 24 / 2 sparse MoE layers.
    assert sum(math.prod(shapes[p].shape) for p in expert_kernels) == 12 * 3 * 4 * 2048 * 5632
    embedding = shardings["decoder/embed_tokens/embedding"].spec  # [vocab, embed]
    assert embedding[1] == "fsdp", embedding
    for path, named in shardings.items():  # every sharded dim splits without padding
        for size, axes in zip(shapes[path].shape, named.spec):
            axes = (axes,) if isinstance(axes, str) else axes or ()
            assert size % math.prod(MESH.shape[a] for a in axes) == 0, (path, named.spec)


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(f"usage: {REGENERATE}")
    write_golden()
    print(f"wrote {GOLDEN}")
