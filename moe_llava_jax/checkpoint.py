"""Orbax checkpoints of a stage: params, optimizer state and step, the data iterator's
position (grain state, one file per process) and the config as JSON.

Params and optimizer state are separate items so a later stage can `init_from` an earlier
stage's params alone (its optimizer and even its param tree differ: stage 3 upcycles).

Lean checkpoints (`checkpoints.frozen=once`): a stage's frozen params never change, so they
are written once, to `frozen/` beside the step folders, before the first step is saved, and
each step saves only the trainable params (with their optimizer state); its meta item says
so (`frozen_saved_once`). Orbax lists and garbage-collects step folders only, so `frozen/`
stays. Restoring merges the two; a step without that mark holds whole params, as before.

A checkpoints directory may be a local path or an object store's URL (`gs://...`,
`s3://...`): orbax writes the arrays through tensorstore, which speaks those natively, and
its folders through etils' paths, which need gcsfs / s3fs (`check_location`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from moe_llava_jax import param_tree

FROZEN = "frozen"  # the folder of a stage's frozen params, beside its step folders
LEAN_META_KEY = "frozen_saved_once"  # in a step's meta: its params item is the trainable part


# Object stores a checkpoints directory may name, and the package etils' paths (orbax's
# folder operations) need for each; tensorstore writes the arrays itself.
OBJECT_STORES = {"gs": "gcsfs", "s3": "s3fs"}


def check_location(directory: str, key: str) -> None:
    """Fails now, naming config key `key`, on a URL no installed package can write to."""
    scheme, separator, _ = directory.partition("://")
    if not separator:
        return
    if scheme not in OBJECT_STORES:
        raise ValueError(
            f"config key {key}={directory!r}: {scheme}:// is not supported; give a path or "
            f"one of {[f'{s}://' for s in OBJECT_STORES]}"
        )
    package = OBJECT_STORES[scheme]
    if importlib.util.find_spec(package) is None:
        raise ValueError(
            f"config key {key}={directory!r}: {scheme}:// needs the {package} package "
            f"(pip install {package})"
        )


def location(directory: str | os.PathLike) -> epath.Path:
    """A checkpoints directory as orbax takes it: an object store's URL as given, a local
    path made absolute."""
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def split_params(params: Any, mask: Any) -> tuple[dict, dict]:
    """(trainable, frozen) params as two trees (`param_tree.partition` by `mask`)."""
    return tuple(param_tree.unflatten(half) for half in param_tree.partition(params, mask))


def _meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """The JSON item of checkpoint `step` ({"stage", "config", LEAN_META_KEY})."""
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def make_manager(
    directory: str | Path,
    *,
    save_interval_steps: int = 1,
    keep_last: int = 2,
    keep_every: int = 0,
) -> ocp.CheckpointManager:
    """Async saves every `save_interval_steps`; keeps the last `keep_last` checkpoints plus
    every step divisible by `keep_every` (0: none), e.g. for later evaluation."""
    policies = [ocp.checkpoint_managers.LatestN(keep_last)]
    if keep_every:
        policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(location(directory), options=options)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: dict,
    data_iterator: grain.DatasetIterator,
    meta: dict,
    *,
    force: bool = False,
    trainable: Any = None,
) -> bool:
    """Saves `state` ({"step", "params", "opt_state"}) as `step` (the host's count of its
    `state["step"]`: reading that would wait for the step), with the position of
    `data_iterator` after that step's batch; with a `trainable` mask only the trainable
    params (lean: `save_frozen` wrote the rest). Arrays are written asynchronously; the
    iterator state is taken now (grain's handler is synchronous), before the next batch is
    drawn. Off the save interval (and unforced) it returns at once, touching no array."""
    params = state["params"]
    if trainable is not None:
        params = split_params(params, trainable)[0]
    meta = {**meta, LEAN_META_KEY: trainable is not None}
    return manager.save(
        step,
        force=force,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta),
        ),
    )


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings: orbax restores straight onto them."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def save_frozen(directory: str | os.PathLike, params: Any, trainable: Any) -> None:
    """Writes the frozen params (`trainable` False) to `directory/frozen`, synchronously, so
    they are complete before any step checkpoint relies on them. Called when a stage starts
    from step 0 (a stage that freezes something): it replaces whatever an earlier start
    that saved no step left there."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(
        location(directory) / FROZEN, split_params(params, trainable)[1], force=True
    )
    checkpointer.wait_until_finished()
    checkpointer.close()


def _restore_params(
    directory: str | os.PathLike,
    meta: dict,
    abstract_params: Any,
    restore_step: Callable[[Any], Any],
) -> Any:
    """Params restored onto `abstract_params`: `restore_step(abstract subtree)` restores a
    step's params item; a lean step (its `meta` says so) holds the trainable params there
    and `frozen/` (its own tree says which) the rest."""
    if not meta.get(LEAN_META_KEY, False):
        return restore_step(abstract_params)
    frozen_dir = location(directory) / FROZEN
    if not frozen_dir.exists():
        raise FileNotFoundError(
            f"{frozen_dir}: the frozen params of this stage's lean checkpoints are missing"
        )
    checkpointer = ocp.StandardCheckpointer()
    frozen_paths = set(param_tree.flatten(checkpointer.metadata(frozen_dir).item_metadata.tree))
    flat = param_tree.flatten(abstract_params)
    unknown = sorted(frozen_paths - set(flat))
    if unknown:
        raise ValueError(f"{frozen_dir}: frozen params {unknown[:3]} are not params of this model")
    pick = lambda frozen: param_tree.unflatten(
        {k: v for k, v in flat.items() if (k in frozen_paths) == frozen}
    )
    trainable = restore_step(pick(False))
    frozen = checkpointer.restore(frozen_dir, pick(True))
    checkpointer.close()
    return param_tree.merge(param_tree.flatten(trainable), param_tree.flatten(frozen))


def restore_state(
    manager: ocp.CheckpointManager, abstract_state: dict, data_iterator: grain.DatasetIterator
) -> dict:
    """Restores the latest checkpoint of the manager onto `abstract_state`'s shapes/shardings,
    and moves `data_iterator` (in place) to where that step left the data."""
    step = manager.latest_step()
    meta = _meta(manager, step)
    restored = {}

    def restore_step(abstract_params: Any) -> Any:
        restored.update(
            manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params),
                    opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
                    data=grain.checkpoint.CheckpointRestore(data_iterator),
                ),
            )
        )
        return restored["params"]

    params = _restore_params(manager.directory, meta, abstract_state["params"], restore_step)
    return {
        "step": jax.numpy.asarray(step, jax.numpy.int32),
        "params": params,
        "opt_state": restored["opt_state"],
    }


def restore_params(directory: str | os.PathLike, abstract_params: Any) -> tuple[Any, int]:
    """Params of the latest checkpoint under `directory` (for `init_from`), and its step."""
    manager = ocp.CheckpointManager(location(directory))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {directory}")
    restore_step = lambda abstract: manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
    )["params"]
    params = _restore_params(directory, _meta(manager, step), abstract_params, restore_step)
    manager.close()
    return params, step


def saves_lean(manager: ocp.CheckpointManager) -> bool:
    """Whether the latest step of `manager` saved its params lean (a resumed stage goes on
    as it started, whatever `checkpoints.frozen` says now)."""
    return bool(_meta(manager, manager.latest_step()).get(LEAN_META_KEY, False))


def restore_meta(directory: str | os.PathLike) -> dict:
    """The JSON item of the latest checkpoint under `directory` ({"stage", "config"})."""
    manager = ocp.CheckpointManager(location(directory))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {directory}")
    meta = _meta(manager, step)
    manager.close()
    return meta


def saved_bytes(abstract_state: dict, trainable: Any) -> dict[str, int]:
    """Bytes of arrays a save writes, from shapes alone (whole arrays, all devices'
    shards once): `every_save` (params + optimizer state, as without `frozen/`), `lean`
    (trainable params + optimizer state) and `frozen_once`."""
    size = lambda tree: sum(
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
    )
    trained, frozen = split_params(abstract_state["params"], trainable)
    opt = size(abstract_state["opt_state"])
    return {
        "every_save": size(trained) + size(frozen) + opt,
        "lean": size(trained) + opt,
        "frozen_once": size(frozen),
    }
