"""Stop cleanly before the machine goes away: finish the step, checkpoint it, exit 0.

Two signals of an imminent preemption: orbax's `reached_preemption` (JAX's preemption sync
point: every process of a multi-host run agrees on the same step, which a collective
checkpoint needs; on TPU VMs it also sees maintenance notices), and, for a single-process
run, SIGTERM itself (what SLURM, Kubernetes and `kill` send), caught here because without
`jax.distributed` there is no sync point to report it. (A multi-process run leaves SIGTERM to
JAX's own preemption notifier, which feeds the sync point; a Python handler would replace it.)
"""

from __future__ import annotations

import signal
import threading

import jax
import orbax.checkpoint as ocp


class PreemptionWatch:
    """Context manager: while active, SIGTERM is noted instead of killing the process."""

    def __init__(self):
        self.signalled = False
        self._previous = None

    def _note(self, signum, frame) -> None:
        del signum, frame
        self.signalled = True

    def __enter__(self) -> PreemptionWatch:
        single = jax.process_count() == 1
        if single and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, manager: ocp.CheckpointManager, step: int) -> bool:
        """True when the run must checkpoint `step` and exit (called after every step)."""
        if manager.reached_preemption(step):
            return True
        return self.signalled
