"""Puts the repository root on sys.path so tests import `configs` like the trainer does, and
keeps every test process (and the subprocesses they start) on the CPU backend: the tests
are written for CPU devices, and with libtpu installed (requirements-dev, for the AOT
compile tests) jax would otherwise try to open a TPU and take libtpu's per-host lockfile.
The AOT tests reach TPU topologies through `jax.experimental.topologies`, which needs no
TPU backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
