"""A sandbox for untrusted programs: stdin/stdout judging and assert-style function tests.

Every run is one process tree in fresh Linux namespaces, started with util-linux `unshare`:

- network namespace: no interfaces but a down loopback, so no connection leaves;
- PID namespace: the program is PID 1 there; when it exits (or is killed) the kernel kills
  every process it left behind, so nothing outlives a run;
- mount namespace: `/` is remounted read-only and `/tmp`, `/var/tmp`, `/dev/shm`, `/run/lock`
  are fresh size-limited tmpfs mounts that vanish with the namespace (the working directory
  is `/tmp/work`); a fresh `/proc` shows only the sandbox's own processes;
- the program runs as a dedicated unprivileged uid (one per worker slot), so it can signal
  no host process and read no other process's environment; its own environment is scrubbed;
- rlimits: CPU seconds, address space, process count (per slot uid: fork bombs stop there),
  open files, file size (also caps stdout/stderr, which go to files), no core dumps; and a
  wall-clock timeout after which the whole tree is SIGKILLed.

`check_isolation()` probes once whether the kernel allows this (root, or a user namespace
with uid mapping is not enough: switching to another uid needs root in the host). If not,
`Sandbox()` refuses with `SandboxUnavailable`. Only an explicit
`SandboxConfig(isolation="auto")` (fall back when unavailable) or `isolation="rlimits_only"`
selects the documented weaker mode: the same rlimits except the process count, a temporary
working directory, a scrubbed environment and a process-group kill, but no network, mount
or PID isolation and no uid switch (a program can reach the network, read world-readable
files, and escape the kill with setsid). Use it for trusted code only.

This file also serves as the in-namespace launcher (`python -I sandbox.py --jail ...`), so its
top level imports only the standard library.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import json
import os
import queue
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

PASSED, WRONG, RUNTIME, TIMEOUT, MEMORY = (
    "passed",
    "wrong_answer",
    "runtime_error",
    "timeout",
    "memory",
)
VERDICTS = (PASSED, WRONG, RUNTIME, TIMEOUT, MEMORY)
ISOLATION_MODES = ("namespaces", "auto", "rlimits_only")
_UID_BASE = 61000  # sandbox uids: _UID_BASE + worker slot (no such users need to exist)


class SandboxUnavailable(RuntimeError):
    """The kernel does not allow the isolation the sandbox needs (and no opt-in was given)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    """Limits of one program run and of the worker pool."""

    cpu_s: float = 2.0  # CPU seconds per run (RLIMIT_CPU, rounded up)
    wall_s: float = 5.0  # wall-clock seconds per run, then SIGKILL of the whole tree
    memory_mb: int = 512  # address space (RLIMIT_AS)
    max_processes: int = 16  # processes of the run's uid (RLIMIT_NPROC)
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_output_mb: int = 16  # any file the program writes, stdout and stderr included
    tmpfs_mb: int = 64  # size of each private tmpfs (/tmp and friends)
    workers: int = 0  # runs in parallel; 0: one per CPU core
    isolation: str = "namespaces"  # or "auto" (weaker mode if unavailable), "rlimits_only"
    python: str = ""  # interpreter for the programs; "": see `program_python`

    def __post_init__(self):
        for name in ("cpu_s", "wall_s", "memory_mb", "max_processes", "max_open_files",
                     "max_output_mb", "tmpfs_mb"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation={self.isolation!r} must be one of {ISOLATION_MODES}")
        if self.workers < 0:
            raise ValueError(f"workers={self.workers} must be >= 0")

    @property
    def pool_size(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one program run did."""

    verdict: str  # PASSED here means "exited 0 in time"; judging decides WRONG vs PASSED
    exit_code: int | None  # negative: killed by that signal
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


_UNSHARE = ("unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc")


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
            [*_UNSHARE, "sh", "-c", "mount -t tmpfs none /tmp && ip link 2>/dev/null; echo ok"],
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
        self._slots: queue.Queue[int] = queue.Queue()
        for i in range(cfg.pool_size):
            self._slots.put(i)
        self._pool = concurrent.futures.ThreadPoolExecutor(cfg.pool_size)

    @property
    def isolated(self) -> bool:
        return self.reason is None

    def close(self) -> None:
        self._pool.shutdown(wait=True)

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
        (bind-mounted read-only: a host path under /tmp would otherwise be hidden).
        """
        for name in libraries or {}:
            if not name.isidentifier():
                raise ValueError(f"library name {name!r} must be an identifier")
        slot = self._slots.get()
        try:
            return self._run(slot, files, argv, stdin, libraries or {})
        finally:
            self._slots.put(slot)

    def _run(self, slot, files, argv, stdin, libraries) -> RunResult:
        cfg = self.cfg
        if argv and argv[0] == "python":
            argv = [self.python, "-I", *argv[1:]]
        host_dir = tempfile.mkdtemp(prefix="k15jax-sandbox-")
        try:
            io_paths = {n: os.path.join(host_dir, n) for n in ("stdin", "stdout", "stderr")}
            with open(io_paths["stdin"], "w") as f:
                f.write(stdin)
            spec = dict(
                files=files, argv=argv, uid=_UID_BASE + slot, isolated=self.isolated,
                cpu_s=cfg.cpu_s, memory_mb=cfg.memory_mb, max_processes=cfg.max_processes,
                max_open_files=cfg.max_open_files, max_output_mb=cfg.max_output_mb,
                tmpfs_mb=cfg.tmpfs_mb,
                libraries={self.library_path(n, d): os.path.realpath(d)
                           for n, d in libraries.items()},
                workdir="/tmp/work" if self.isolated else os.path.join(host_dir, "work"),
            )  # fmt: skip
            spec_path = os.path.join(host_dir, "spec.json")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            launcher = [sys.executable, "-I", "-S", os.path.abspath(__file__), "--jail", spec_path]
            cmd = [*_UNSHARE, *launcher] if self.isolated else launcher
            return self._wait(cmd, io_paths, _UID_BASE + slot)
        finally:
            shutil.rmtree(host_dir, ignore_errors=True)

    def _wait(self, cmd, io_paths, uid: int) -> RunResult:
        cfg = self.cfg
        start = time.perf_counter()
        with (
            open(io_paths["stdin"], "rb") as fin,
            open(io_paths["stdout"], "wb") as fout,
            open(io_paths["stderr"], "wb") as ferr,
        ):
            proc = subprocess.Popen(
                cmd, stdin=fin, stdout=fout, stderr=ferr, env=_clean_env("/"),
                start_new_session=True, close_fds=True,
            )  # fmt: skip
            timed_out = False
            try:
                code = proc.wait(timeout=cfg.wall_s + 1.0)  # +1 s: namespace set-up
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_tree(proc)
                code = proc.wait()
                if self.isolated:  # the namespace dies asynchronously after unshare is killed
                    _wait_uid_gone(uid)
        wall = time.perf_counter() - start
        stdout = _read_capped(io_paths["stdout"], cfg.max_output_mb)
        stderr = _read_capped(io_paths["stderr"], 1)
        # SIGXCPU / SIGKILL: the CPU rlimit (soft / hard); nothing else signals the program.
        if timed_out or code in (128 + signal.SIGXCPU, 128 + signal.SIGKILL):
            verdict = TIMEOUT
        elif code == 0:
            verdict = PASSED
        elif "MemoryError" in stderr or "Cannot allocate memory" in stderr:
            verdict = MEMORY
        else:
            verdict = RUNTIME
        if not self.isolated:  # the process group may still hold children of the program
            _kill_tree(proc)
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
    deadline = time.monotonic() + timeout_s
    while pids := _uid_pids(uid):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"sandbox processes of uid {uid} survive SIGKILL: {pids[:10]}")
        time.sleep(0.01)


def _kill_tree(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _read_capped(path: str, mb: int) -> str:
    with open(path, "rb") as f:
        return f.read(mb << 20).decode("utf-8", errors="replace")


def _clean_env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home}


# ------------------------------------------------------------------------ judging


@dataclasses.dataclass(frozen=True)
class Judgement:
    """Per-test verdicts and the reward of one submission."""

    verdicts: tuple[str, ...]
    reward: float
    details: tuple[str, ...] = ()

    @property
    def passed(self) -> int:
        return sum(v == PASSED for v in self.verdicts)


def _reward(verdicts, partial_credit: bool) -> float:
    if not verdicts:
        return 0.0
    if partial_credit:
        return sum(v == PASSED for v in verdicts) / len(verdicts)
    return float(all(v == PASSED for v in verdicts))


def outputs_match(got: str, want: str) -> bool:
    """Token-wise comparison: whitespace and line breaks are not significant."""
    return got.split() == want.split()


def judge_stdio(
    sandbox: Sandbox,
    program: str,
    tests: list[dict],
    *,
    partial_credit: bool = False,
    stop_at_first_failure: bool = False,
) -> Judgement:
    """Runs a Python program once per test ({"input", "output"}) and compares stdout.

    Reward 1 if every test passes, else 0 (k1.5: binary); `partial_credit` gives the fraction.
    """
    verdicts, details = [], []
    for i, test in enumerate(tests):
        if "input" not in test or "output" not in test:
            raise ValueError(f"test {i} needs 'input' and 'output' fields, has {sorted(test)}")
        r = sandbox.run({"main.py": program}, ["python", "main.py"], test["input"])
        v = r.verdict
        if v == PASSED and not outputs_match(r.stdout, test["output"]):
            v = WRONG
        verdicts.append(v)
        details.append(r.stderr[-300:] if v in (RUNTIME, MEMORY) else "")
        if stop_at_first_failure and v != PASSED:
            verdicts += [v] * (len(tests) - i - 1)
            break
    return Judgement(tuple(verdicts), _reward(verdicts, partial_credit), tuple(details))


_HARNESS = """\
import sys
_token = sys.stdin.readline().strip()
sys.stdin.close()
_tests = {tests!r}
_ns = {{"__name__": "solution"}}
try:
    exec(compile(open("solution.py").read(), "solution.py", "exec"), _ns)
except MemoryError:
    print("K15JAX-LOAD", "memory", flush=True); raise
except BaseException as e:
    print("K15JAX-LOAD", type(e).__name__, flush=True); raise
for _i, _t in enumerate(_tests):
    try:
        exec(compile(_t, f"test_{{_i}}", "exec"), dict(_ns))
        print(f"K15JAX {{_token}} {{_i}} passed", flush=True)
    except AssertionError:
        print(f"K15JAX {{_token}} {{_i}} wrong_answer", flush=True)
    except MemoryError:
        print(f"K15JAX {{_token}} {{_i}} memory", flush=True)
    except BaseException as e:
        print(f"K15JAX {{_token}} {{_i}} runtime_error", type(e).__name__, flush=True)
"""


def judge_function(
    sandbox: Sandbox,
    program: str,
    tests: list[str],
    *,
    partial_credit: bool = False,
) -> Judgement:
    """Loads `program` once and runs each test snippet (asserts) against its namespace.

    A test passes when it runs to the end without an exception (HumanEval style: pass
    `test_code + "\\ncheck(entry_point)"` as one test). Results travel on stdout behind a
    random token the program cannot see before it runs (it reads it from stdin, which is then
    closed), so a solution that calls `exit(0)` early passes nothing. A run that dies
    (timeout, memory) gives its verdict to every test without a result.
    """
    token = secrets.token_hex(16)
    harness = _HARNESS.format(tests=list(tests))
    r = sandbox.run({"solution.py": program, "harness.py": harness}, ["python", "harness.py"],
                    token + "\n")  # fmt: skip
    found: dict[int, str] = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "K15JAX" and parts[1] == token:
            with contextlib.suppress(ValueError):
                if parts[3] in VERDICTS:
                    found.setdefault(int(parts[2]), parts[3])
    fallback = r.verdict if r.verdict in (TIMEOUT, MEMORY) else RUNTIME
    verdicts = [found.get(i, fallback) for i in range(len(tests))]
    return Judgement(tuple(verdicts), _reward(verdicts, partial_credit), (r.stderr[-300:],))


# --------------------------------------------------------- the in-namespace launcher

_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
_MS_NOSUID, _MS_NODEV = 2, 4


def _mount(source, target, fstype, flags, data=None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _jail(spec_path: str) -> None:
    """Sets up the namespace and files, then runs the program as a limited child (PID 1 here)."""
    with open(spec_path) as f:
        spec = json.load(f)
    if spec["isolated"]:
        # Library directories are opened before /tmp is covered: they may live under it.
        libs = {
            dst: os.open(src, os.O_PATH | os.O_DIRECTORY) for dst, src in spec["libraries"].items()
        }
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
        _mount("/", "/", None, _MS_BIND)
        _mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)
        for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
            if os.path.isdir(d):
                size = f"size={spec['tmpfs_mb']}m,mode=1777"
                _mount("tmpfs", d, "tmpfs", _MS_NOSUID | _MS_NODEV, size)
        for dst, fd in libs.items():
            os.makedirs(dst)
            _mount(f"/proc/self/fd/{fd}", dst, None, _MS_BIND | _MS_REC)
            _mount(None, dst, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)
            os.close(fd)
    work = spec["workdir"]
    os.makedirs(work, exist_ok=True)
    for name, text in spec["files"].items():
        if os.path.basename(name) != name:
            raise ValueError(f"file name {name!r} must not contain a directory")
        with open(os.path.join(work, name), "w") as f:
            f.write(text)
    uid = spec["uid"]
    if spec["isolated"]:
        os.chown(work, uid, uid)
        for name in spec["files"]:
            os.chown(os.path.join(work, name), uid, uid)
    os.chdir(work)
    pid = os.fork()
    if pid == 0:
        try:
            _limit_and_exec(spec, work)
        except BaseException as err:  # noqa: BLE001 (report why the program never started)
            os.write(2, f"sandbox: cannot start the program: {err!r}\n".encode())
        os._exit(127)
    # PID 1 of the namespace: when it exits, the kernel kills everything the program left.
    _, status, _ = os.wait4(pid, 0)
    os._exit(
        os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
    )


def _limit_and_exec(spec: dict, work: str) -> None:
    uid = spec["uid"]
    cpu = int(-(-spec["cpu_s"] // 1))
    limits = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, spec["memory_mb"] << 20, spec["memory_mb"] << 20),
        (resource.RLIMIT_NOFILE, spec["max_open_files"], spec["max_open_files"]),
        (resource.RLIMIT_FSIZE, spec["max_output_mb"] << 20, spec["max_output_mb"] << 20),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    if spec["isolated"]:  # counted per uid: only meaningful for the slot's own uid
        limits.append((resource.RLIMIT_NPROC, spec["max_processes"], spec["max_processes"]))
    for which, soft, hard in limits:
        resource.setrlimit(which, (soft, hard))
    if spec["isolated"]:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    os.execve(spec["argv"][0], spec["argv"], _clean_env(work))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--jail":
    _jail(sys.argv[2])
