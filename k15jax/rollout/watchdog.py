"""Launched vLLM servers never outlive their run: a watchdog process around each server, and a
record of the servers in the run's directory.

A server the pool launches (`servers.ServerPool`, `ServerPoolConfig.launch`) is started through
this module: `python -m k15jax.rollout.watchdog FD TRAINER_PID GRACE_S WEIGHTS -- SERVER...`
(`wrap`). Two mechanisms; each covers what the other cannot.

The watchdog (`main`). It is started in its own session, so its pid is its process group's id,
and it starts the server in that group, where vLLM's own processes (the engine core) are too.
It holds the read end of a pipe whose write end only the trainer holds (`os.pipe` descriptors
are closed in every program the trainer starts). When the trainer dies, however it dies, SIGKILL
included, the kernel closes the write end and the watchdog reads end-of-file. It then sends
SIGTERM to its group, waits up to GRACE_S for the server, removes the published weights (the
directories under WEIGHTS, the pool's `publish_root`; the server logs stay) and SIGKILLs the
group, itself last. A process that the trainer forked without starting a program keeps a copy
of the write end, so the watchdog also checks twice a second that its parent is still the
trainer (a dead process's children get another parent). SIGTERM to the watchdog stops the group
the same way. When the server exits on its own, the watchdog kills what is left of its group
and exits with the server's status, so the pool sees the death as before. The server has
`PR_SET_PDEATHSIG` = SIGKILL against the watchdog: that signal comes when the parent *thread*
ends, which for the single-threaded watchdog is its death. (Set against the trainer it would
fire when the pool's worker thread that restarted a server ends; hence the pipe.)

The record (`write_record`, `stop_recorded`): `launched_servers.json` in the run's directory,
written atomically whenever a server starts, names the trainer and, for each server, its
watchdog's pid (= process group id), the watchdog's start time (field 22 of `/proc/PID/stat`,
clock ticks after boot) and a token in the environment of the server and of every process it
starts (`TOKEN_ENV`). A pool started again on the same run directory first stops what the record
names and still runs, which happens only when the watchdog was killed too: a group whose leader
is alive with the recorded start time gets SIGTERM and, GRACE_S later, SIGKILL; then any process
whose environment holds a recorded token gets SIGKILL. A pid that another process took since has
another start time and no token and is never signalled. The recorded pool's published weights
are removed. A trainer alive under the recorded pid and start time is another run in the same
directory: the new pool refuses to start (`InUseError`) rather than stop that run's servers.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time

from k15jax.infra import atomic

log = logging.getLogger(__name__)

RECORD = "launched_servers.json"  # in the run's directory
TOKEN_ENV = "K15JAX_SERVER_TOKEN"  # marks a launched server and every process it starts
GRACE_S = 10.0  # from SIGTERM to SIGKILL
_PR_SET_PDEATHSIG = 1


class InUseError(RuntimeError):
    """The run directory's recorded servers belong to a trainer that is still running."""


# -- processes ---------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Returns the fields of /proc/PID/stat after the command name (field 3 on), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # the name may hold spaces and ")"


def start_time(pid: int) -> int | None:
    """Returns when process `pid` started (clock ticks after boot), or None if there is none.

    A zombie (exited, not yet reaped) counts as none."""
    fields = _stat(pid)
    if fields is None or fields[0] in "ZX":
        return None
    return int(fields[19])  # field 22


def _live_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def group_members(pgid: int) -> list[int]:
    """Returns the live (not zombie) processes of process group `pgid`."""
    out = []
    for pid in _live_pids():
        fields = _stat(pid)
        if fields is not None and fields[0] not in "ZX" and int(fields[2]) == pgid:  # field 5
            out.append(pid)
    return out


def _has_token(pid: int, tokens: set[str]) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
    except OSError:  # gone, or another user's process: not ours
        return False
    prefix = TOKEN_ENV.encode() + b"="
    return any(v.startswith(prefix) and v[len(prefix) :].decode() in tokens for v in environ)


def token_holders(tokens: set[str]) -> list[int]:
    """Returns the live processes whose environment holds one of `tokens` (`TOKEN_ENV`)."""
    return [pid for pid in _live_pids() if start_time(pid) is not None and _has_token(pid, tokens)]


# -- the watchdog ------------------------------------------------------------------------------


def wrap(command: list[str], *, read_fd: int, weights: str, grace_s: float = GRACE_S) -> list[str]:
    """Returns `command` run under a watchdog that stops it when this process dies, and then
    removes the directories under `weights`.

    Start the result with `start_new_session=True` and `pass_fds=(read_fd,)`, where `read_fd` is
    the read end of an `os.pipe()` whose write end this process keeps open.
    """
    return [
        sys.executable, "-m", "k15jax.rollout.watchdog",
        str(read_fd), str(os.getpid()), str(grace_s), weights, "--", *command,
    ]  # fmt: skip


def _die_with_watchdog(watchdog: int, libc) -> None:
    """In the server's child before exec: SIGKILL when the watchdog dies (it has one thread)."""
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != watchdog:  # the watchdog died before the prctl
        os._exit(1)


def _kill_others(pgid: int) -> None:
    for pid in group_members(pgid):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    """Runs the server and stops its group when the trainer dies; returns the exit status."""
    fd, trainer, grace_s, weights = int(argv[0]), int(argv[1]), float(argv[2]), argv[3]
    command = argv[5:] if argv[4] == "--" else argv[4:]
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    libc = ctypes.CDLL(None, use_errno=True)
    me = os.getpid()
    server = subprocess.Popen(command, preexec_fn=lambda: _die_with_watchdog(me, libc))
    while not stopping:
        if server.poll() is not None:
            _kill_others(os.getpgrp())  # e.g. an engine core its server left behind
            code = server.returncode
            return code if code >= 0 else 128 - code
        readable, _, _ = select.select([fd], [], [], 0.5)
        if (readable and not os.read(fd, 1)) or os.getppid() != trainer:
            break  # the trainer is gone
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(os.getpgrp(), signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(grace_s)
    with contextlib.suppress(OSError):
        for entry in os.scandir(weights):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
    os.killpg(os.getpgrp(), signal.SIGKILL)  # what is left, this process last
    return 1


# -- the record --------------------------------------------------------------------------------


def record_entry(address: str, process: subprocess.Popen, token: str) -> dict:
    """Returns what the record keeps of one launched server (`process`: its watchdog)."""
    return {
        "address": address,
        "pid": process.pid,
        "pgid": process.pid,  # started in its own session
        "start_time": start_time(process.pid),
        "token": token,
        "command": " ".join(process.args) if isinstance(process.args, list) else process.args,
    }


def write_record(path: str, entries: list[dict], *, publish_root: str) -> None:
    """Writes the record of this trainer's launched servers to `path`, atomically."""
    me = os.getpid()
    trainer = {"pid": me, "start_time": start_time(me)}
    atomic.write_json(path, {"trainer": trainer, "publish_root": publish_root, "servers": entries})


def _signal_group(entry: dict, signum: int) -> bool:
    """Signals the entry's process group if its leader is the recorded process; returns whether."""
    if start_time(entry["pid"]) != entry["start_time"]:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(entry["pgid"], signum)
    return True


def _kill_token_holders(tokens: set[str]) -> list[int]:
    killed = []
    for pid in token_holders(tokens):
        try:  # a pidfd: the check and the signal see the same process
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if _has_token(pid, tokens):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                killed.append(pid)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)
    return killed


def stop_recorded(path: str, *, grace_s: float = GRACE_S) -> list[str]:
    """Stops the servers that the record at `path` names and that still run; returns them.

    Raises:
      InUseError: the recorded trainer (another process than this one) is still running.
    """
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        return []
    trainer = record["trainer"]
    if trainer["pid"] != os.getpid() and start_time(trainer["pid"]) == trainer["start_time"]:
        raise InUseError(
            f"the rollout servers recorded in {path} belong to trainer pid {trainer['pid']}, "
            "still running: another run is using this directory"
        )
    alive = [e for e in record["servers"] if _signal_group(e, signal.SIGTERM)]
    deadline = time.monotonic() + grace_s
    while any(group_members(e["pgid"]) for e in alive) and time.monotonic() < deadline:
        time.sleep(0.2)
    for e in alive:
        _signal_group(e, signal.SIGKILL)  # only if its leader is still the recorded process
    stopped = [e["address"] for e in alive]
    if killed := _kill_token_holders({e["token"] for e in record["servers"]}):
        log.warning("killed %d processes of rollout servers recorded in %s", len(killed), path)
    if stopped:
        log.warning("stopped rollout servers %s left by trainer pid %d (%s)",
                    ", ".join(stopped), trainer["pid"], path)  # fmt: skip
    if os.path.basename(record["publish_root"]).startswith("pool-"):  # a pool's, nothing else
        shutil.rmtree(record["publish_root"], ignore_errors=True)
        with contextlib.suppress(OSError):  # the run's publish directory, if now empty
            os.rmdir(os.path.dirname(record["publish_root"]))
    os.remove(path)
    return stopped


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
