"""Log levels of a run's process: the project's own lines at absl's verbosity, the libraries' one
step quieter, so that by default the console shows the run's progress and warnings only.

absl's verbosity: -3 fatal, -2 error, -1 warning (a script's default), 0 info, 1 debug. The
libraries' level at each (`library_level`): the same up to -1, then WARNING at 0, INFO at 1, DEBUG
from 2. vLLM configures its own loggers when an engine starts, from `VllmConfig.log_level`; the
run sets that field to the same level.
"""

from __future__ import annotations

import logging

# Libraries that log through Python's `logging` below the root: JAX (backends, compilation
# cache) and absl's logger, which orbax writes its checkpoint lines to.
LIBRARIES = ("jax", "jaxlib", "absl")

_ABSL = {-3: logging.CRITICAL, -2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}


def _standard_level(verbosity: int) -> int:
    """Returns the `logging` level of absl's `verbosity` (-3 fatal ... 0 info, 1 and up debug)."""
    return _ABSL.get(max(verbosity, -3), logging.DEBUG)


def library_level(verbosity: int) -> str:
    """Returns the name of the libraries' log level at absl's `verbosity`.

    WARNING by default (-1) and at 0, INFO at 1, DEBUG from 2; ERROR and CRITICAL at -2 and -3.
    """
    return logging.getLevelName(_standard_level(verbosity if verbosity < 0 else verbosity - 1))


def set_library_levels(level: str) -> None:
    """Sets the loggers of `LIBRARIES` to `level` (a `logging` level name)."""
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(level)
