"""Launched rollout servers end with their run: a SIGKILLed trainer's servers stop (the
watchdog), and the same command again resumes to the params of a run never killed. Its own file,
so `--dist loadfile` runs this end-to-end test beside the other server tests."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from k15jax.model import convert
from k15jax.rollout import watchdog

pytestmark = pytest.mark.vllm


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def _server_processes(model_dir, tokens):
    """Returns "pid command" of every live process of a server on `model_dir` (by command line)
    or carrying one of `tokens` (the servers' own processes, e.g. the engine core)."""
    found = set(watchdog.token_holders(tokens))
    for name in filter(str.isdigit, os.listdir("/proc")):
        if model_dir in (_cmdline(name) or "") and watchdog.start_time(int(name)) is not None:
            found.add(int(name))
    return [f"{pid} {(_cmdline(pid) or '')[:150]}" for pid in sorted(found)]


def _rl(out_dir, flags, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "experiments.rl", f"--out_dir={out_dir}", *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_a_killed_trainer_leaves_no_server_and_its_rerun_ends_like_an_uninterrupted_run(tmp_path):
    from test_loop import RESUME_FLAGS, _launch

    flags = [*RESUME_FLAGS, "--launch_servers=2", f"--publish_dir={tmp_path / 'publish'}"]
    out_a, out_b = str(tmp_path / "killed"), str(tmp_path / "straight")
    model_dir = os.path.join(out_a, "sft_model")  # what the servers of the killed run serve
    proc = _launch(out_a, flags)
    seen = []
    deadline = time.time() + 600
    for line in proc.stdout:  # kill during iteration 2: both servers are up and serving
        seen.append(line)
        if "it   1 |" in line:
            with open(os.path.join(out_a, watchdog.RECORD)) as f:
                record = json.load(f)
            tokens = {e["token"] for e in record["servers"]}
            before = _server_processes(model_dir, tokens)
            os.kill(proc.pid, signal.SIGKILL)
            break
        assert time.time() < deadline, "".join(seen[-20:])
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    assert len(record["servers"]) == 2 and len(before) >= 4, before  # 2 watchdogs, 2 servers
    t0 = time.monotonic()
    while _server_processes(model_dir, tokens) and time.monotonic() - t0 < 3 * watchdog.GRACE_S:
        time.sleep(0.1)
    seconds = time.monotonic() - t0
    print(f"before the trainer's SIGKILL: {before}")
    print(f"{seconds:.1f}s later: {_server_processes(model_dir, tokens)}")
    assert not _server_processes(model_dir, tokens)
    for e in record["servers"]:
        assert watchdog.start_time(e["pid"]) is None, e
    assert not [e for e in os.scandir(record["publish_root"]) if e.is_dir()]  # weights gone
    # The same command again: it resumes and ends as a run that was never killed.
    resumed = _rl(out_a, flags)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "it   0 |" not in resumed.stdout and "it   3 |" in resumed.stdout
    assert not os.path.exists(os.path.join(out_a, watchdog.RECORD))  # closed: nothing left
    assert not os.path.exists(record["publish_root"])
    straight = _rl(out_b, flags)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert not _server_processes(tmp_path.as_posix(), tokens)
    _, a = convert.load_hf(os.path.join(out_a, "rl_model"))
    _, b = convert.load_hf(os.path.join(out_b, "rl_model"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
