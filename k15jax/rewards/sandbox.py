"""A sandbox for untrusted programs: runs them and reports how they ended (`RunResult`).

Judging their output against tests is the code reward's (`rewards.code`).

Every run is one process tree started with util-linux `unshare` in fresh network, PID, mount,
IPC and UTS namespaces; `jail.py` (the launcher, PID 1 there) builds the rest:

- a minimal root: an empty tmpfs holding `/usr` (and the `/bin`, `/lib*` links) bound
  read-only and recursively, a few `/dev` nodes, private tmpfs `/tmp` and `/dev/shm` capped
  in bytes and in inodes (`tmpfs_mb`, `tmpfs_inodes`), entered with `pivot_root` (the old
  root is detached: no `..` leads out); no checkout, no datasets, no host `/tmp`; a fresh
  `/proc` (hidepid) of the run's own processes;
- no network interface but a down loopback; no SysV IPC or POSIX queue shared with anything;
- the program runs as a dedicated unprivileged uid per worker slot (the checker of function
  tests as a second one), each in a user namespace of its own where no namespace may be made
  (so no mount of its own either) and inotify watches are few, with a new session keyring;
  the uids' user keyrings are emptied before and after each run; when the program exits the
  launcher kills whatever it left;
- limits for the whole run, not per process (`cgroup.py`): memory and process count by the
  kernel, CPU time polled here; where cgroups v1 are not writable, the per-process rlimits
  (CPU, address space, per-uid process count) are the documented fallback (`Sandbox.limits`);
  always: open files, file size, no core dumps; a wall-clock timeout kills the whole tree;
- stdout and stderr are pipes read here (capped); how the program ended comes on a separate
  pipe from the launcher, so an exit status of 137 or "MemoryError" printed to stderr is
  not mistaken for a kill or an out-of-memory.

Function tests (`Sandbox.run_checked`, judged by `code.judge_function`) run the test code in a
checker process, as another uid, that calls the candidate's functions over pipes and gets back
plain data only (`wire.py`): the candidate never sees the tests or the expected values and
cannot touch the verdicts.

`check_isolation()` probes once whether the kernel allows this (it needs root). If not,
`Sandbox()` refuses with `SandboxUnavailable`. Only an explicit
`SandboxConfig(isolation="auto")` (fall back when unavailable) or `isolation="rlimits_only"`
selects the documented weaker mode: per-process rlimits except the process count, a temporary
working directory, a scrubbed environment and a process-group kill, but no namespaces and no
uid switch (a program can reach the network, read world-readable files, escape the kill with
setsid, and in function tests tamper with the checker). Use it for trusted code only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import queue
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from k15jax.rewards import cgroup, jail, wire

PASSED, WRONG, RUNTIME, TIMEOUT, MEMORY = (
    "passed",
    "wrong_answer",
    "runtime_error",
    "timeout",
    "memory",
)
VERDICTS = (PASSED, WRONG, RUNTIME, TIMEOUT, MEMORY)
ISOLATION_MODES = ("namespaces", "auto", "rlimits_only")
_UID_BASE = 61000  # program uids: _UID_BASE + worker slot (no such users need to exist)
_CHECKER_UID_BASE = 62000  # checker uids of function tests: _CHECKER_UID_BASE + slot
_MAX_SLOTS = 1000
_SETUP_S = 1.0  # wall time allowed for building the namespace, on top of wall_s
_CGROUP_PREFIX = "k15jax-sandbox-"
_instances = itertools.count()


class SandboxUnavailable(RuntimeError):
    """The kernel does not allow the isolation the sandbox needs (and no opt-in was given)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    """Limits of one program run, of one problem's runs, and of the worker pool."""

    cpu_s: float = 2.0  # CPU seconds per run, all its processes together (cgroup; else rlimit)
    wall_s: float = 5.0  # wall-clock seconds per run, then SIGKILL of the whole tree
    memory_mb: int = 512  # per run (cgroup) and per process (RLIMIT_AS)
    max_processes: int = 16  # per run (cgroup pids) and per uid (RLIMIT_NPROC)
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_output_mb: int = 16  # stdout, and any file the program writes
    tmpfs_mb: int = 64  # size of each private tmpfs (/tmp, /dev/shm)
    tmpfs_inodes: int = 4096  # files, directories and links in each private tmpfs
    workers: int = 0  # runs in parallel; 0: one per CPU core
    isolation: str = "namespaces"  # or "auto" (weaker mode if unavailable), "rlimits_only"
    cgroups: bool = True  # per-run limits by cgroup v1 where writable; else rlimits only
    python: str = ""  # interpreter for the programs; "": see `program_python`
    stop_after_timeout: bool = True  # a problem's remaining tests get TIMEOUT after one
    problem_wall_s: float = 60.0  # wall seconds for all runs of one problem (judge_stdio)

    def __post_init__(self):
        for name in ("cpu_s", "wall_s", "memory_mb", "max_processes", "max_open_files",
                     "max_output_mb", "tmpfs_mb", "tmpfs_inodes", "problem_wall_s"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation={self.isolation!r} must be one of {ISOLATION_MODES}")
        if not 0 <= self.workers <= _MAX_SLOTS:
            raise ValueError(f"workers={self.workers} must be in [0, {_MAX_SLOTS}]")

    @property
    def pool_size(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one program run did."""

    verdict: str  # PASSED here means "exited 0 in time"; judging decides WRONG vs PASSED
    exit_code: int | None  # negative: killed by that signal; None: no status (killed here)
    stdout: str
    stderr: str
    wall_s: float


# ------------------------------------------------------------------ isolation probe


def _world_executable(path: str) -> bool:
    """Whether any uid can run `path`: o+x on the file and on every directory above it."""
    path = os.path.realpath(path)
    if not os.path.isfile(path) or not os.stat(path).st_mode & 0o001:
        return False
    parent = os.path.dirname(path)
    while True:
        if not os.stat(parent).st_mode & 0o001:
            return False
        if parent == "/":
            return True
        parent = os.path.dirname(parent)


def program_python(cfg: SandboxConfig) -> str:
    """Returns the interpreter the sandboxed uid runs programs with.

    The configured one, else this process's interpreter if every uid may run it, else
    /usr/bin/python3 (an interpreter under a private home, e.g. pyenv in /root, is not).
    """
    candidates = [cfg.python] if cfg.python else [sys.executable, "/usr/bin/python3"]
    for path in candidates:
        if _world_executable(path):
            return os.path.realpath(path)
    raise SandboxUnavailable(
        f"no interpreter the sandbox uid can run among {candidates}: each must be o+x with "
        "o+x directories above it; set SandboxConfig(python=...)"
    )


_UNSHARE = ("unshare", "--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child")


@functools.cache
def check_isolation() -> str | None:
    """Returns None if namespaced runs work on this machine, else the reason they do not."""
    if sys.platform != "linux":
        return f"namespaces need Linux (this is {sys.platform})"
    if shutil.which("unshare") is None:
        return "util-linux `unshare` is not on PATH"
    if os.geteuid() != 0:
        return "switching the program to an unprivileged uid needs root (euid is not 0)"
    try:
        proc = subprocess.run(
            [*_UNSHARE, "--mount-proc", "sh", "-c",
             "mount -t tmpfs none /tmp && unshare --user true && echo ok"],  # see jail._start
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unshare failed: {err}"
    if proc.returncode != 0 or "ok" not in proc.stdout:
        return f"unshare refused: {proc.stderr.strip()[:200]}"
    return None


# ------------------------------------------------------------------------ running


class Sandbox:
    """A pool of sandboxed runs; `run` may be called from many threads at once.

    Use as a context manager or call `close()`; `map` spreads calls over the pool.
    `limits` says how the per-run limits are enforced: "cgroups" or "rlimits".
    """

    def __init__(self, cfg: SandboxConfig = SandboxConfig()):
        self.cfg = cfg
        if cfg.isolation == "rlimits_only":
            self.reason = "isolation='rlimits_only' was asked for"
        else:
            self.reason = check_isolation()
        if self.reason is not None and cfg.isolation == "namespaces":
            raise SandboxUnavailable(
                f"refusing to run untrusted code without isolation: {self.reason}. "
                "SandboxConfig(isolation='auto' or 'rlimits_only') runs with rlimits only (no "
                "network, PID or mount isolation, same uid as this process)."
            )
        self.python = program_python(cfg) if self.isolated else (cfg.python or sys.executable)
        self._cgroups: dict[int, cgroup.SlotCgroups] = {}
        if self.isolated and cfg.cgroups:
            cgroup.remove_stale(_CGROUP_PREFIX)
            name = f"{_CGROUP_PREFIX}{os.getpid()}-{next(_instances)}-"
            for i in range(cfg.pool_size):  # + launcher, checker and their slack
                made = cgroup.SlotCgroups.create(
                    name + str(i), memory_mb=cfg.memory_mb, max_tasks=cfg.max_processes + 4
                )
                if made is None:
                    break
                self._cgroups[i] = made
            if len(self._cgroups) < cfg.pool_size:
                self._remove_cgroups()
        self.limits = "cgroups" if self._cgroups else "rlimits"
        self._slots: queue.Queue[int] = queue.Queue()
        for i in range(cfg.pool_size):
            self._slots.put(i)
        self._pool = concurrent.futures.ThreadPoolExecutor(cfg.pool_size)
        with open(wire.__file__, encoding="utf-8") as f:
            self._wire = f.read()

    @property
    def isolated(self) -> bool:
        return self.reason is None

    def _remove_cgroups(self) -> None:
        for groups in self._cgroups.values():
            groups.remove()
        self._cgroups = {}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._remove_cgroups()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def map(self, fn, items):
        """Returns [fn(item) for item in items], run on the pool's threads."""
        return list(self._pool.map(fn, items))

    def library_path(self, name: str, host_dir: str) -> str:
        """Returns where a program sees `host_dir` when it is passed as `libraries[name]`."""
        return f"/tmp/lib/{name}" if self.isolated else os.path.realpath(host_dir)

    def run(
        self,
        files: dict[str, str],
        argv: list[str],
        stdin: str = "",
        *,
        libraries: dict[str, str] | None = None,
    ) -> RunResult:
        """Runs `argv` (e.g. ["python", "main.py"]) in a fresh sandbox holding `files`.

        "python" as argv[0] means `program_python` in isolated mode (-I). `libraries` maps a
        name to a host directory the program may read, at `library_path(name, dir)`
        (bind-mounted read-only). `stdin` may hold lone surrogates (sent as in UTF-8).
        """
        if not isinstance(stdin, str):
            raise TypeError(f"stdin must be a str, got {type(stdin).__name__}")
        for name in libraries or {}:
            if not name.isidentifier():
                raise ValueError(f"library name {name!r} must be an identifier")
        if argv and argv[0] == "python":
            argv = [self.python, "-I", *argv[1:]]
        return self._in_slot(files, argv, stdin, libraries or {}, None)

    def run_checked(self, program: str, checker: dict) -> RunResult:
        """Runs function tests: `program` answers calls from a checker running `checker`.

        `checker` is {"tests": [code, ...], "prelude": code, "entry_point": name or None}; the
        stdout of the result holds one JSON verdict line per test that finished (`wire.py`).
        """
        return self._in_slot({"solution.py": program}, [], "", {}, checker)

    def _in_slot(self, files, argv, stdin, libraries, checker) -> RunResult:
        slot = self._slots.get()
        try:
            return self._run(slot, files, argv, stdin, libraries, checker)
        finally:
            self._slots.put(slot)

    def _run(self, slot, files, argv, stdin, libraries, checker) -> RunResult:
        cfg = self.cfg
        host_dir = tempfile.mkdtemp(prefix="k15jax-sandbox-")
        groups = self._cgroups.get(slot)
        try:
            os.mkdir(os.path.join(host_dir, "root"))
            own = os.getuid()
            spec = dict(
                files=files, argv=argv, checker=checker, wire=self._wire, python=self.python,
                isolated=self.isolated, cgroups=groups.join if groups else [],
                uid=_UID_BASE + slot if self.isolated else own,
                checker_uid=_CHECKER_UID_BASE + slot if self.isolated else own,
                cpu_s=cfg.cpu_s, memory_mb=cfg.memory_mb, max_processes=cfg.max_processes,
                max_open_files=cfg.max_open_files, max_output_mb=cfg.max_output_mb,
                tmpfs_mb=cfg.tmpfs_mb, tmpfs_inodes=cfg.tmpfs_inodes,
                root=os.path.join(host_dir, "root"),
                extra_dirs=_python_prefix(self.python) if self.isolated else [],
                libraries={self.library_path(n, d): os.path.realpath(d)
                           for n, d in libraries.items()},
                workdir="/tmp/work" if self.isolated else os.path.join(host_dir, "work"),
                boxdir="/box" if self.isolated else os.path.join(host_dir, "box"),
            )  # fmt: skip
            spec_path = os.path.join(host_dir, "spec.json")
            with open(spec_path, "w", encoding="utf-8", errors="surrogatepass") as f:
                json.dump(spec, f)
            stdin_path = os.path.join(host_dir, "stdin")
            with open(stdin_path, "wb") as f:
                f.write(stdin.encode("utf-8", errors="surrogatepass"))
            ooms = groups.reset() if groups else 0
            status_r, status_w = os.pipe()
            launcher = [sys.executable, "-I", "-S", jail.__file__, spec_path, str(status_w)]
            with open(stdin_path, "rb") as fin:
                proc = subprocess.Popen(
                    [*_UNSHARE, *launcher] if self.isolated else launcher,
                    stdin=fin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    env=_clean_env("/"), start_new_session=True, pass_fds=(status_w,),
                )  # fmt: skip
            os.close(status_w)
            start = time.perf_counter()
            with os.fdopen(status_r, "rb") as status_pipe:
                out, err, status, stop = self._collect(proc, status_pipe, groups)
            wall = time.perf_counter() - start
            if groups:
                groups.empty()
                oom = groups.oom_kills() > ooms
            else:
                oom = False
                if self.isolated:
                    for uid in (_UID_BASE + slot, _CHECKER_UID_BASE + slot):
                        _wait_uid_gone(uid)
            return _result(status, stop, oom, out, err, wall, cpu_s=cfg.cpu_s)
        finally:
            shutil.rmtree(host_dir, ignore_errors=True)

    def _collect(self, proc, status_pipe, groups):
        """Reads stdout, stderr and the launcher's status until they close or a limit hits.

        Returns (stdout, stderr, status or None, why it was stopped or "").
        """
        cfg = self.cfg
        caps = {proc.stdout: cfg.max_output_mb << 20, proc.stderr: 64 << 10, status_pipe: 4096}
        bufs = {f: bytearray() for f in caps}
        deadline = time.monotonic() + cfg.wall_s + _SETUP_S
        stop, ended = "", False
        with selectors.DefaultSelector() as sel:
            for f in caps:
                sel.register(f, selectors.EVENT_READ)
            while sel.get_map():
                left = deadline - time.monotonic()
                if ended and left <= 0:
                    break  # rlimits_only: a process the program left holds a pipe open
                if not stop and left <= 0:
                    stop = "wall"
                elif not stop and groups and groups.cpu_s() > cfg.cpu_s:
                    stop = "cpu"
                if stop and proc.poll() is None:
                    _kill_tree(proc)
                    deadline = time.monotonic() + 2.0  # pipes held by escaped processes
                elif stop and left <= 0:
                    break
                for key, _ in sel.select(max(0.0, min(left, 0.05 if groups else left))):
                    f = key.fileobj
                    chunk = os.read(f.fileno(), 1 << 16)
                    if not chunk:
                        sel.unregister(f)
                        if f is status_pipe and not stop:  # the launcher is done
                            ended, deadline = True, min(deadline, time.monotonic() + 0.5)
                        continue
                    bufs[f] += chunk
                    if len(bufs[f]) > caps[f]:
                        if f is proc.stdout and not stop:
                            stop = "output"
                            _kill_tree(proc)
                            deadline = time.monotonic() + 2.0
                        del bufs[f][: len(bufs[f]) - caps[f]]  # keep the tail
        _kill_tree(proc)  # rlimits_only: the process group may still hold children
        proc.wait()
        for f in (proc.stdout, proc.stderr):
            f.close()
        try:
            status = json.loads(bytes(bufs[status_pipe]))
        except ValueError:
            status = None
        text = lambda b: bytes(b).decode("utf-8", errors="replace")
        return text(bufs[proc.stdout]), text(bufs[proc.stderr]), status, stop


def _python_prefix(python: str) -> list[str]:
    """Returns the directory to bind beside /usr for an interpreter that lives elsewhere."""
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))
    return [] if prefix in ("/", "/usr") or prefix.startswith("/usr/") else [prefix]


_MEMORY_LAST_LINE = re.compile(r"(MemoryError(: .*)?|.*\[Errno 12\] Cannot allocate memory.*)")


def _ended(status: dict | None, cpu_s: float) -> tuple[int | None, bool]:
    """Returns (exit code, negative for a signal; whether the CPU rlimit killed it)."""
    if status is None:
        return None, False
    code = status["exit"] if "exit" in status else -status["signal"]
    rlimit = int(-(-cpu_s // 1))  # SIGXCPU at the soft limit, SIGKILL at the hard one
    return code, code == -signal.SIGXCPU or (code == -signal.SIGKILL and status["cpu_s"] >= rlimit)


def _result(status, stop, oom, stdout, stderr, wall, *, cpu_s) -> RunResult:
    """Decides the verdict of a run from how it ended (never from its output alone).

    `status` is the launcher's report on the program (or, for function tests, the checker,
    with the candidate's own end under "candidate" when it died first).
    """
    code, cpu_killed = _ended(status, cpu_s)
    _, candidate_cpu_killed = _ended((status or {}).get("candidate"), cpu_s)
    lines = stderr.strip().splitlines()
    if stop in ("wall", "cpu") or cpu_killed or candidate_cpu_killed:
        verdict = TIMEOUT
    elif oom or (lines and _MEMORY_LAST_LINE.fullmatch(lines[-1]) and code != 0):
        verdict = MEMORY
    elif code == 0 and not stop:
        verdict = PASSED
    else:
        verdict = RUNTIME  # output limit, a crash, a signal it sent itself, no status
    return RunResult(verdict, code, stdout, stderr, wall)


def _uid_pids(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
    return pids


def _wait_uid_gone(uid: int, timeout_s: float = 10.0) -> None:
    """Waits until no process runs as `uid` (a slot's uid), SIGKILLing stragglers.

    Leftovers would count against the next run's process limit on the same slot.
    """
    cgroup.kill_until_gone(
        lambda: _uid_pids(uid), f"of uid {uid}", timeout_s=timeout_s, poll_s=0.01
    )


def _kill_tree(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _clean_env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home}
