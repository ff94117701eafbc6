"""What every command-line entry point shares: errors for people, the compilation cache.

A bad config value, a missing checkpoint or a refused file raises ValueError or OSError with
a message that names the key, the path and the command that fixes it; `run` prints that one
line and exits 2 instead of burying it under a traceback (`--debug` shows the traceback).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
from absl import app, flags

# Errors whose message is the whole story for the person at the terminal.
ERRORS_FOR_PEOPLE = (ValueError, OSError)

flags.DEFINE_boolean("debug", False, "Show Python tracebacks instead of one-line errors.")


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)`, with `ERRORS_FOR_PEOPLE` printed as one line (exit status 2)."""

    def main_for_people(argv: list[str]) -> None:
        try:
            main(argv)
        except ERRORS_FOR_PEOPLE as error:
            if flags.FLAGS.debug:
                raise
            print(f"error: {error}\n(--debug shows the traceback)", file=sys.stderr)
            sys.exit(2)

    app.run(main_for_people)


def compilation_cache_dir(config: ml_collections.ConfigDict) -> Path | None:
    """`compilation_cache_dir`: "" = WORKDIR/jax_cache, "off" = no persistent cache."""
    if config.compilation_cache_dir == "off":
        return None
    return Path(config.compilation_cache_dir or Path(config.workdir) / "jax_cache")


def enable_compilation_cache(directory: str | Path, min_compile_seconds: float = 1.0) -> None:
    """XLA's persistent compilation cache: a rerun, a resume or the next stage with the same
    shapes loads its programs instead of compiling them again."""
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
