"""Multi-host start-up: JAX's own multi-controller runtime, nothing home-made.

Every host runs the same command; `jax.distributed.initialize` connects them (coordinator,
process ids) before any device is touched, after which `jax.devices()` spans all hosts, the
mesh covers them, each process feeds its own data shard and orbax writes checkpoints
collectively. Left empty, the coordinator and ids are detected from the environment (TPU VM
metadata, SLURM, Open MPI); set them for anything else (e.g. local processes in tests).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax


def initialize(config: Mapping) -> None:
    """`config.distributed`: {enabled, coordinator_address, num_processes, process_id}."""
    if not config["enabled"]:
        return
    explicit = {
        "coordinator_address": config["coordinator_address"] or None,
        "num_processes": config["num_processes"] or None,
        "process_id": None if config["process_id"] < 0 else config["process_id"],
    }
    jax.distributed.initialize(**explicit)
