"""Orbax checkpoints of a stage: params, optimizer state and step, the data iterator's
position (grain state, one file per process) and the config as JSON.

Params and optimizer state are separate items so a later stage can `init_from` an earlier
stage's params alone (its optimizer and even its param tree differ: stage 3 upcycles).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


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
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: dict,
    data_iterator: grain.DatasetIterator,
    meta: dict,
    *,
    force: bool = False,
) -> bool:
    """Saves `state` ({"step", "params", "opt_state"}) as `step` (the host's count of its
    `state["step"]`: reading that would wait for the step), with the position of
    `data_iterator` after that step's batch. Arrays are written asynchronously; the iterator
    state is taken now (grain's handler is synchronous), before the next batch is drawn. Off
    the save interval (and unforced) it returns at once, touching no array."""
    return manager.save(
        step,
        force=force,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
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


def restore_state(
    manager: ocp.CheckpointManager, abstract_state: dict, data_iterator: grain.DatasetIterator
) -> dict:
    """Restores the latest checkpoint of the manager onto `abstract_state`'s shapes/shardings,
    and moves `data_iterator` (in place) to where that step left the data."""
    step = manager.latest_step()
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        ),
    )
    return {
        "step": jax.numpy.asarray(step, jax.numpy.int32),
        "params": restored["params"],
        "opt_state": restored["opt_state"],
    }


def restore_params(directory: str | Path, abstract_params: Any) -> tuple[Any, int]:
    """Params of the latest checkpoint under `directory` (for `init_from`), and its step."""
    manager = ocp.CheckpointManager(Path(directory).absolute())
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {directory}")
    restored = manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
    )
    manager.close()
    return restored["params"], step


def restore_meta(directory: str | Path) -> dict:
    """The JSON item of the latest checkpoint under `directory` ({"stage", "config"})."""
    manager = ocp.CheckpointManager(Path(directory).absolute())
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {directory}")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    manager.close()
    return meta
