"""Rollouts over real `vllm serve` CPU servers on loopback (`servers.ServerPool`): the same samples
as the in-process engine, weight updates that never reach a request through a stale server,
failover when a server dies or hangs mid-iteration, and launched servers that die with a
SIGKILLed trainer."""

import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request

import jax
import numpy as np
import pytest

from k15jax.infra import checkpoint
from k15jax.rollout import engines, servers
from k15jax.run import loop

pytestmark = pytest.mark.vllm

ENGINE = engines.VllmConfig(max_model_len=512, kv_cache_memory_bytes=256 << 20)
SPEC = engines.SamplingSpec(n=3, temperature=1.0, max_tokens=24, repeat=engines.RepeatSpec())


def _start(model_dir, log_path):
    """Starts one server as a deployment would (not owned by any pool); returns (process, addr)."""
    port = servers.free_port()
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            servers.server_command(model_dir, port, ENGINE),
            env=servers.server_environment(ENGINE),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, f"127.0.0.1:{port}"


def _stop(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_healthy(address):
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{address}/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"server {address} did not answer /health")


@pytest.fixture(scope="module")
def two_servers(tiny_hf_dir, tmp_path_factory):
    """Two vLLM servers on the tiny model, started side by side (start-up is paid once)."""
    logs = tmp_path_factory.mktemp("server-logs")
    started = [_start(tiny_hf_dir[0], str(logs / f"server{i}.log")) for i in range(2)]
    for _, address in started:  # both up before the tests (a pool proceeds with the first)
        _wait_healthy(address)
    yield started
    for process, _ in started:
        _stop(process)


@pytest.fixture()
def pool(two_servers, tiny_hf_dir, tmp_path):
    engine = dataclasses.replace(ENGINE, publish_dir=str(tmp_path / "publish"))
    cfg = servers.ServerPoolConfig(
        addresses=tuple(address for _, address in two_servers),
        request_timeout_s=60,
        start_timeout_s=600,
    )
    p = servers.ServerPool(tiny_hf_dir[0], engine, cfg)
    yield p
    p.close()


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 90, size=int(rng.integers(2, 12))).tolist() for _ in range(n)]


def _same(a, b):
    assert [(c.prompt_index, c.token_ids, c.finish_reason) for c in a] == [
        (c.prompt_index, c.token_ids, c.finish_reason) for c in b
    ]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)


def _requests(metrics):
    return {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("requests/")}


def _weight_info(address):
    with urllib.request.urlopen(f"http://{address}/weight_info", timeout=10) as answer:
        return json.loads(answer.read())["weight_version"]


def test_server_command_carries_the_log_level():
    quiet = servers.server_command("/m", 8000, ENGINE)
    assert " ".join(quiet).endswith("--log-level WARNING --no-use-tqdm-on-load")
    loud = servers.server_command("/m", 8000, dataclasses.replace(ENGINE, log_level="INFO"))
    assert " ".join(loud).endswith("--log-level INFO --use-tqdm-on-load")


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="addresses or launch"):
        servers.ServerPoolConfig()
    with pytest.raises(ValueError, match="host:port"):
        servers.ServerPoolConfig(addresses=("localhost",))
    with pytest.raises(ValueError, match="request_timeout_s"):
        servers.ServerPoolConfig(launch=1, request_timeout_s=0)


def test_pool_samples_equal_the_in_process_engine(pool, vllm_engine, tiny_hf_dir):
    vllm_engine.load_weights(tiny_hf_dir[2])
    prompts = _prompts(12)
    seeds = list(range(100, 112))
    budgets = [8 + 2 * i for i in range(12)]
    want = vllm_engine.generate(prompts, SPEC, seeds=seeds, max_tokens=budgets)
    pool.take_metrics()
    got = pool.generate(prompts, SPEC, seeds=seeds, max_tokens=budgets)
    _same(got, want)
    assert {c.finish_reason for c in got} >= {"length"}
    # Both servers took a share of the requests, and every request was answered once.
    spread = _requests(pool.take_metrics())
    assert len(spread) == 2 and sum(spread.values()) == len(prompts), spread


def test_weight_update_never_reaches_a_stale_server(pool, vllm_engine, tiny_hf_dir, monkeypatch):
    params = jax.tree.map(lambda x: x * 0.7, tiny_hf_dir[2])  # other weights, other samples
    good, bad = pool.servers
    reload = pool._reload

    def failing_reload(server, path):  # a real server error: a directory that does not exist
        reload(server, path + "-missing" if server is bad else path)

    monkeypatch.setattr(pool, "_reload", failing_reload)
    pool.take_metrics()
    pool.load_weights(params)
    label = good.version
    assert (good.state, bad.state) == ("ready", "down")
    assert _weight_info(good.address) == label != _weight_info(bad.address)
    assert pool.take_metrics()["reload_failures"] == 1

    prompts, seeds = _prompts(8, seed=1), list(range(8))
    got = pool.generate(prompts, SPEC, seeds=seeds)  # the bad server still fails to sync
    assert _requests(pool.take_metrics()) == {good.address: 8}
    try:
        stale = vllm_engine.generate(prompts, SPEC, seeds=seeds)  # the start weights
        vllm_engine.load_weights(params)
        want = vllm_engine.generate(prompts, SPEC, seeds=seeds)
    finally:
        vllm_engine.load_weights(tiny_hf_dir[2])
    assert [c.token_ids for c in want] != [c.token_ids for c in stale]
    _same(got, want)

    # The reload works again: the server rejoins on the new version before it gets requests.
    monkeypatch.setattr(pool, "_reload", reload)
    again = pool.generate(prompts, SPEC, seeds=seeds)
    _same(again, want)
    metrics = pool.take_metrics()
    assert metrics["servers_rejoined"] == 1 and metrics["servers_ready"] == 2
    assert _weight_info(bad.address) == _weight_info(good.address) == label


def test_a_launched_server_that_hangs_is_restarted(tiny_hf_dir, tmp_path):
    engine = dataclasses.replace(ENGINE, publish_dir=str(tmp_path / "publish"))
    cfg = servers.ServerPoolConfig(launch=1, request_timeout_s=15, start_timeout_s=600)
    pool = servers.ServerPool(tiny_hf_dir[0], engine, cfg)
    try:
        params = jax.tree.map(lambda x: x * 0.7, tiny_hf_dir[2])
        pool.load_weights(params)
        prompts, seeds = _prompts(4, seed=3), list(range(4))
        want = pool.generate(prompts, SPEC, seeds=seeds)
        (server,) = pool.servers
        first = server.process.pid
        os.killpg(first, signal.SIGSTOP)  # hung: the port accepts, nothing answers
        got = pool.generate(prompts, SPEC, seeds=seeds)
        _same(got, want)  # the restarted server was synced to the new weights first
        metrics = pool.take_metrics()
        assert metrics["servers_restarted"] == 1 and metrics["requests_retried"] >= 1, metrics
        assert server.process.pid != first
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)
    finally:
        pool.close()
    assert not os.path.exists(pool.publish_root)


def test_rl_run_on_two_servers_equals_the_in_process_run(
    two_servers, vllm_engine, tiny_hf_dir, tmp_path
):
    from test_loop import TINY, _quiet, _state_target

    cfg = dataclasses.replace(TINY, rl=dataclasses.replace(TINY.rl, eval_every=0))
    cfg_local = dataclasses.replace(cfg, out_dir=str(tmp_path / "local"))
    try:
        local = loop.run(
            cfg_local,
            engine=vllm_engine,
            progress=_quiet,
            console=lambda line: None,
        )
    finally:
        vllm_engine.load_weights(tiny_hf_dir[2])
    pooled_cfg = dataclasses.replace(
        cfg,
        out_dir=str(tmp_path / "pool"),
        servers=servers.ServerPoolConfig(addresses=tuple(a for _, a in two_servers)),
        vllm=dataclasses.replace(cfg.vllm, publish_dir=str(tmp_path / "publish")),
    )
    pooled = loop.run(pooled_cfg, progress=_quiet, console=lambda line: None)
    jax.tree.map(np.testing.assert_array_equal, local["params"], pooled["params"])
    histories = [
        checkpoint.restore(
            os.path.join(c.out_dir, "ckpt", "rl"), 3, _state_target(c, result["params"])
        )[1]["history"]
        for c, result in ((cfg_local, local), (pooled_cfg, pooled))
    ]
    keep = ("reward", "loss", "finished_groups", "resumed", "pending_samples", "correct")
    for a, b in zip(*histories, strict=True):
        assert {k: a[k] for k in keep if k in a} == {k: b[k] for k in keep if k in b}
        assert any(k.startswith("engine/") for k in b) and not any(
            k.startswith("engine/") for k in a
        )
    # Not vacuous: groups finished and trained, and evaluation went through the servers too.
    assert sum(m.get("optimizer_steps", 0) for m in histories[1]) > 0
    assert local["sft"] == pooled["sft"] and local["rl"] == pooled["rl"]


def test_a_sleeping_engine_wakes_to_the_same_samples(vllm_engine, tiny_hf_dir):
    # vLLM frees memory in its sleep on GPUs only; on CPU the sleep pauses the scheduler. What
    # is checked here: the calls go through, and sampling after a wake (with or without a weight
    # reload while asleep) is what it was before the sleep.
    prompts, seeds = _prompts(6, seed=4), list(range(6))
    vllm_engine.load_weights(tiny_hf_dir[2])
    want = vllm_engine.generate(prompts, SPEC, seeds=seeds)
    knobs = vllm_engine.engine
    vllm_engine.engine = dataclasses.replace(knobs, sleep_level=1)
    try:
        vllm_engine.sleep()
        assert vllm_engine.asleep and vllm_engine.llm.llm_engine.is_sleeping()
        _same(vllm_engine.generate(prompts, SPEC, seeds=seeds), want)  # woken by generate
        assert not vllm_engine.asleep and not vllm_engine.llm.llm_engine.is_sleeping()
        vllm_engine.sleep()
        vllm_engine.load_weights(tiny_hf_dir[2])  # wakes the weights, reloads, wakes the rest
        assert not vllm_engine.llm.llm_engine.is_sleeping()
        _same(vllm_engine.generate(prompts, SPEC, seeds=seeds), want)
    finally:
        vllm_engine.engine = knobs


def test_sleeping_servers_wake_for_the_next_weights(two_servers, tiny_hf_dir, tmp_path):
    engine = dataclasses.replace(ENGINE, publish_dir=str(tmp_path / "publish"))
    cfg = servers.ServerPoolConfig(addresses=tuple(a for _, a in two_servers), sleep_level=1)
    pool = servers.ServerPool(tiny_hf_dir[0], engine, cfg)
    try:
        prompts, seeds = _prompts(6, seed=5), list(range(6))
        want = pool.generate(prompts, SPEC, seeds=seeds)
        pool.sleep()
        for _, address in two_servers:
            with urllib.request.urlopen(f"http://{address}/is_sleeping", timeout=10) as a:
                assert json.loads(a.read())["is_sleeping"]
        pool.load_weights(tiny_hf_dir[2])
        assert not any(s.asleep for s in pool.servers)
        _same(pool.generate(prompts, SPEC, seeds=seeds), want)
        pool.sleep()
        _same(pool.generate(prompts, SPEC, seeds=seeds), want)  # woken without new weights
    finally:
        pool.close()


# Last in the file: it leaves one of the two servers dead.
def test_a_server_killed_mid_iteration_loses_no_sample(two_servers, pool, vllm_engine, tiny_hf_dir):
    prompts, seeds = _prompts(48, seed=2), list(range(48))
    spec = dataclasses.replace(SPEC, max_tokens=48)
    vllm_engine.load_weights(tiny_hf_dir[2])
    want = vllm_engine.generate(prompts, spec, seeds=seeds)
    victim = pool.servers[1]
    process = next(p for p, address in two_servers if address == victim.address)
    t0 = time.perf_counter()
    _same(pool.generate(prompts, spec, seeds=seeds), want)  # the same work without a failure
    clean = time.perf_counter() - t0
    pool.take_metrics()

    def kill_when_busy():
        while victim.outstanding < 4:  # its share of the requests is sent ...
            time.sleep(0.001)
        time.sleep(clean / 4)  # ... and being generated (all of it takes about `clean`)
        os.killpg(process.pid, signal.SIGKILL)  # the server and its engine, requests in flight

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    t0 = time.perf_counter()
    try:
        got = pool.generate(prompts, spec, seeds=seeds)
        seconds = time.perf_counter() - t0
    finally:
        killer.join()
    _same(got, want)  # every prompt's samples exactly once, as the in-process engine drew them
    metrics = pool.take_metrics()
    assert metrics["server_failures"] == 1 and metrics["requests_retried"] >= 1, metrics
    assert metrics["servers_ready"] == 1
    print(f"rollouts with a server killed: {seconds:.1f}s (without: {clean:.1f}s), {metrics}")
