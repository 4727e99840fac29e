"""Launched servers never outlive their run (`watchdog`), on stand-in processes (`sleep`): the
watchdog stops its group when the trainer dies, and a restart stops what the record names and is
still the recorded process, and nothing else."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from k15jax.rollout import watchdog


def _gone(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while watchdog.start_time(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _sleeper(token=None):
    """Returns a `sleep 600` in its own session (a stand-in server), marked with `token`."""
    env = dict(os.environ, **({watchdog.TOKEN_ENV: token} if token else {}))
    return subprocess.Popen(["sleep", "600"], env=env, start_new_session=True)


def _entry(process, token, start_time=None):
    return {
        "address": "127.0.0.1:1",
        "pid": process.pid,
        "pgid": process.pid,
        "start_time": watchdog.start_time(process.pid) if start_time is None else start_time,
        "token": token,
        "command": "sleep 600",
    }


def _write(path, entries, publish_root="", trainer=None):
    trainer = trainer or {"pid": 1 << 30, "start_time": 0}  # no such process: a dead trainer
    path.write_text(
        json.dumps({"trainer": trainer, "publish_root": publish_root, "servers": entries})
    )


def test_a_recorded_pid_whose_start_time_differs_is_not_killed(tmp_path):
    other = _sleeper()  # took the recorded pid: another start time, no token
    try:
        record = tmp_path / watchdog.RECORD
        _write(record, [_entry(other, uuid.uuid4().hex, watchdog.start_time(other.pid) - 1)])
        assert watchdog.stop_recorded(str(record), grace_s=1) == []
        time.sleep(0.2)
        assert other.poll() is None  # still running
        assert not record.exists()
    finally:
        other.kill()
        other.wait()


def test_recorded_servers_still_running_are_stopped(tmp_path):
    token = uuid.uuid4().hex
    server = _sleeper(token)
    orphan = _sleeper(token)  # its group's leader died: found by its token
    publish = tmp_path / "publish" / "run-1" / "pool-x"
    (publish / "v3").mkdir(parents=True)
    record = tmp_path / watchdog.RECORD
    _write(record, [_entry(server, token)], publish_root=str(publish))
    try:
        assert watchdog.stop_recorded(str(record), grace_s=5) == ["127.0.0.1:1"]
        assert server.wait(5) == -signal.SIGTERM  # asked first
        assert orphan.wait(5) == -signal.SIGKILL
    finally:
        for p in (server, orphan):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not record.exists() and not (tmp_path / "publish" / "run-1").exists()


def test_a_record_of_a_running_trainer_is_refused(tmp_path):
    trainer = _sleeper()
    try:
        record = tmp_path / watchdog.RECORD
        alive = {"pid": trainer.pid, "start_time": watchdog.start_time(trainer.pid)}
        _write(record, [], trainer=alive)
        with pytest.raises(watchdog.InUseError, match=f"trainer pid {trainer.pid}"):
            watchdog.stop_recorded(str(record))
        assert record.exists()
    finally:
        trainer.kill()
        trainer.wait()


# A stand-in trainer: starts one watchdog around `sleep 600` from a thread that then ends (the
# case PDEATHSIG against the trainer would get wrong), prints the watchdog's pid, and waits.
_TRAINER = textwrap.dedent(
    """
    import os, subprocess, sys, threading, time
    from k15jax.rollout import watchdog
    r, w = os.pipe()
    started = []
    def start():
        cmd = watchdog.wrap(["sleep", "600"], read_fd=r, weights=sys.argv[1], grace_s=2)
        started.append(subprocess.Popen(cmd, pass_fds=(r,), start_new_session=True))
    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    print(started[0].pid, flush=True)
    time.sleep(600)
    """
)


def _server_of(watchdog_pid):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        members = [p for p in watchdog.group_members(watchdog_pid) if p != watchdog_pid]
        if members:
            return members[0]
        time.sleep(0.05)
    raise TimeoutError(f"watchdog {watchdog_pid} started no server")


def test_the_watchdog_stops_the_server_when_the_trainer_is_killed(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "server-1.log").write_text("log")
    trainer = subprocess.Popen(
        [sys.executable, "-c", _TRAINER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        guard = int(trainer.stdout.readline())
        server = _server_of(guard)
        time.sleep(0.3)  # the thread that started it has ended: the server still runs
        assert watchdog.start_time(server) is not None
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait()
        t0 = time.monotonic()
        assert _gone(server) and _gone(guard)
        print(f"server gone {time.monotonic() - t0:.2f}s after the trainer's SIGKILL")
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    assert not (tmp_path / "v1").exists()  # the published weights go, the logs stay
    assert (tmp_path / "server-1.log").exists()


def test_the_watchdog_exits_with_its_server(tmp_path):
    r, w = os.pipe()
    try:
        cmd = watchdog.wrap(["sh", "-c", "exit 3"], read_fd=r, weights=str(tmp_path))
        guard = subprocess.Popen(cmd, pass_fds=(r,), start_new_session=True)
        assert guard.wait(30) == 3
        # A server killed by a signal: the watchdog says which, as a shell would.
        cmd = watchdog.wrap(["sh", "-c", "kill -9 $$"], read_fd=r, weights=str(tmp_path))
        guard = subprocess.Popen(cmd, pass_fds=(r,), start_new_session=True)
        assert guard.wait(30) == 128 + signal.SIGKILL
    finally:
        os.close(r)
        os.close(w)


def test_sigterm_to_the_watchdog_stops_its_server(tmp_path):
    r, w = os.pipe()
    try:
        cmd = watchdog.wrap(["sleep", "600"], read_fd=r, weights=str(tmp_path), grace_s=2)
        guard = subprocess.Popen(cmd, pass_fds=(r,), start_new_session=True)
        server = _server_of(guard.pid)
        guard.terminate()
        assert guard.wait(10) == -signal.SIGKILL  # its last act: SIGKILL to its group
        assert _gone(server)
    finally:
        os.close(r)
        os.close(w)


def test_stat_fields_are_read_past_a_name_with_spaces_and_parentheses(tmp_path):
    script = tmp_path / "a b) 1 2"  # a name that would shift naively split fields
    script.write_text("#!/bin/sh\nsleep 600\n")
    script.chmod(0o755)
    p = subprocess.Popen([str(script)], start_new_session=True)
    try:
        time.sleep(0.2)
        with open(f"/proc/{p.pid}/stat") as f:
            assert "a b) 1 2" in f.read()
        assert watchdog.start_time(p.pid) >= watchdog.start_time(os.getpid())
        assert p.pid in watchdog.group_members(p.pid)  # with its `sleep`
        assert len(watchdog.group_members(p.pid)) == 2
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert watchdog.start_time(p.pid) is None
