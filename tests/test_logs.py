"""Log levels of a run: the libraries' one step quieter than the project's."""

import logging

from k15jax.infra import logs


def test_library_level_is_warning_by_default_and_info_at_v1():
    got = {v: logs.library_level(v) for v in (-3, -2, -1, 0, 1, 2, 5)}
    assert got == {
        -3: "CRITICAL",
        -2: "ERROR",
        -1: "WARNING",  # absl's default for a script
        0: "WARNING",
        1: "INFO",
        2: "DEBUG",
        5: "DEBUG",
    }


def test_set_library_levels_sets_each_library_logger():
    old = {name: logging.getLogger(name).level for name in logs.LIBRARIES}
    try:
        logs.set_library_levels("INFO")
        assert all(logging.getLogger(n).level == logging.INFO for n in logs.LIBRARIES)
        logs.set_library_levels("WARNING")
        assert not logging.getLogger("jax").isEnabledFor(logging.INFO)
    finally:
        for name, level in old.items():
            logging.getLogger(name).setLevel(level)
