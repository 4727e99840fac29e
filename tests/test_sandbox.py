"""The code sandbox and the code reward: verdicts, hostile programs, no leftovers."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import secrets
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from k15jax.data import prompt_sets
from k15jax.rewards import code, sandbox, scoring

DATA = pathlib.Path(__file__).parent / "data"
REASON = sandbox.check_isolation()
needs_isolation = pytest.mark.skipif(REASON is not None, reason=f"no isolation: {REASON}")
CFG = sandbox.SandboxConfig(cpu_s=1, wall_s=3, memory_mb=256, max_output_mb=4, tmpfs_mb=16)


def _sandbox_pids() -> list[int]:
    """PIDs of live processes owned by a sandbox uid."""
    pids = []
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            text = pathlib.Path(status).read_text()
        except OSError:
            continue
        uid = int(text.split("\nUid:")[1].split()[0])
        state = text.split("\nState:")[1].split()[0]
        if sandbox._UID_BASE <= uid < sandbox._CHECKER_UID_BASE + 1000 and state != "Z":
            pids.append(int(status.split("/")[2]))
    return pids


def _leftover_dirs() -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), "k15jax-sandbox-*"))


@pytest.fixture(scope="module")
def box():
    if REASON is not None:
        pytest.skip(f"no isolation: {REASON}")
    before = set(_leftover_dirs())
    with sandbox.Sandbox(CFG) as b:
        yield b
    assert _sandbox_pids() == []  # nothing a program started survives the suite
    assert set(_leftover_dirs()) == before  # every run's host directory was removed


def _problems() -> dict[str, dict]:
    rows = [json.loads(line) for line in (DATA / "code_problems.jsonl").read_text().splitlines()]
    return {r["id"]: r for r in rows}


def _fenced(program: str) -> str:
    return f"Here is my solution.\n```python\n{program}```\nDone."


@needs_isolation
@pytest.mark.parametrize("pid", ["a_plus_b", "sort_numbers", "is_palindrome"])
def test_shipped_problems_get_the_right_verdicts(box, pid):
    problem = _problems()[pid]
    tests = code.parse_tests(problem["answer"])
    n = len(tests["tests"]) if "tests" in tests else 1
    expect = {
        "correct": sandbox.PASSED,
        "wrong": sandbox.WRONG,
        "crashing": sandbox.RUNTIME,
        "slow": sandbox.TIMEOUT,
    }
    for kind, program in problem["solutions"].items():
        r, info = code.reward(problem["prompt"], _fenced(program), problem["answer"], sandbox=box)
        assert info["verdicts"] == (expect[kind],) * n, kind
        assert r == (1.0 if kind == "correct" else 0.0), kind


@needs_isolation
def test_partial_credit_and_mixed_verdicts(box):
    tests = code.parse_tests(_problems()["a_plus_b"]["answer"])
    # Correct except when the sum is 0 (one of four tests).
    program = "a, b = map(int, input().split())\nprint(a + b if a + b else 1)\n"
    j = code.judge(program, tests, sandbox=box, partial_credit=True)
    assert j.verdicts == (sandbox.PASSED, sandbox.WRONG, sandbox.PASSED, sandbox.PASSED)
    assert j.reward == 0.75
    assert code.judge(program, tests, sandbox=box).reward == 0.0


@needs_isolation
def test_function_tests_cannot_be_faked_by_exiting_early(box):
    tests = {"asserts": ["assert f(2) == 4", "assert f(3) == 9"]}
    assert code.judge("def f(x):\n    return x * x\n", tests, sandbox=box).reward == 1.0
    for cheat in (
        "import os\nos._exit(0)\n",
        "import sys\nsys.exit(0)\n",
        "def f(x):\n    return x\nimport os\nos._exit(0)\n",
        # prints lines shaped like the harness's, without its token
        "print('K15JAX x 0 passed')\nprint('K15JAX x 1 passed')\nraise SystemExit\n",
    ):
        j = code.judge(cheat, tests, sandbox=box)
        assert j.reward == 0.0 and sandbox.PASSED not in j.verdicts, cheat


@needs_isolation
def test_code_prompt_set_loads_and_scores_through_the_loop_reward(box):
    problems = {p.id: p for p in prompt_sets.load_jsonl(str(DATA / "code_problems.jsonl"))}
    raw = _problems()
    reward = scoring.reward_fn("code", sandbox=box)  # the reward the run builds
    for pid, p in problems.items():
        good = _fenced(raw[pid]["solutions"]["correct"])
        assert reward(p.prompt, good, p.answer)[0] == 1.0
        assert reward(p.prompt, _fenced(raw[pid]["solutions"]["wrong"]), p.answer)[0] == 0.0


def test_extract_code_and_bad_tests():
    text = "```python\nprint(1)\n```\nthen\n```\nprint(2)\n```\n```text\nnot code\n```"
    assert code.extract_code(text) == "print(2)\n"
    assert code.extract_code("no code here") is None
    with pytest.raises(ValueError, match="not valid JSON"):
        code.parse_tests("{tests: 1}")
    with pytest.raises(ValueError, match=r"tests\[1\] must have 'input' and 'output'"):
        code.parse_tests({"tests": [{"input": "", "output": ""}, {"input": ""}]})
    with pytest.raises(ValueError, match="entry_point"):
        code.parse_tests({"test": "def check(c): pass"})


@needs_isolation
def test_no_code_block_scores_zero(box):
    r, info = code.reward("p", "I think the answer is 3.", {"tests": []}, sandbox=box)
    assert r == 0.0 and info["reason"] == "no code block"


# ------------------------------------------------------------------ hostile programs


def _judge(box, program: str, expected: str, stdin: str = "") -> code.Judgement:
    return code.judge_stdio(box, program, [{"input": stdin, "output": expected}])


@needs_isolation
def test_infinite_loop_and_sleep_time_out(box):
    assert _judge(box, "while True:\n    pass\n", "1").verdicts == (sandbox.TIMEOUT,)
    j = _judge(box, "import time\ntime.sleep(60)\nprint(1)\n", "1")
    assert j.verdicts == (sandbox.TIMEOUT,) and j.reward == 0.0


@needs_isolation
def test_fork_bomb_is_contained(box):
    # every process forks until the per-uid process limit, then spins
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    j = _judge(box, bomb, "1")
    assert j.reward == 0.0
    assert _sandbox_pids() == []
    # The host can still start processes.
    assert subprocess.run(["true"]).returncode == 0


@needs_isolation
def test_huge_allocation_is_a_memory_verdict(box):
    j = _judge(box, "x = bytearray(50 * 2**30)\nprint(1)\n", "1")
    assert j.verdicts == (sandbox.MEMORY,) and j.reward == 0.0


@needs_isolation
def test_huge_file_is_stopped_and_leaves_nothing(box):
    free = os.statvfs(tempfile.gettempdir()).f_bavail
    program = "f = open('big', 'wb')\nfor _ in range(10240):\n    f.write(b'x' * 2**20)\nprint(1)\n"
    j = _judge(box, program, "1")
    assert j.verdicts == (sandbox.RUNTIME,) and j.reward == 0.0
    # Neither the file nor its blocks are left on the host (allow unrelated churn: 64 MB).
    blocks = os.statvfs(tempfile.gettempdir()).f_frsize
    assert (free - os.statvfs(tempfile.gettempdir()).f_bavail) * blocks < 64 << 20


@needs_isolation
def test_huge_stdout_is_cut(box):
    j = _judge(box, "while True:\n    print('x' * 10000)\n", "x")
    assert j.reward == 0.0 and j.verdicts[0] in (sandbox.RUNTIME, sandbox.TIMEOUT)


@needs_isolation
def test_writes_outside_the_working_directory_do_not_land(box, tmp_path):
    targets = [tmp_path / "pwned", pathlib.Path(__file__).parent / "pwned", pathlib.Path("/pwned")]
    program = (
        "ok = 0\n"
        f"for p in {[str(t) for t in targets]!r}:\n"
        "    try:\n"
        "        open(p, 'w').write('x')\n"
        "        ok += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "print(ok)\n"
    )
    _judge(box, program, "0")
    assert not any(t.exists() for t in targets)


@needs_isolation
def test_parent_environment_is_not_readable(box, monkeypatch):
    secret = secrets.token_hex(8)
    monkeypatch.setenv("K15JAX_TEST_SECRET", secret)
    program = (
        "import glob, os\n"
        "found = os.environ.get('K15JAX_TEST_SECRET', '')\n"
        "for p in glob.glob('/proc/*/environ'):\n"
        "    try:\n"
        "        for kv in open(p, 'rb').read().split(b'\\0'):\n"
        "            if kv.startswith(b'K15JAX_TEST_SECRET='):\n"
        "                found = kv.split(b'=', 1)[1].decode()\n"
        "    except OSError:\n"
        "        pass\n"
        "print(found)\n"
    )
    # The program passes only if it found the secret: the reward is the leak detector.
    assert _judge(box, program, secret).reward == 0.0


@needs_isolation
def test_no_network(box):
    """Only loopback addresses are used: the host's own server must be unreachable."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    program = (
        "import socket\n"
        "got = [n for _, n in socket.if_nameindex()]\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "    got.append('connected')\n"
        "except OSError:\n"
        "    pass\n"
        "print(*got)\n"
    )
    j = _judge(box, program, "lo")
    server.settimeout(0.1)
    with pytest.raises(OSError):
        server.accept()  # nothing ever connected
    server.close()
    assert j.reward == 1.0  # only `lo`, and the connection failed inside the sandbox


@needs_isolation
def test_cannot_kill_the_parent_or_other_processes(box):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        program = (
            "import os, signal\n"
            "killed = 0\n"
            f"for pid in (os.getppid(), {os.getpid()}, {victim.pid}, -1, 1):\n"
            "    try:\n"
            "        os.kill(pid, signal.SIGKILL)\n"
            "        killed += 1\n"
            "    except OSError:\n"
            "        pass\n"
            "print(killed)\n"
        )
        j = _judge(box, program, "0")
        assert victim.poll() is None  # still running
        assert j.verdicts == (sandbox.PASSED,)  # every kill was refused
    finally:
        victim.kill()
        victim.wait()


@needs_isolation
def test_spawned_processes_do_not_outlive_the_program(box):
    marker = str(3000 + secrets.randbelow(1000))
    program = (
        "import os, subprocess\n"
        f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        f"    os.execvp('sleep', ['sleep', '{marker}'])\n"
        "print(1)\n"
    )
    j = _judge(box, program, "1")
    assert j.reward == 1.0  # it did its job; what it left behind is gone
    alive = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if pathlib.Path(cmdline).read_bytes() == f"sleep\0{marker}\0".encode():
                alive.append(cmdline)
        except OSError:
            pass
    assert alive == []


@needs_isolation
def test_runs_in_parallel_on_the_pool(box):
    programs = [f"print({i} * {i})\n" for i in range(8)]
    results = box.map(lambda p: box.run({"main.py": p}, ["python", "main.py"]), programs)
    assert [r.stdout.strip() for r in results] == [str(i * i) for i in range(8)]


def test_refuses_without_isolation_unless_opted_in(monkeypatch):
    monkeypatch.setattr(sandbox, "check_isolation", lambda: "test: no namespaces")
    with pytest.raises(sandbox.SandboxUnavailable, match="isolation='auto'"):
        sandbox.Sandbox(CFG)
    with pytest.raises(ValueError, match="isolation='none'"):
        sandbox.SandboxConfig(isolation="none")
    with sandbox.Sandbox(sandbox.SandboxConfig(isolation="auto", cpu_s=1, wall_s=3)) as weak:
        assert not weak.isolated
        j = code.judge_stdio(weak, "print(int(input()) * 2)\n", [{"input": "4", "output": "8"}])
        assert j.reward == 1.0
        loop = code.judge_stdio(weak, "while True:\n    pass\n", [{"input": "", "output": ""}])
        assert loop.verdicts == (sandbox.TIMEOUT,)


@needs_isolation
def test_libraries_under_tmp_are_readable_not_writable(box, tmp_path):
    lib = tmp_path / "mylib"  # under /tmp, which the sandbox covers with its own tmpfs
    lib.mkdir()
    lib.chmod(0o755)
    tmp_path.chmod(0o700)  # not even traversable by other uids on the host
    (lib / "helper.py").write_text("def triple(x):\n    return 3 * x\n")
    (lib / "helper.py").chmod(0o644)
    seen = box.library_path("mylib", str(lib))
    program = (
        f"import sys\nsys.path.append({seen!r})\nimport helper\n"
        "print(helper.triple(int(input())))\n"
        f"try:\n    open({seen!r} + '/x', 'w')\n    print('wrote')\nexcept OSError:\n    pass\n"
    )
    r = box.run({"main.py": program}, ["python", "main.py"], "5", libraries={"mylib": str(lib)})
    assert r.stdout.split() == ["15"], r.stderr
    assert not (lib / "x").exists()
    with pytest.raises(ValueError, match="identifier"):
        box.run({"main.py": ""}, ["python", "main.py"], libraries={"a/b": str(lib)})


def test_outputs_match_on_ascii_whitespace_only():
    assert code.outputs_match("1\t2\r\n\n3 \x0b\x0c", "1 2 3")
    assert not code.outputs_match("1\u00a02", "1 2")  # no-break space is part of a token
    assert not code.outputs_match("1\u20282", "1\n2")  # so is the line separator
    assert not code.outputs_match("1\u30002", "1 2")
    assert code.output_tokens(" a  b\n") == ["a", "b"]


def test_wire_round_trips_plain_data_and_refuses_the_rest():
    value = [1, -(2**80), 0.1, float("inf"), 2j, "s\ud800", b"\x00", None, True, (1,), {3},
             frozenset({4}), {"k": [1.5], 2: (None,)}]  # fmt: skip
    back = sandbox.wire.decode(json.loads(json.dumps(sandbox.wire.encode(value))))
    assert back == value and [type(v) for v in back] == [type(v) for v in value]

    class Int(int):
        pass

    for bad in (Int(1), object(), [lambda: 0], {"k": Int(2)}):
        with pytest.raises(sandbox.wire.Unencodable):
            sandbox.wire.encode(bad)
    for forged in (5, 1.5, ["i", 5], ["x", "1"], ["l", "abc"], ["d", [[1]]], {"i": "1"}):
        with pytest.raises(ValueError):
            sandbox.wire.decode(forged)


@needs_isolation
def test_function_tests_see_exceptions_and_plain_results(box):
    program = (
        "def f(x):\n"
        "    if x < 0:\n"
        "        raise ValueError('negative')\n"
        "    return {'sq': x * x, 'half': x / 2, 'set': {x}}\n"
    )
    tests = [
        "assert f(4) == {'sq': 16, 'half': 2.0, 'set': {4}}",
        "try:\n    f(-1)\n    assert False\nexcept ValueError:\n    pass",
        "assert f(4)['sq'] == 17",
        "f(-1)",
        "assert g(1) == 1",
    ]
    j = code.judge_function(box, program, tests, partial_credit=True)
    assert j.verdicts == (sandbox.PASSED, sandbox.PASSED, sandbox.WRONG, sandbox.RUNTIME,
                          sandbox.RUNTIME)  # fmt: skip
    load_error = code.judge_function(box, "raise KeyError\n", ["assert f(1) == 1"])
    assert load_error.verdicts == (sandbox.RUNTIME,)


@needs_isolation
def test_the_candidate_sees_only_its_own_processes(box):
    program = "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
    r = box.run({"main.py": program}, ["python", "main.py"])
    assert r.stdout.strip() == "[2]", r  # PID 1, the launcher, runs as root: hidden


@needs_isolation
def test_a_problem_has_a_wall_budget():
    cfg = dataclasses.replace(CFG, problem_wall_s=2.0, workers=1)
    tests = [{"input": str(i), "output": str(i)} for i in range(12)]
    with sandbox.Sandbox(cfg) as b:
        start = time.perf_counter()
        j = code.judge_stdio(b, "import time\ntime.sleep(0.5)\nprint(input())\n", tests)
    assert j.verdicts[0] == sandbox.PASSED and j.verdicts[-1] == sandbox.TIMEOUT, j
    assert time.perf_counter() - start < 2.0 + CFG.wall_s + 1  # one run past the budget at most


@needs_isolation
def test_without_cgroups_the_rlimits_still_judge():
    # A wall limit well above the CPU limit: the loop must be stopped by RLIMIT_CPU, and on a
    # loaded machine (an engine busy beside the suite) a 3 s wall limit cut a plain run short.
    cfg = dataclasses.replace(CFG, cgroups=False, workers=1, wall_s=10)
    with sandbox.Sandbox(cfg) as b:
        assert b.limits == "rlimits"
        assert _judge(b, "print(int(input()) + 1)\n", "3", "2").reward == 1.0
        assert _judge(b, "while True:\n    pass\n", "1").verdicts == (sandbox.TIMEOUT,)
        tests = ["assert f(2) == 4", "assert f(3) == 10"]
        j = code.judge_function(b, "def f(x):\n    return x * x\n", tests)
        assert j.verdicts == (sandbox.PASSED, sandbox.WRONG)
    assert _sandbox_pids() == []
