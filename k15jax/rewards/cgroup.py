"""Per-run limits for a whole process tree: one cgroup v1 group per sandbox worker slot.

A slot's groups (memory, pids, cpuacct) are made under this process's own groups, so the
sandbox stays inside whatever limits the host gives us. The launcher joins them before it
starts the program; every process the program starts is counted with it:

- memory: `memory.limit_in_bytes` (and `memsw`, so swap does not stretch it); the kernel's OOM
  killer acts inside the group and `memory.oom_control` counts its kills (the MEMORY verdict);
- pids: `pids.max` processes and threads at once, all uids of the run together;
- cpuacct: `cpuacct.usage`, the CPU time of the run, which the parent polls and enforces.

`SlotCgroups.create` returns None where the hierarchy is missing or read-only (cgroup v2 only,
no root, a container without the mounts); the sandbox then keeps the per-process rlimits only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable

_ROOT = "/sys/fs/cgroup"
CONTROLLERS = ("memory", "pids", "cpuacct")


def _own_path(controller: str) -> str | None:
    """Returns the directory of this process's group for a v1 `controller`, or None."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if controller in names.split(","):
                for mount in (controller, names):
                    top = os.path.join(_ROOT, mount)
                    if os.path.isdir(top):
                        return top + path
    return None


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def kill_until_gone(
    pids: Callable[[], list[int]], where: str, *, timeout_s: float, poll_s: float
) -> None:
    """SIGKILLs the processes `pids()` lists until it lists none; raises after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while found := pids():
        for pid in found:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"sandbox processes {where} survive SIGKILL: {found[:10]}")
        time.sleep(poll_s)


class SlotCgroups:
    """The memory, pids and cpuacct groups of one worker slot, reset before each run."""

    def __init__(self, dirs: dict[str, str]):
        self.dirs = dirs

    @classmethod
    def create(cls, name: str, *, memory_mb: int, max_tasks: int) -> SlotCgroups | None:
        """Makes the slot's groups with their limits; None if the host does not allow it."""
        dirs = {}
        try:
            for controller in CONTROLLERS:
                own = _own_path(controller)
                if own is None:
                    raise OSError(f"no cgroup v1 {controller} hierarchy")
                dirs[controller] = os.path.join(own, name)
                os.makedirs(dirs[controller], exist_ok=True)
            limit = memory_mb << 20
            _write(os.path.join(dirs["memory"], "memory.limit_in_bytes"), limit)
            memsw = os.path.join(dirs["memory"], "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):
                _write(memsw, limit)
            _write(os.path.join(dirs["pids"], "pids.max"), max_tasks)
        except OSError:
            cls(dirs).remove()
            return None
        return cls(dirs)

    @property
    def join(self) -> list[str]:
        """The directories the launcher writes itself into."""
        return list(self.dirs.values())

    def reset(self) -> int:
        """Zeroes the CPU counter; returns the OOM-kill count to compare after the run."""
        _write(os.path.join(self.dirs["cpuacct"], "cpuacct.usage"), 0)
        return self.oom_kills()

    def cpu_s(self) -> float:
        return int(_read(os.path.join(self.dirs["cpuacct"], "cpuacct.usage"))) / 1e9

    def oom_kills(self) -> int:
        for line in _read(os.path.join(self.dirs["memory"], "memory.oom_control")).splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def pids(self) -> list[int]:
        return [int(p) for p in _read(os.path.join(self.dirs["pids"], "cgroup.procs")).split()]

    def empty(self, timeout_s: float = 10.0) -> None:
        """SIGKILLs whatever is left in the groups and waits until they are empty."""
        kill_until_gone(self.pids, "in the run's cgroup", timeout_s=timeout_s, poll_s=0.005)

    def remove(self) -> None:
        for path in self.dirs.values():
            with contextlib.suppress(OSError):
                os.rmdir(path)


def remove_stale(prefix: str) -> None:
    """Removes empty slot groups named `prefix<pid>-...` whose creating process is gone."""
    for controller in CONTROLLERS:
        own = _own_path(controller)
        if own is None or not os.path.isdir(own):
            continue
        for entry in os.scandir(own):
            if not entry.name.startswith(prefix):
                continue
            pid = entry.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                with contextlib.suppress(OSError):
                    os.rmdir(entry.path)
