"""The code reward under attack: each test is a hostile candidate that must earn nothing.

Every attack class of the sandbox issue has at least one test written as the attack itself. A
test asserts the reward the honest program would earn (0 for a wrong one) and, through the
`clean_host` fixture, that the run left nothing on the host: no file of a sandbox uid under the
host's temporary directories, no SysV IPC object, no key in a slot uid's keyring, no process.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import glob
import json
import os
import pathlib
import secrets
import socket
import tempfile
import time

import pytest

from k15jax.rewards import code, sandbox

REASON = sandbox.check_isolation()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no isolation: {REASON}")
CFG = sandbox.SandboxConfig(cpu_s=1, wall_s=3, memory_mb=256, max_output_mb=4, tmpfs_mb=16)
CHECKOUT = pathlib.Path(__file__).parents[1]
SANDBOX_UIDS = range(61000, 63000)  # candidate uids (61000 + slot) and checker uids (62000 + slot)
HOST_DIRS = ("/tmp", "/var/tmp", "/run/lock", "/dev/shm", str(CHECKOUT))
IPC_KEY = 0x4B3135  # the SysV key the IPC attacks use


# ------------------------------------------------------------------ host traces


def _sandbox_pids() -> list[int]:
    pids = []
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            text = pathlib.Path(status).read_text()
        except OSError:
            continue
        uid = int(text.split("\nUid:")[1].split()[0])
        state = text.split("\nState:")[1].split()[0]
        if uid in SANDBOX_UIDS and state != "Z":
            pids.append(int(status.split("/")[2]))
    return pids


def _sandbox_files() -> list[str]:
    """Files and directories owned by a sandbox uid under the host's writable directories."""
    found = []
    for top in HOST_DIRS:
        for root, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d not in (".git", ".venv", "node_modules")]
            for name in dirs + files:
                path = os.path.join(root, name)
                with contextlib.suppress(OSError):
                    if os.lstat(path).st_uid in SANDBOX_UIDS:
                        found.append(path)
    return found


def _sysv_objects() -> list[str]:
    """SysV shared memory segments, message queues and semaphores of a sandbox uid or our key."""
    found = []
    for kind in ("shm", "msg", "sem"):
        lines = pathlib.Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        header = lines[0].split()
        for line in lines[1:]:
            row = dict(zip(header, line.split(), strict=False))
            if int(row["uid"]) in SANDBOX_UIDS or int(row["key"]) == IPC_KEY:
                found.append(f"{kind}: {line}")
    return found


# Reading and clearing another uid's keyring takes a process that becomes that uid. Forking the
# test process for it copies its page tables (gigabytes with an engine loaded: seconds per fork,
# per test); one small helper process forks instead.
_KEYS_HELPER = """
import ctypes, json, os, sys
clear = sys.argv[1] == "clear"
out = {}
for uid in json.loads(sys.argv[2]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            if clear:
                ctypes.CDLL(None).syscall(250, 7, -4)  # keyctl(KEYCTL_CLEAR, KEY_SPEC_USER_KEYRING)
            else:
                os.write(w, open("/proc/keys", "rb").read())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    os.waitpid(pid, 0)
    out[uid] = [line for line in text.splitlines() if " k15jax" in line]
print(json.dumps(out))
"""
KEY_UIDS = (61000, 61001, 62000, 62001)


def _keys(*, clear: bool = False) -> list[str]:
    """Lines of /proc/keys that each of `KEY_UIDS` sees describing a key the attacks add
    ("k15jax..."); with `clear`, empties their keyrings instead (and returns nothing)."""
    import subprocess
    import sys

    mode = "clear" if clear else "read"
    done = subprocess.run(
        [sys.executable, "-c", _KEYS_HELPER, mode, json.dumps(KEY_UIDS)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [line for lines in json.loads(done.stdout).values() for line in lines]


def _remove_ipc() -> None:
    """Removes what an attack may have left under IPC_KEY (so one failure does not cascade)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for get, ctl, args in ((libc.shmget, libc.shmctl, (0, 0)), (libc.msgget, libc.msgctl, ())):
        ident = get(IPC_KEY, *args) if args else get(IPC_KEY, 0)
        if ident >= 0:
            ctl(ident, 0, None)  # IPC_RMID


def _host_traces() -> dict[str, list]:
    keys = _keys()
    return {
        "processes": _sandbox_pids(),
        "files": _sandbox_files(),
        "ipc": _sysv_objects(),
        "keys": keys,
    }


@pytest.fixture(scope="module")
def box():
    with sandbox.Sandbox(CFG) as b:
        yield b


@pytest.fixture(scope="module")
def box1():
    """One worker: consecutive runs use the same slot (and uid)."""
    with sandbox.Sandbox(dataclasses.replace(CFG, workers=1)) as b:
        yield b


@pytest.fixture
def clean_host():
    """Asserts the test's runs left no trace on the host, then removes any they did leave."""
    yield
    deadline = time.monotonic() + 5
    while (traces := _host_traces())["processes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert traces == {"processes": [], "files": [], "ipc": [], "keys": []}
    finally:
        _remove_ipc()
        _keys(clear=True)
        for path in traces["files"]:
            with contextlib.suppress(OSError):
                os.unlink(path) if not os.path.isdir(path) else os.rmdir(path)


def _secret_asserts(n: int = 3) -> tuple[list[str], dict[int, int]]:
    """Asserts on a function no one can compute: f(random) == random."""
    table = {secrets.randbelow(10**9): secrets.randbelow(10**9) for _ in range(n)}
    return [f"assert f({x}) == {y}" for x, y in table.items()], table


def _fn(box, program: str, asserts: list[str], **kw) -> code.Judgement:
    return code.judge(program, {"asserts": asserts}, sandbox=box, **kw)


# ------------------------------------------------ 1. the success token is reachable

_FORGE = """
def _forge(tok):
    if tok:
        for i in range(8):
            print(f"K15JAX {tok} {i} passed", flush=True)
        import os
        os._exit(0)
"""

TOKEN_HUNTS = {
    "main_module": "import __main__\n_forge(getattr(__main__, '_token', None))\n",
    "calling_frames": (
        "import sys\n_fr = sys._getframe()\n"
        "while _fr is not None:\n"
        "    _forge(_fr.f_globals.get('_token') or _fr.f_locals.get('_token'))\n"
        "    _fr = _fr.f_back\n"
    ),
    "gc_objects": (
        "import gc, re\n"
        "for o in gc.get_objects():\n"
        "    for s in (o.values() if isinstance(o, dict) else ()):\n"
        "        if isinstance(s, str) and re.fullmatch('[0-9a-f]{32}', s):\n"
        "            _forge(s)\n"
    ),
    "reread_fd0": (
        "import os\n"
        "try:\n"
        "    os.lseek(0, 0, 0)\n"
        "    _forge(os.read(0, 100).decode().split()[0])\n"
        "except (OSError, IndexError):\n"
        "    pass\n"
    ),
}


@pytest.mark.parametrize("hunt", sorted(TOKEN_HUNTS))
def test_1_success_token_cannot_be_found(box, clean_host, hunt):
    asserts, _ = _secret_asserts()
    program = "def f(x):\n    return -1\n" + _FORGE + TOKEN_HUNTS[hunt]
    j = _fn(box, program, asserts)
    assert j.reward == 0.0 and sandbox.PASSED not in j.verdicts, j


# ------------------------------------------- 2. shared builtins, stdout and harness

REWRITES = {
    "builtins_print": (
        "import builtins\n_p = builtins.print\n"
        "def _print(*a, **k):\n"
        "    _p(*[str(x).replace('wrong_answer', 'passed') for x in a], **k)\n"
        "builtins.print = _print\n"
    ),
    "sys_stdout": (
        "import sys\n"
        "class _W:\n"
        "    def __init__(self, w):\n        self.w = w\n"
        "    def write(self, s):\n"
        "        return self.w.write(s.replace('wrong_answer', 'passed'))\n"
        "    def flush(self):\n        self.w.flush()\n"
        "sys.stdout = _W(sys.stdout)\n"
    ),
    "skip_compile_and_exec": (
        "import builtins\n_c = builtins.compile\n"
        "builtins.compile = lambda src, *a, **k: _c('pass', '<skipped>', 'exec')\n"
        "builtins.exec = lambda *a, **k: None\n"
    ),
    "empty_test_list": (
        "import gc\n"
        "for o in gc.get_objects():\n"
        "    if isinstance(o, list) and o and all(isinstance(t, str) for t in o)"
        " and all('assert' in t for t in o):\n"
        "        o.clear()\n"
        "import __main__\n"
        "for name in ('_tests', 'tests', 'TESTS'):\n"
        "    if isinstance(getattr(__main__, name, None), list):\n"
        "        getattr(__main__, name).clear()\n"
    ),
    "rewrite_output_at_exit": (
        "import atexit, os\n"
        "def _rewrite():\n"
        "    try:\n"
        "        text = open('/proc/self/fd/1').read()\n"
        "        os.lseek(1, 0, 0)\n"
        "        os.write(1, text.replace('wrong_answer', 'passed      ').encode())\n"
        "    except OSError:\n"
        "        pass\n"
        "atexit.register(_rewrite)\n"
    ),
}


@pytest.mark.parametrize("trick", sorted(REWRITES))
def test_2_shared_interpreter_cannot_rewrite_verdicts(box, clean_host, trick):
    asserts, _ = _secret_asserts()
    program = "def f(x):\n    return -1\n" + REWRITES[trick]
    j = _fn(box, program, asserts)
    assert j.reward == 0.0 and sandbox.PASSED not in j.verdicts, j


# ------------------------------------------------------- 3. the tests are visible

LOOKUP = """
import ast, gc, glob, os, re
_table = {}
def _learn(text):
    for a, b in re.findall(r"(?:f|candidate)\\((-?\\d+)\\) == (-?\\d+)", text):
        _table[int(a)] = int(b)
_paths = glob.glob('*') + glob.glob('/proc/*/cmdline') + glob.glob('/proc/*/fd/*')
for top in ('/tmp', '/box', '/dev/shm', '/var'):
    _paths += glob.glob(top + '/**/*', recursive=True)
for path in _paths:
    try:
        _learn(open(path, errors='replace').read())
    except OSError:
        pass
for o in gc.get_objects():
    if isinstance(o, (list, dict, tuple)):
        for s in (o.values() if isinstance(o, dict) else o):
            if isinstance(s, str):
                _learn(s)
def f(x):
    return _table.get(x, -1)
"""


def test_3_tests_are_not_visible_to_the_candidate(box, clean_host):
    asserts, _ = _secret_asserts()
    j = _fn(box, LOOKUP, asserts)
    assert j.reward == 0.0 and j.verdicts == (sandbox.WRONG,) * 3, j


def test_3_humaneval_test_code_is_not_visible(box, clean_host):
    _, table = _secret_asserts()
    test = "def check(candidate):\n" + "".join(
        f"    assert candidate({x}) == {y}\n" for x, y in table.items()
    )
    tests = {"test": test, "entry_point": "f", "prompt": "def f(x):\n    '''Secret.'''\n"}
    j = code.judge(LOOKUP, tests, sandbox=box)
    assert j.reward == 0.0 and j.verdicts == (sandbox.WRONG,), j


# ------------------------------------------------ 4. objects that equal everything

EQUALS_ALL = {
    "eq_always_true": (
        "class _Any:\n"
        "    def __eq__(self, other):\n        return True\n"
        "    __hash__ = object.__hash__\n"
        "def f(x):\n    return _Any()\n"
    ),
    "int_subclass": (
        "class _I(int):\n"
        "    def __eq__(self, other):\n        return True\n"
        "def f(x):\n    return _I(0)\n"
    ),
    "patched_isclose_and_abs": (
        "import builtins, math\n"
        "math.isclose = lambda *a, **k: True\n"
        "builtins.abs = lambda x: 0\n"
        "def f(x):\n    return 123.0\n"
    ),
}


@pytest.mark.parametrize("trick", sorted(EQUALS_ALL))
def test_4_results_cannot_equal_everything(box, clean_host, trick):
    asserts, table = _secret_asserts(2)
    asserts += [f"import math\nassert math.isclose(f({x}), {y / 7})" for x, y in table.items()]
    asserts += [f"assert abs(f({x}) - {y / 7}) < 1e-9" for x, y in table.items()]
    j = _fn(box, EQUALS_ALL[trick], asserts, partial_credit=True)
    assert j.reward == 0.0 and sandbox.PASSED not in j.verdicts, j


# ------------------------------------------- 5. stdin/stdout answers read from the host


def test_5_host_datasets_are_not_readable(box, clean_host):
    secret_in, secret_out = f"K15IN {secrets.token_hex(8)}", secrets.token_hex(8)
    shared = pathlib.Path(tempfile.mkdtemp(prefix="k15jax-dataset-"))
    try:
        shared.chmod(0o755)
        data = shared / "problems.jsonl"
        data.write_text(json.dumps({"input": secret_in, "output": secret_out}) + "\n")
        data.chmod(0o644)
        program = (
            "import json, os, sys\n"
            "want = sys.stdin.read().strip()\n"
            f"tops = [{str(shared)!r}, {str(CHECKOUT / 'tests' / 'data')!r}, '/tmp', '/work']\n"
            "for top in tops:\n"
            "    for root, dirs, files in os.walk(top):\n"
            "        for name in files:\n"
            "            try:\n"
            "                lines = open(os.path.join(root, name)).read().splitlines()\n"
            "            except (OSError, UnicodeDecodeError):\n"
            "                continue\n"
            "            for line in lines:\n"
            "                if want in line:\n"
            "                    print(json.loads(line)['output'])\n"
            "                    sys.exit(0)\n"
            "print('not found')\n"
        )
        j = code.judge_stdio(box, program, [{"input": secret_in, "output": secret_out}])
        assert j.reward == 0.0 and j.verdicts == (sandbox.WRONG,), j
        # The checkout's own problems are not readable either.
        a_plus_b = code.parse_tests(
            json.loads((CHECKOUT / "tests/data/code_problems.jsonl").read_text().splitlines()[0])[
                "answer"
            ]
        )
        reader = f"import os\nprint(len(os.listdir({str(CHECKOUT / 'tests' / 'data')!r})))\n"
        r = box.run({"main.py": reader}, ["python", "main.py"])
        assert r.verdict == sandbox.RUNTIME and r.stdout == "", r
        assert a_plus_b["tests"]
    finally:
        data.unlink()
        shared.rmdir()


# ---------------------------------------------------- 6. escape and persistence


def test_6_host_root_is_neither_writable_nor_readable(box, clean_host):
    marker = f"k15jax-escape-{secrets.token_hex(4)}"
    host_secret = pathlib.Path("/tmp") / f"{marker}-host"
    host_secret.write_text(secrets.token_hex(8))
    host_secret.chmod(0o644)
    targets = [
        "/tmp", "/proc/../tmp", "/tmp/../tmp", "/var/tmp", "/run/lock", "/dev/shm",
        "/proc/self/cwd/../..", str(CHECKOUT), "/",
    ]  # fmt: skip
    program = (
        "import os\n"
        f"for i, d in enumerate({targets!r}):\n"
        "    try:\n"
        f"        with open(os.path.join(d, '{marker}-' + str(i)), 'wb') as f:\n"
        "            f.write(b'x' * (3 << 20))\n"
        "    except OSError:\n"
        "        pass\n"
        "seen = ''\n"
        "for d in ('/tmp', '/proc/../tmp', '/tmp/../tmp', '/proc/1/root/tmp'):\n"
        "    try:\n"
        f"        seen = seen or open(os.path.join(d, '{host_secret.name}')).read()\n"
        "    except OSError:\n"
        "        pass\n"
        "print(seen)\n"
    )
    try:
        j = code.judge_stdio(box, program, [{"input": "", "output": host_secret.read_text()}])
        assert j.reward == 0.0, j
        leaked = [p for d in HOST_DIRS + ("/",) for p in glob.glob(os.path.join(d, marker + "-*"))]
        assert leaked == [str(host_secret)]
    finally:
        host_secret.unlink()
        for p in (p for d in HOST_DIRS + ("/",) for p in glob.glob(os.path.join(d, marker + "-*"))):
            os.unlink(p)


# ------------------------------------------------------- 7. IPC and keyrings

_LIBC = (
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "libc.shmat.restype = ctypes.c_void_p\n"
)

IPC_WRITE = _LIBC + (
    f"shm = libc.shmget({IPC_KEY}, 32 << 20, 0o1666)\n"
    "if shm >= 0:\n"
    "    addr = libc.shmat(shm, None, 0)\n"
    "    ctypes.memset(addr, 0x41, 32 << 20)\n"
    "    ctypes.memmove(addr, SECRET, len(SECRET))\n"
    f"mq = libc.msgget({IPC_KEY}, 0o1666)\n"
    "if mq >= 0:\n"
    "    msg = ctypes.create_string_buffer(8 + len(SECRET))\n"
    "    body = (1).to_bytes(8, 'little') + SECRET\n"
    "    ctypes.memmove(ctypes.addressof(msg), body, len(body))\n"
    "    libc.msgsnd(mq, msg, len(SECRET), 0)\n"
    "libc.syscall(248, b'user', b'k15jax-attack', SECRET, len(SECRET), -4)\n"
    "print('written')\n"
)

IPC_READ = _LIBC + (
    "found = []\n"
    f"shm = libc.shmget({IPC_KEY}, 0, 0)\n"
    "if shm >= 0:\n"
    "    addr = libc.shmat(shm, None, 0)\n"
    "    if addr not in (None, ctypes.c_void_p(-1).value):\n"
    "        found.append(ctypes.string_at(addr, 16).decode())\n"
    f"mq = libc.msgget({IPC_KEY}, 0)\n"
    "if mq >= 0:\n"
    "    buf = ctypes.create_string_buffer(64)\n"
    "    n = libc.msgrcv(mq, buf, 56, 0, 0o4000)\n"
    "    if n > 0:\n"
    "        found.append(buf.raw[8:8 + n].decode())\n"
    "key = libc.syscall(250, 10, -4, b'user', b'k15jax-attack', 0)\n"  # KEYCTL_SEARCH
    "if key > 0:\n"
    "    buf = ctypes.create_string_buffer(64)\n"
    "    n = libc.syscall(250, 11, key, buf, 64)\n"  # KEYCTL_READ
    "    if n > 0:\n"
    "        found.append(buf.raw[:n].decode())\n"
    "print(found[0] if found else 'none')\n"
)


def test_7_ipc_and_keys_do_not_survive_a_run(box1, clean_host):
    secret = secrets.token_hex(8)
    write = f"SECRET = {secret.encode()!r}\n" + IPC_WRITE
    assert box1.run({"main.py": write}, ["python", "main.py"]).stdout.strip() == "written"
    assert _sysv_objects() == []  # nothing stays resident after the writing run
    j = code.judge_stdio(box1, IPC_READ, [{"input": "", "output": secret}])
    assert j.reward == 0.0 and j.verdicts == (sandbox.WRONG,), j


# ----------------------------------------------------- 8. limits per run, not per process

MEMORY_SPLIT = """
import os, time
n, r, w = 6, *os.pipe()
for _ in range(n):
    if os.fork() == 0:
        try:
            block = bytearray(100 << 20)
            for i in range(0, len(block), 4096):
                block[i] = 1
            os.write(w, b'1')
            time.sleep(1.5)
        finally:
            os._exit(0)
got = 0
deadline = time.time() + 2.5
while got < n and time.time() < deadline:
    got += len(os.read(r, 1))
print(got)
"""

CPU_SPLIT = """
import os, time
for _ in range(4):
    if os.fork() == 0:
        t = time.process_time()
        while time.process_time() - t < 0.9:
            pass
        os._exit(0)
done = 0
for _ in range(4):
    _, status = os.wait()
    done += status == 0
print(done)
"""


def test_8_memory_is_limited_per_run(box, clean_host):
    # Six processes of 100 MB at once is 600 MB under memory_mb=256.
    j = code.judge_stdio(box, MEMORY_SPLIT, [{"input": "", "output": "6"}])
    assert j.reward == 0.0, j


def test_8_cpu_time_is_limited_per_run(clean_host):
    # Four processes of 0.9 CPU-s each is 3.6 CPU-s under cpu_s=1 (wall time to spare).
    with sandbox.Sandbox(dataclasses.replace(CFG, wall_s=15)) as box:
        start = time.perf_counter()
        j = code.judge_stdio(box, CPU_SPLIT, [{"input": "", "output": "4"}])
    assert j.reward == 0.0 and j.verdicts == (sandbox.TIMEOUT,), j
    assert time.perf_counter() - start < 10  # stopped by the CPU limit, not the wall


# ---------------------------------------------- 9. one timeout stops the problem


def test_9_a_timeout_stops_the_remaining_tests(box, clean_host):
    tests = [{"input": str(i), "output": str(i)} for i in range(5)]
    start = time.perf_counter()
    j = code.judge_stdio(box, "import time\ntime.sleep(60)\n", tests, partial_credit=True)
    elapsed = time.perf_counter() - start
    assert j.reward == 0.0 and j.verdicts == (sandbox.TIMEOUT,) * 5, j
    assert elapsed < 2 * CFG.wall_s + 2, elapsed


# ------------------------------------------------- 10. inputs and exact labels


def test_10_bad_tests_give_a_clear_error_not_a_crash(box):
    for bad in ({"input": 5, "output": "5"}, {"input": "5", "output": None}, {"input": ["5"]}):
        with pytest.raises(ValueError, match=r"tests\[0\]"):
            code.parse_tests({"tests": [bad]})
    with pytest.raises(ValueError, match="asserts"):
        code.parse_tests({"asserts": "assert f(1) == 1"})
    with pytest.raises(ValueError, match="entry_point"):
        code.parse_tests({"test": "def check(c): pass", "entry_point": 3})


def test_10_lone_surrogates_give_a_verdict(box, clean_host):
    tests = [{"input": "a\ud800b", "output": "x"}, {"input": "1", "output": "\udc80"}]
    j = code.judge_stdio(box, "print(input())\n", tests, partial_credit=True)
    assert j.verdicts == (sandbox.WRONG, sandbox.WRONG), j


@pytest.mark.parametrize(
    "program, verdict",
    [
        ("import sys\nsys.exit(137)\n", sandbox.RUNTIME),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", sandbox.RUNTIME),
        ("import sys\nprint('MemoryError', file=sys.stderr)\nraise ValueError\n", sandbox.RUNTIME),
        ("import sys\nprint('Cannot allocate memory', file=sys.stderr)\nsys.exit(1)\n",
         sandbox.RUNTIME),
        ("x = bytearray(1 << 40)\n", sandbox.MEMORY),
        ("while True:\n    pass\n", sandbox.TIMEOUT),
    ],
)  # fmt: skip
def test_10_verdict_labels_are_exact(box, clean_host, program, verdict):
    j = code.judge_stdio(box, program, [{"input": "", "output": "1"}])
    assert j.verdicts == (verdict,), (j, program)


# ---------------------------------------------------------- every trick at once

TRICKS = (
    "\n".join(REWRITES[k] for k in ("builtins_print", "sys_stdout", "rewrite_output_at_exit"))
    + REWRITES["empty_test_list"]
    + "import builtins, math\nmath.isclose = lambda *a, **k: True\n"
)
FN_TRICKS = "\n".join(TOKEN_HUNTS.values()).replace("_forge(", "_forge2(") + TRICKS


def test_wrapped_correct_earns_what_correct_earns_and_wrapped_wrong_nothing(box, clean_host):
    tests = {"asserts": ["assert f(2) == 4", "assert f(3) == 9", "assert f(-4) == 16"]}
    prelude = _FORGE.replace("_forge", "_forge2") + LOOKUP.replace("def f(x)", "def _g(x)")
    correct = "def f(x):\n    return x * x\n"
    wrong = "def f(x):\n    return x + 2\n"  # right on f(2) only
    plain = {p: code.judge(p, tests, sandbox=box, partial_credit=True) for p in (correct, wrong)}
    assert plain[correct].reward == 1.0 and plain[wrong].reward == pytest.approx(1 / 3)
    for program in (correct, wrong):
        wrapped = prelude + program + FN_TRICKS
        for partial in (False, True):
            j = code.judge(wrapped, tests, sandbox=box, partial_credit=partial)
            want = code.judge(program, tests, sandbox=box, partial_credit=partial).reward
            assert j.reward == want, (program, partial, j)
    # stdin/stdout: the same tricks around a correct and a wrong a+b
    stdio = [{"input": "2 3", "output": "5"}, {"input": "-1 1", "output": "0"}]
    for program, want in (("a, b = map(int, input().split())\nprint(a + b)\n", 1.0),
                          ("a, b = map(int, input().split())\nprint(a * b)\n", 0.0)):  # fmt: skip
        j = code.judge_stdio(box, LOOKUP.replace("def f(x)", "def _g(x)") + program + TRICKS,
                                stdio)  # fmt: skip
        assert j.reward == want, (program, j)


# ------------------------------------------------------------------- the network


def test_network_namespace_has_only_loopback_and_cannot_reach_the_host(box, clean_host):
    """Only this machine's loopback is ever contacted (by the host and by the program)."""
    servers = []
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with contextlib.suppress(OSError):
            s = socket.socket(family)
            s.bind((addr, 0))
            s.listen(4)
            servers.append((s, addr, s.getsockname()[1]))
    program = (
        "import socket\n"
        "names = sorted(n for _, n in socket.if_nameindex())\n"
        "reached = 0\n"
        f"for addr, port in {[(a, p) for _, a, p in servers]!r}:\n"
        "    try:\n"
        "        socket.create_connection((addr, port), timeout=1).close()\n"
        "        reached += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "print(names, reached)\n"
    )
    r = box.run({"main.py": program}, ["python", "main.py"])
    for s, _, _ in servers:
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.accept()  # no connection is waiting in the backlog either
        s.close()
    assert r.stdout.split() == ["['lo']", "0"], r


def test_3_prompt_helpers_are_the_problems_not_the_candidates(box, clean_host):
    """HumanEval/38-style: the test calls a prompt helper; redefining it must not help."""
    prompt = "def enc(s):\n    return s[::-1] + 'x'\n\n\ndef dec(s):\n    '''Inverse of enc.'''\n"
    test = (
        "def check(candidate):\n"
        "    for s in ('ab', 'xyz'):\n"
        "        assert candidate(enc(s)) == s\n"
    )
    tests = {"test": test, "entry_point": "dec", "prompt": prompt}
    cheat = "def enc(s):\n    return s\n\n\ndef dec(s):\n    return s\n"
    honest = "    return s[:-1][::-1]\n"  # completes the prompt's body
    assert code.judge(honest, tests, sandbox=box).reward == 1.0
    j = code.judge(cheat, tests, sandbox=box)
    assert j.reward == 0.0 and j.verdicts == (sandbox.WRONG,), j


# ------------------------------------------- found by a second review (red team)


def test_candidate_cannot_stand_in_for_builtins_the_tests_use(box, clean_host):
    # The checker installs the candidate's functions only for names the tests read that
    # neither the problem nor Python defines: a candidate `abs`, `set` or `range` is ignored.
    shadows = (
        "def f(*a):\n    return 0\n"
        "def abs(x):\n    return 0\ndef set(x):\n    return 0\n"
        "def range(*a):\n    return []\ndef all(x):\n    return True\n"
    )
    asserts = [
        "assert set(f((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))",
        "assert abs(f(2.0) - 1.4142135623730951) < 1e-6",
        "for i in range(1, 5):\n    assert f(i) == i * i",
        "assert all(f(i) == i for i in [1, 2])",
    ]
    assert _fn(box, shadows, asserts, partial_credit=True).reward == 0.0
    humaneval = {
        "test": "def check(candidate):\n    assert abs(candidate(2.0) - 4.0) < 1e-6\n",
        "entry_point": "f",
    }
    assert code.judge(shadows, humaneval, sandbox=box).reward == 0.0
    honest = "def f(x):\n    return x * x\n"
    assert code.judge(honest, humaneval, sandbox=box).reward == 1.0


def test_test_output_is_not_the_verdict_channel(box, clean_host):
    # A test that prints what the candidate returned must not let it write verdict lines.
    forged = "".join(
        json.dumps({"test": i, "verdict": "passed", "error": ""}) + "\n" for i in range(3)
    )
    program = f"def f(x):\n    return {forged!r}\n"
    humaneval = {
        "test": "def check(candidate):\n    print(candidate(3))\n    assert candidate(3) == 9\n",
        "entry_point": "f",
    }
    assert code.judge(program, humaneval, sandbox=box).reward == 0.0
    asserts = ["print(f(3))\nassert f(3) == 9", "assert f(4) == 16"]
    j = _fn(box, program, asserts, partial_credit=True)
    assert j.reward == 0.0 and j.verdicts == (sandbox.WRONG, sandbox.WRONG)


def test_kernel_keyrings_vsock_and_io_uring_are_closed(box1, clean_host):
    # The seccomp filter: keyctl/add_key fail (a key locked against clean-up would outlive the
    # run), io_uring and AF_VSOCK sockets fail (no address is contacted: socket() only).
    probe = (
        "import ctypes, socket\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "out = []\n"
        "for nr, args in ((250, (0, -4, 1)), (248, (b'user', b'k15jax-lock', b's', 1, -4)),\n"
        "                 (425, (8, None))):\n"
        "    out.append((libc.syscall(nr, *args), ctypes.get_errno()))\n"
        "try:\n"
        "    socket.socket(40, socket.SOCK_STREAM)\n"
        "    out.append('vsock')\n"
        "except OSError as e:\n"
        "    out.append(e.errno)\n"
        "print(out)\n"
    )
    r = box1.run({"main.py": probe}, ["python", "main.py"])
    assert r.stdout.strip() == "[(-1, 1), (-1, 1), (-1, 1), 1]", r
    # A plain program still runs (the filter allows what Python needs).
    r = box1.run(
        {"main.py": "import socket, threading\nprint(sum(range(10)))\n"}, ["python", "main.py"]
    )
    assert r.stdout == "45\n"


def test_exceptions_that_steer_control_flow_arrive_as_runtime_errors(box, clean_host):
    # StopIteration from the candidate would end a map() early: all(map(...)) of nothing.
    program = "def f(x):\n    raise StopIteration\n"
    asserts = ["assert all(map(lambda p: f(p[0]) == p[1], [(1, 2), (3, 4)]))"]
    j = _fn(box, program, asserts)
    assert j.reward == 0.0 and j.verdicts == (sandbox.RUNTIME,)


def test_big_integers_cross_the_wire(box, clean_host):
    # Past 4300 digits str(int) fails; a correct answer must still pass.
    program = "def f(n):\n    return 10 ** n\n"
    j = _fn(box, program, ["assert f(5000) == 10 ** 5000", "assert f(2) == 100"])
    assert j.reward == 1.0


def test_code_block_extraction_and_test_parsing_are_safe_on_hostile_text():
    # Long unclosed fences: found in one pass (the regular expression it replaces backtracked
    # quadratically on them, in the judge's own process).
    assert code.extract_code("```" + "a" * 200_000) is None
    assert code.extract_code("```\n" * 50_001) == ""
    assert code.extract_code("x\n```py extra\nA\n```\n```c\nB\n```\n```\nC\n```") == "C\n"
    assert code.extract_code("```python\nA\n```\n```js\nB\n```") == "A\n"
    with pytest.raises(ValueError, match="nest too deeply"):
        code.parse_tests("[" * 100_000)
    with pytest.raises(ValueError, match="nest too deeply"):
        code.parse_tests('{"asserts": ' + "[" * 100_000)


def test_a_run_in_another_sandbox_does_not_use_up_this_ones_processes(box1, clean_host):
    # Two Sandboxes (say two RL runs on one host) share slot uids. With per-run cgroups, a run
    # holding its process limit in one must not stop a thread starting in the other.
    import threading

    if box1.limits != "cgroups":
        pytest.skip("per-uid rlimits are the documented fallback without cgroups")
    hog = (
        "import os, time\n"
        "for _ in range(14):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(2.5)\n"
        "        os._exit(0)\n"
        "print('forked', flush=True)\n"
        "time.sleep(2.5)\n"
    )
    threaded = (
        "import threading\nout = []\n"
        "t = threading.Thread(target=lambda: out.append(int(input()) * 2))\n"
        "t.start()\nt.join()\nprint(out[0])\n"
    )
    with sandbox.Sandbox(dataclasses.replace(CFG, workers=1)) as other:
        hogging = threading.Thread(target=lambda: other.run({"h.py": hog}, ["python", "h.py"]))
        hogging.start()
        time.sleep(0.8)
        j = code.judge_stdio(box1, threaded, [{"input": "21", "output": "42"}])
        hogging.join()
    assert j.reward == 1.0, j


# -------------------------------------------- 11. kernel resources a run can grow
# Each attack grows one kernel-side resource as far as it can and prints how far it got; the
# "expected output" is the count the attack would reach without a cap, so the reward must be 0,
# and a second run checks the count stays under the cap.


def _grow(box, program: str, uncapped: int) -> int:
    """Judges `program` (which prints one count) against `uncapped`; returns the count."""
    j = code.judge_stdio(box, program, [{"input": "", "output": str(uncapped)}])
    assert j.reward == 0.0 and j.verdicts[0] != sandbox.PASSED, j
    r = box.run({"main.py": program}, ["python", "main.py"])
    assert r.verdict == sandbox.PASSED, r
    return int(r.stdout.split()[-1])


INODES = """
import os
n = 0
for top in ("/tmp", "/dev/shm"):
    try:
        for i in range(20000):
            open(f"{top}/f{i}", "w").close()
            n += 1
    except OSError:
        pass
print(n)
"""


def test_11_tmpfs_inodes_are_capped(box, clean_host):
    # Empty files cost no bytes (size= does not see them) but one inode each, kernel memory.
    assert _grow(box, INODES, 40000) <= 2 * CFG.tmpfs_inodes
    with pytest.raises(ValueError, match="tmpfs_inodes=0 must be > 0"):
        sandbox.SandboxConfig(tmpfs_inodes=0)


USER_NAMESPACE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
tries = {"user+mount": 0x10000000 | 0x20000, "user": 0x10000000, "mount": 0x20000}
made = []
for name, flags in tries.items():
    if os.fork() == 0:  # each try in a child of its own: a namespace, once made, stays
        ok = libc.unshare(flags) == 0
        if ok and flags & 0x20000:
            ok = libc.mount(b"none", b"/tmp", b"tmpfs", 0, b"size=2g,nr_inodes=0") == 0
        os._exit(0 if ok else 1)
    _, status = os.wait()
    made += [name] if status == 0 else []
print(made, file=sys.stderr)
print(len(made))
"""


def test_11_no_user_namespace_and_no_mount_of_its_own(box, clean_host):
    # Any uid may make a user namespace; root there may mount an uncapped tmpfs in a mount
    # namespace of its own. The launcher puts each program in a user namespace where no
    # namespace may be made (max_*_namespaces = 0).
    assert _grow(box, USER_NAMESPACE, 3) == 0


INOTIFY = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
groups = []
while len(groups) < 40 and (fd := libc.inotify_init1(0)) >= 0:
    groups.append(fd)
watches = set()
for root, dirs, files in os.walk("/usr"):
    for name in dirs + files:
        fd = groups[len(watches) % len(groups)]
        wd = libc.inotify_add_watch(fd, os.path.join(root, name).encode(), 0x2)
        if wd < 0 and ctypes.get_errno() == 28:  # ENOSPC: the watch limit
            break
        watches.add((fd, wd)) if wd >= 0 else None
    else:
        continue
    break
print(len(groups), len(watches))
"""


def test_11_inotify_watches_are_capped_per_run(box, clean_host):
    # A watch pins kernel memory per inode: one per file of /usr (137k here; the host-wide
    # per-uid limit, fs.inotify.max_user_watches, is 192k) in under a CPU-second.
    j = code.judge_stdio(box, INOTIFY, [{"input": "", "output": "40 100000"}])
    assert j.reward == 0.0, j
    groups, watches = map(int, box.run({"main.py": INOTIFY}, ["python", "main.py"]).stdout.split())
    assert groups <= 8 and watches <= 1024


MEMLOCK = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
locked = 0
for _ in range(16):  # 1 MiB each, MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED, then mlock
    p = libc.mmap(None, 1 << 20, 3, 0x22 | 0x2000, -1, 0)
    if p in (None, ctypes.c_void_p(-1).value):
        p = libc.mmap(None, 1 << 20, 3, 0x22, -1, 0)
        if libc.mlock(ctypes.c_void_p(p), ctypes.c_size_t(1 << 20)) != 0:
            break
    locked += 1
print(locked)
"""


def test_11_no_memory_is_locked(box, clean_host):
    # Locked pages cannot be reclaimed or swapped; the host's RLIMIT_MEMLOCK (8 MiB here,
    # unlimited for root on some hosts) was inherited.
    assert _grow(box, MEMLOCK, 16) == 0


SYSV_IPC = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
msg = ctypes.create_string_buffer(8 + 8192)
msg[0] = 1
queues = segments = sets = stored = 0
while queues < 200 and (q := libc.msgget(0, 0o1600)) >= 0:
    queues += 1
    while libc.msgsnd(q, msg, 8192, 0o4000) == 0:
        stored += 8192
while segments < 200 and libc.shmget(0, 1 << 20, 0o1600) >= 0:
    segments += 1
while sets < 200 and libc.semget(0, 8, 0o1600) >= 0:
    sets += 1
print(queues, stored >> 10, segments, sets, queues + segments + sets)
"""


def test_11_sysv_ipc_is_capped_in_the_runs_namespace(box, clean_host):
    # A fresh IPC namespace allows 32,000 queues of 16 KiB (512 MiB of kernel memory), 4,096
    # shared memory segments and 32,000 semaphore sets; the launcher lowers them in its own.
    host = [pathlib.Path(f"/proc/sys/kernel/{n}").read_text() for n in ("msgmni", "shmmni", "sem")]
    j = code.judge_stdio(box, SYSV_IPC, [{"input": "", "output": "200 3200 200 200 600"}])
    assert j.reward == 0.0, j
    r = box.run({"main.py": SYSV_IPC}, ["python", "main.py"])
    queues, stored_kib, segments, sets, _ = map(int, r.stdout.split())
    assert queues <= 16 and stored_kib <= 16 * 16 and segments <= 16 and sets <= 16, r
    assert host == [
        pathlib.Path(f"/proc/sys/kernel/{n}").read_text() for n in ("msgmni", "shmmni", "sem")
    ]  # the host's own limits are untouched


POSIX_MQUEUE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
n = 0
while n < 300 and libc.mq_open(f"/q{n}".encode(), os.O_CREAT | os.O_RDWR, 0o600, None) >= 0:
    n += 1
print(n)
"""


def test_11_posix_queues_are_capped(box, clean_host):
    # RLIMIT_MSGQUEUE (800 KiB: 9 queues of the default 10 x 8 KiB) is set, not inherited.
    assert _grow(box, POSIX_MQUEUE, 300) <= 16


SIGNALS = """
import os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
for _ in range(5000):
    os.kill(os.getpid(), signal.SIGRTMIN)  # real-time signals queue, one kernel object each
status = open("/proc/self/status").read()
print(int(status.split("SigQ:")[1].split("/")[0]))  # signals queued for this uid
"""


def test_11_queued_signals_are_capped(box, clean_host):
    # RLIMIT_SIGPENDING was inherited from the host (96k here).
    assert _grow(box, SIGNALS, 5000) <= 256


FILE_DESCRIPTORS = """
import os, socket, time
r, w = os.pipe()
for _ in range(30):  # more processes than the run may have: fork fails past the pids cap
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        held, queued = [], 0
        try:
            while True:  # a pipe, a socket pair and an eventfd at a time, data in the sockets
                held += [*os.pipe(), os.eventfd(0)]
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                held += [a, b]
                a.setblocking(False)
                try:
                    while True:
                        queued += a.send(bytes(65000))
                except OSError:
                    pass
        except OSError:
            pass
        os.write(w, f"{len(held)} {queued >> 20}\\n".encode())
        time.sleep(1.5)
        os._exit(0)
time.sleep(1.2)
os.close(w)
rows = [line.split() for line in os.read(r, 1 << 16).decode().splitlines()]
print(len(rows), sum(int(fds) for fds, _ in rows), sum(int(mb) for _, mb in rows))
"""


def test_11_file_descriptors_and_their_buffers_are_capped_per_run(box, clean_host):
    # Pipes, sockets and eventfds are capped by RLIMIT_NOFILE per process times the pids cap
    # (max_processes + 4 tasks: the launcher's, the checker's slack);
    # the data queued in socket buffers is kernel memory charged to the run's memory cgroup.
    if box.limits != "cgroups":
        pytest.skip("per-run memory and process caps need the cgroups")
    j = code.judge_stdio(box, FILE_DESCRIPTORS, [{"input": "", "output": "30 20000 2000"}])
    assert j.reward == 0.0, j
    r = box.run({"main.py": FILE_DESCRIPTORS}, ["python", "main.py"])
    procs, fds, queued_mb = map(int, r.stdout.split())
    assert procs + 1 <= CFG.max_processes + 4 and fds <= procs * CFG.max_open_files, r
    assert queued_mb <= CFG.memory_mb, r


THREADS = """
import threading
threading.stack_size(1 << 16)
stop, n = threading.Event(), 0
try:
    while n < 1000:
        threading.Thread(target=stop.wait, daemon=True).start()
        n += 1
except RuntimeError:
    pass
stop.set()
print(n)
"""


def test_11_threads_are_capped_per_run(box, clean_host):
    # Each thread is a task of the pids cgroup (max_processes + 4 for the launcher, all uids).
    if box.limits != "cgroups":
        pytest.skip("the per-run task cap is the pids cgroup")
    assert _grow(box, THREADS, 1000) <= CFG.max_processes + 4
