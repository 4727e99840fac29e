"""Rollouts over N vLLM servers: `ServerPool`, a `RolloutEngine` behind vLLM's own HTTP servers.

Each server is a stock `python -m vllm.entrypoints.openai.api_server`, started by the pool on
loopback (`ServerPoolConfig.launch`) or given by address (`addresses`: started by a deployment,
e.g. `deploy/`). The pool uses only endpoints vLLM ships:
- `POST /inference/v1/generate` (`--enable-scale-out`): token ids in, token ids and per-token
  log-probs out, with the same `SamplingParams` as the in-process engine, so a request with the same
  seed gives the same samples on any server; every answer names the weight version that sampled
  each token (`weight_versions`);
- `POST /collective_rpc` `reload_weights` (`VLLM_SERVER_DEV_MODE=1`): in-place weight reload from a
  Hugging Face directory; `POST /update_weight_version` and `GET /weight_info`: the version label
  a server reports; `POST /reset_prefix_cache`; `GET /health`.

Weights are published once per update to `publish_dir` (a path every server can read: host
shared memory on one machine, a shared volume across machines) and reloaded on every server. A
server serves requests only once it reports the current version, and each answer's
`weight_versions` is checked again, so a sample from stale weights is never used.

A request that fails (connection refused or reset, HTTP error, timeout: a dead or hung server)
marks its server down and is sent again, with the same seed, to another server: each prompt's
samples are taken exactly once. A server the pool started is killed and restarted; a server given
by address is probed before each `generate` and rejoins (after a weight sync) when it answers.
`take_metrics` reports what happened since the last call.

A server the pool starts never outlives the trainer (`watchdog`): it runs under a watchdog
process that stops it when the trainer dies, SIGKILL included, and it is recorded in the run's
directory, so that a pool started again there stops whatever the last one left.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

from k15jax.model import convert, decoder
from k15jax.rollout import engines, watchdog

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerPoolConfig:
    """Where the rollout servers are and how long to wait for them."""

    addresses: tuple[str, ...] = ()  # "host:port" of running servers (VLLM_SERVER_DEV_MODE=1)
    launch: int = 0  # servers to start on loopback ports, each restarted if it dies
    request_timeout_s: float = 600.0  # no answer this long: the server counts as hung
    health_timeout_s: float = 5.0
    start_timeout_s: float = 600.0  # wait this long for a (re)started server, or any server
    max_concurrency: int = 256  # requests in flight over the whole pool
    # Servers colocated with the trainer (a sidecar on its GPUs) sleep while it trains:
    # `rollout.VllmConfig.sleep_level`; they need --enable-sleep-mode.
    sleep_level: int = 0
    log_dir: str | None = None  # launched servers' logs (default: under publish_dir)

    def __post_init__(self):
        if self.launch < 0:
            raise ValueError(f"launch={self.launch} must be >= 0")
        if not self.addresses and not self.launch:
            raise ValueError("a server pool needs addresses or launch >= 1")
        for address in self.addresses:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"server address {address!r} must be host:port")
        for name in ("request_timeout_s", "health_timeout_s", "start_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level={self.sleep_level} must be 0, 1 or 2")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency={self.max_concurrency} must be >= 1")


def server_command(model_dir: str, port: int, engine: engines.VllmConfig) -> list[str]:
    """Returns the command line of one vLLM server on `model_dir` with the engine's knobs."""
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_dir, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", engine.dtype, "--seed", str(engine.seed),
        "--max-num-seqs", str(engine.max_num_seqs),
        "--gpu-memory-utilization", str(engine.gpu_memory_utilization),
        "--enable-scale-out",
    ]  # fmt: skip
    if engine.max_model_len is not None:
        cmd += ["--max-model-len", str(engine.max_model_len)]
    if engine.kv_cache_memory_bytes is not None:
        cmd += ["--kv-cache-memory-bytes", str(engine.kv_cache_memory_bytes)]
    if engine.enforce_eager:
        cmd.append("--enforce-eager")
    cmd.append("--enable-prefix-caching" if engine.enable_prefix_caching else
               "--no-enable-prefix-caching")  # fmt: skip
    cmd.append("--enable-chunked-prefill" if engine.enable_chunked_prefill else
               "--no-enable-chunked-prefill")  # fmt: skip
    cmd += ["--log-level", engine.log_level]
    cmd.append("--use-tqdm-on-load" if engines.shows_progress(engine) else
               "--no-use-tqdm-on-load")  # fmt: skip
    return cmd


def server_environment(engine: engines.VllmConfig) -> dict[str, str]:
    """Returns the environment of a launched server: the dev endpoints (weight reload) on."""
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if engine.multiprocessing else "0"
    # The trainer's JAX settings mean nothing to the server.
    for name in ("XLA_FLAGS", "JAX_PLATFORMS"):
        env.pop(name, None)
    return env


def free_port() -> int:
    """Returns a TCP port on loopback that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    """A server answered with an error, or an answer that cannot be used."""


@dataclasses.dataclass(eq=False)
class _Server:
    address: str
    process: subprocess.Popen | None = None  # its watchdog, when the pool started it
    log_path: str | None = None
    token: str | None = None  # in the environment of its processes (`watchdog.TOKEN_ENV`)
    state: str = "starting"  # "starting" | "ready" | "down"
    version: str | None = None  # the label it reported after the last successful sync
    outstanding: int = 0
    asleep: bool = False

    @property
    def url(self) -> str:
        return f"http://{self.address}"


class ServerPool:
    """A `RolloutEngine` over N vLLM servers (see the module docstring).

    Args:
      model_dir: the converted Hugging Face directory of the start weights (launched servers
        start on it; servers given by address are reloaded from it).
      engine: vLLM knobs of launched servers, and `publish_dir` for published weights.
      pool: the servers.
      run_dir: where launched servers are recorded (`watchdog.RECORD`); a pool given the same
        directory later stops those that are still running first.

    Raises:
      watchdog.InUseError: the servers recorded in `run_dir` belong to a running trainer.
    """

    def __init__(
        self,
        model_dir: str,
        engine: engines.VllmConfig,
        pool: ServerPoolConfig,
        *,
        run_dir: str | None = None,
    ):
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model directory {model_dir} does not exist")
        self._record = os.path.join(run_dir, watchdog.RECORD) if run_dir else None
        if self._record:
            watchdog.stop_recorded(self._record)
        self.model_dir = os.path.abspath(model_dir)
        self.model_cfg = convert.read_config(model_dir)
        self.engine = engine
        self.cfg = pool
        self._id = uuid.uuid4().hex[:8]
        self._lock = threading.Condition()
        self._version = 0
        self._metrics: dict[str, int] = {}
        self.publish_root = os.path.join(engine.publish_dir, f"pool-{self._id}")
        # The start weights too are reloaded from the publish directory, the one path every
        # server is promised to read (the model directory may be local to the trainer).
        self._weights_path = os.path.join(self.publish_root, "v0")
        self._published = [self._weights_path]
        self.servers = [_Server(address) for address in pool.addresses]
        # The watchdogs' pipe: end-of-file on the read end means that this process is gone.
        self._alive_r, self._alive_w = os.pipe()
        self._record_lock = threading.Lock()
        try:
            shutil.copytree(self.model_dir, self._weights_path, copy_function=_link_or_copy)
            for _ in range(pool.launch):
                server = _Server(f"127.0.0.1:{free_port()}")
                self.servers.append(server)  # listed first: `_launch` records the list
                self._launch(server)
            self._start_up(time.monotonic() + pool.start_timeout_s)
        except BaseException:
            self.close()
            raise

    # -- the servers' life -------------------------------------------------------------------

    def _launch(self, server: _Server) -> None:
        log_dir = self.cfg.log_dir or self.publish_root
        os.makedirs(log_dir, exist_ok=True)
        port = server.address.rpartition(":")[2]
        server.log_path = os.path.join(log_dir, f"server-{port}.log")
        server.token = uuid.uuid4().hex
        with open(server.log_path, "ab") as out:
            server.process = subprocess.Popen(
                watchdog.wrap(
                    server_command(self.model_dir, int(port), self.engine),
                    read_fd=self._alive_r,
                    weights=self.publish_root,
                ),
                env={**server_environment(self.engine), watchdog.TOKEN_ENV: server.token},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                pass_fds=(self._alive_r,),
                start_new_session=True,  # its own process group: a kill takes its children too
            )
        server.state, server.version = "starting", None
        log.info("started vLLM server %s (watchdog pid %d)", server.address, server.process.pid)
        self._write_record()

    def _write_record(self) -> None:
        """Records the launched servers in the run directory (a restart stops what is left)."""
        if not self._record:
            return
        with self._record_lock:  # servers restarted by two threads: the newest list wins
            entries = [
                watchdog.record_entry(s.address, s.process, s.token)
                for s in self.servers
                if s.process is not None
            ]
            watchdog.write_record(self._record, entries, publish_root=self.publish_root)

    def _kill(self, server: _Server) -> None:
        process, server.process = server.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=60)

    def _healthy(self, server: _Server) -> bool:
        try:
            with urllib.request.urlopen(
                server.url + "/health", timeout=self.cfg.health_timeout_s
            ) as answer:
                return answer.status == 200
        except (OSError, http.client.HTTPException):
            return False

    def _start_up(self, deadline: float) -> None:
        """Waits for every launched server and at least one server overall, and syncs them.

        A server given by address that is not up yet (a deployment still starting it) is left
        out for now and joins when it answers (`_refresh`).
        """
        pending = list(self.servers)
        while True:
            for server in list(pending):
                if server.process is not None and server.process.poll() is not None:
                    raise ServerError(
                        f"vLLM server {server.address} exited with code "
                        f"{server.process.returncode} while starting; see {server.log_path}"
                    )
                if self._healthy(server):
                    pending.remove(server)
                    self._sync(server)
            ready = any(s.state == "ready" for s in self.servers)
            launching = [s for s in pending if s.process is not None]
            if (ready and not launching) or not pending:
                break
            if time.monotonic() > deadline:
                late = launching or pending
                raise ServerError(
                    f"no answer from vLLM server(s) {', '.join(s.address for s in late)} within "
                    f"{self.cfg.start_timeout_s:.0f}s"
                    + "".join(f"; see {s.log_path}" for s in late if s.log_path)
                )
            time.sleep(0.5)
        for server in pending:
            log.warning("rollout server %s not up yet: it joins when it answers", server.address)
            server.state = "down"
        if not any(s.state == "ready" for s in self.servers):
            raise ServerError(
                "no rollout server could be brought to the start weights: "
                + "; ".join(f"{s.address} {s.state}" for s in self.servers)
            )

    def _post(self, server: _Server, path: str, body: dict, timeout: float):
        request = urllib.request.Request(
            server.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                data = answer.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode(errors="replace")
            raise ServerError(f"{server.address}{path}: HTTP {e.code}: {detail}") from e
        except http.client.HTTPException as e:  # e.g. the answer cut off by a dying server
            raise ServerError(f"{server.address}{path}: {e!r}") from e
        return json.loads(data) if data else None

    def _get(self, server: _Server, path: str):
        try:
            with urllib.request.urlopen(server.url + path, timeout=self.cfg.health_timeout_s) as a:
                return json.loads(a.read())
        except http.client.HTTPException as e:
            raise ServerError(f"{server.address}{path}: {e!r}") from e

    def _label(self, version: int) -> str:
        return f"{self._id}:{version}"

    def _sync(self, server: _Server) -> bool:
        """Brings `server` to the current weights; returns whether it now serves them."""
        with self._lock:
            version, path = self._version, self._weights_path
        label = self._label(version)
        try:
            if server.asleep:  # weights memory back first, the KV cache after the reload
                self._wake(server, ("weights",))
            if server.version != label:
                self._reload(server, path)
            if server.asleep:
                self._wake(server)
            if server.version != label:
                self._post(server, "/reset_prefix_cache", {}, self.cfg.request_timeout_s)
                self._post(
                    server, "/update_weight_version", {"new_version": label},
                    self.cfg.health_timeout_s,
                )  # fmt: skip
            reported = self._get(server, "/weight_info").get("weight_version")
            if reported != label:
                raise ServerError(f"{server.address} reports weights {reported!r}, not {label!r}")
        except (OSError, ServerError, ValueError) as e:
            log.warning("rollout server %s kept out: weight sync failed: %s", server.address, e)
            self._count("reload_failures")
            self._mark_down(server)
            return False
        with self._lock:
            if self._version != version:  # a newer publish raced this sync: do it again
                return False
            server.version, server.state = label, "ready"
            self._lock.notify_all()
        return True

    def _reload(self, server: _Server, path: str) -> None:
        """Reloads the server's weights in place from `path` (a Hugging Face directory)."""
        self._post(
            server,
            "/collective_rpc",
            {"method": "reload_weights", "kwargs": {"weights_path": path}},
            self.cfg.request_timeout_s,
        )

    def _mark_down(self, server: _Server) -> None:
        with self._lock:
            if server.state == "down":  # another thread saw it fail first
                return
            if server.state == "ready":
                self._count_locked("server_failures")
            server.state, server.version, server.asleep = "down", None, False
            restart = server.process is not None
        if restart:  # a server the pool started: replace it (its state is unknown)
            self._kill(server)
            self._count("servers_restarted")
            self._launch(server)

    def _refresh(self) -> None:
        """Lets servers that came back (restarted, or answering again) rejoin after a sync."""
        for server in self.servers:
            if server.state == "ready":
                continue
            if server.process is not None and server.process.poll() is not None:
                log.warning("rollout server %s exited; restarting it", server.address)
                self._count("servers_restarted")
                self._launch(server)
                continue
            if self._healthy(server) and self._sync(server):
                self._count("servers_rejoined")

    # -- requests ----------------------------------------------------------------------------

    def _acquire(self) -> _Server:
        """Returns the ready server with the fewest requests in flight, waiting for one."""
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while True:
            with self._lock:
                ready = [s for s in self.servers if s.state == "ready"]
                if ready:
                    server = min(ready, key=lambda s: s.outstanding)
                    server.outstanding += 1
                    return server
            if time.monotonic() > deadline:
                raise ServerError(
                    f"no rollout server ready for {self.cfg.start_timeout_s:.0f}s: "
                    + ", ".join(f"{s.address} {s.state}" for s in self.servers)
                )
            self._refresh()
            with self._lock:
                if not any(s.state == "ready" for s in self.servers):
                    self._lock.wait(timeout=1.0)

    def _request(self, body: dict) -> dict:
        """Sends one generate request to the least-loaded ready server, failing over."""
        while True:
            server = self._acquire()
            label = server.version
            try:
                answer = self._post(
                    server, "/inference/v1/generate", body, self.cfg.request_timeout_s
                )
                for choice in answer["choices"]:
                    if choice["finish_reason"] in ("abort", "error"):
                        raise ServerError(f"{server.address}: request {choice['finish_reason']}")
                    versions = {span["version"] for span in choice.get("weight_versions") or []}
                    if versions != {label}:
                        raise ServerError(
                            f"{server.address} sampled with weights {sorted(versions)}, "
                            f"expected {label!r}"
                        )
            except (OSError, ServerError, ValueError, KeyError, TypeError) as e:
                with self._lock:
                    server.outstanding -= 1
                    failed_here = server.state == "ready" and server.version == label
                log.warning("rollout request on %s failed (%s); sending it elsewhere",
                            server.address, e)  # fmt: skip
                self._count("requests_retried")
                if failed_here:
                    self._mark_down(server)
                continue
            with self._lock:
                server.outstanding -= 1
                self._count_locked(f"requests/{server.address}")
            return answer

    def generate(self, prompts, spec, *, max_tokens=None, seeds=None) -> list[engines.Completion]:
        """Returns `spec.n` completions per prompt, grouped by prompt in prompt order."""
        self._refresh()
        for server in self.servers:
            if server.state == "ready" and server.asleep:  # no weight update since its sleep
                try:
                    self._wake(server)
                except (OSError, ServerError) as e:
                    log.warning("rollout server %s did not wake: %s", server.address, e)
                    self._mark_down(server)
        bodies = [
            {"token_ids": [int(t) for t in prompt], "sampling_params": _sampling_params(
                spec,
                spec.max_tokens if max_tokens is None else int(max_tokens[i]),
                spec.seed if seeds is None else int(seeds[i]),
            )}
            for i, prompt in enumerate(prompts)
        ]  # fmt: skip
        if not bodies:
            return []
        workers = min(len(bodies), self.cfg.max_concurrency)
        with concurrent.futures.ThreadPoolExecutor(workers, "k15jax-rollout") as ex:
            answers = list(ex.map(self._request, bodies))
        result = []
        for i, answer in enumerate(answers):
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            if len(choices) != spec.n:
                raise ServerError(f"asked for {spec.n} samples, a server returned {len(choices)}")
            for c in choices:
                ids = [int(t) for t in c["token_ids"]]
                logprobs = [float(step["logprob"]) for step in c["logprobs"]["content"]]
                if len(logprobs) != len(ids):
                    raise ServerError(f"{len(ids)} tokens but {len(logprobs)} log-probs")
                reason = engines.finish_reason(str(c["finish_reason"]))
                result.append(engines.Completion(i, ids, logprobs, reason))
        return result

    # -- weights -----------------------------------------------------------------------------

    def publish(self, params: decoder.Params) -> str:
        """Writes params as the next version under `publish_root`; returns its path."""
        path = os.path.join(self.publish_root, f"v{self._version + 1}")
        convert.save_hf(self.model_cfg, params, path)
        return path

    def load_weights(self, params: decoder.Params) -> None:
        """Publishes `params` once and reloads every server; stale servers get no requests.

        Raises:
          ServerError: when no server could load the new weights.
        """
        engines.check_params(self.model_cfg, params, self.model_dir)
        path = self.publish(params)
        with self._lock:
            self._version += 1
            self._weights_path = path
            self._published.append(path)
            for server in self.servers:
                if server.state == "ready":
                    server.state = "starting"  # no requests until it reports the new version
        ready = [s for s in self.servers if s.state == "starting" and self._healthy(s)]
        with concurrent.futures.ThreadPoolExecutor(max(1, len(ready))) as ex:
            synced = list(ex.map(self._sync, ready))
        self._count("weight_updates")
        if not any(synced):
            self._refresh()
            if not any(s.state == "ready" for s in self.servers):
                raise ServerError(
                    f"no rollout server loaded the weights at {path}: "
                    + ", ".join(f"{s.address} {s.state}" for s in self.servers)
                )
        # Older versions are no longer needed: a server that rejoins syncs to the newest.
        while len(self._published) > 1:
            shutil.rmtree(self._published.pop(0), ignore_errors=True)

    def sleep(self) -> None:
        """Puts every ready server to sleep (`sleep_level`; no requests until `load_weights`)."""
        if not self.cfg.sleep_level:
            return
        for server in self.servers:
            if server.state == "ready":
                try:
                    self._post(
                        server,
                        f"/sleep?level={self.cfg.sleep_level}",
                        {},
                        self.cfg.request_timeout_s,
                    )
                    server.asleep = True
                except (OSError, ServerError) as e:
                    log.warning("rollout server %s did not go to sleep: %s", server.address, e)
                    self._mark_down(server)

    def _wake(self, server: _Server, tags: tuple[str, ...] = ()) -> None:
        query = "&".join(f"tags={t}" for t in tags)
        self._post(
            server, "/wake_up" + (f"?{query}" if query else ""), {}, self.cfg.request_timeout_s
        )
        if not tags:
            server.asleep = False

    # -- reporting ---------------------------------------------------------------------------

    def _count_locked(self, name: str, n: int = 1) -> None:
        self._metrics[name] = self._metrics.get(name, 0) + n

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._count_locked(name, n)

    def take_metrics(self) -> dict[str, int]:
        """Returns the pool's event counts since the last call (and the ready-server count)."""
        with self._lock:
            out, self._metrics = self._metrics, {}
            out["servers_ready"] = sum(s.state == "ready" for s in self.servers)
        return out

    def close(self) -> None:
        """Stops the servers the pool started and removes its published weights and record."""
        for server in self.servers:
            self._kill(server)
            server.state = "down"
        shutil.rmtree(self.publish_root, ignore_errors=True)
        if self._record and os.path.exists(self._record):
            os.remove(self._record)
        if self._alive_w is not None:
            os.close(self._alive_r)
            os.close(self._alive_w)
            self._alive_r = self._alive_w = None


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-links `src` at `dst` (no second copy of the weights in shared memory), or copies
    it when the two are on different file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _sampling_params(spec: engines.SamplingSpec, max_tokens: int, seed: int | None) -> dict:
    """Returns vLLM `SamplingParams` as JSON, field for field those of `VllmEngine.generate`."""
    params = {
        "n": spec.n,
        "temperature": spec.temperature,
        "top_p": spec.top_p,
        "max_tokens": max_tokens,
        "seed": seed,
        "logprobs": 0,
        "stop_token_ids": list(spec.stop_token_ids),
        "detokenize": False,
        "ignore_eos": spec.ignore_eos,
    }
    if spec.repeat is not None:
        params["repetition_detection"] = {
            "max_pattern_size": spec.repeat.max_pattern,
            "min_pattern_size": spec.repeat.min_pattern,
            "min_count": spec.repeat.min_count,
        }
    return params


def make_engine(
    model_dir: str, vcfg: engines.VllmConfig, pool: ServerPoolConfig | None, *, run_dir: str
):
    """Returns the run's rollout engine: vLLM in this process, or a pool of vLLM servers
    (launched ones recorded in `run_dir`)."""
    if pool is None:
        return engines.VllmEngine(model_dir, vcfg)
    return ServerPool(model_dir, vcfg, pool, run_dir=run_dir)
