"""The GPU check: everything that needs a GPU, in one command, under 8 minutes, one table.

  make gpu-check                          # on the GPU machine, after `make gpu-wheels` here
  python -m experiments.checks.gpu_check --smoke # any machine: the same code paths at toy sizes

Parts (each bounded in time; a failure is a row of the table, not the end of the check):
  1. the environment: JAX, its devices, Triton, torch, jax-triton;
  2. the GPU kernel tests (`pytest -m gpu tests/test_kernels_gpu.py`);
  3. kernel speed: attention and token log-probs, a subset of `experiments.benchmarks.kernel_bench`;
  4. one train step of a Qwen2.5-0.5B-shaped model (bf16, remat, chunked attention and
     log-probs, random weights) at 8k and 32k tokens, each in a fresh process: the compiled
     memory plan (`preflight`) next to the measured peak (`memory_stats`) and the step time;
  5. three RL iterations of the built-in task (`loop.rl_iteration`), generating with the JAX
     sampler (`rollout.FakeEngine`; the GPU image has no vLLM): seconds per iteration.
Writes `gpu_check.md` (the table) and `gpu_check.json` to --out and prints the table last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

_OUT = flags.DEFINE_string("out", "runs/gpu_check", "Directory of the table and JSON.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Toy sizes (CPU): checks the check itself.")
_PART = flags.DEFINE_string("part", None, "Internal: run one train-step case in this process.")
_TOKENS = flags.DEFINE_integer("tokens", 8192, "Internal: tokens of the train-step case.")
PARTS = ("tests", "speed", "step", "rl")
_PARTS = flags.DEFINE_list("parts", list(PARTS), f"Parts to run, of {PARTS}.")
_BUDGET = flags.DEFINE_float("budget_s", 450, "Stop starting new parts after this many seconds.")


def _run(cmd: list[str], env: dict, timeout: float) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        return out.returncode, out.stdout + out.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as err:
        text = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else ""
        return 124, text + f"\ntimed out after {timeout:.0f} s", time.perf_counter() - t0


def environment() -> list[dict]:
    import importlib.util

    import jax

    d = jax.devices()[0]
    have = lambda m: "yes" if importlib.util.find_spec(m) else "no"
    versions = f"jax {jax.__version__}, backend {jax.default_backend()}, {len(jax.devices())} x "
    versions += f"{d.device_kind}; triton {have('triton')}, torch {have('torch')}, "
    versions += f"jax_triton {have('jax_triton')}, vllm {have('vllm')}"
    return [dict(part="environment", case=sys.version.split()[0], result=versions, seconds=0.0)]


def kernel_tests(env: dict) -> list[dict]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_kernels_gpu.py", "-p",
           "no:cacheprovider"]  # fmt: skip
    rc, text, s = _run(cmd, env, timeout=240)
    summary = text.strip().splitlines()[-1] if text.strip() else "(no output)"
    failed = [ln for ln in text.splitlines() if ln.startswith("FAILED")][:5]
    result = summary + ("; " + "; ".join(failed) if failed else "")
    return [dict(part="GPU kernel tests", case="tests/test_kernels_gpu.py", rc=rc, result=result,
                 seconds=s)]  # fmt: skip


def kernel_speed(env: dict, out: str) -> list[dict]:
    path = os.path.join(out, "kernel_speed.json")
    if _SMOKE.value:
        sizes = ["--speed_lengths=128", "--logprob_rows=64", "--tokens_per_batch=128",
                 "--impls=xla,xla_chunked", "--logprob_impls=xla_chunked,xla", "--repeats=1",
                 "--heads=2", "--head_dim=16"]  # fmt: skip
    else:
        sizes = ["--speed_lengths=8192,32768", "--logprob_rows=32768", "--repeats=5"]
    rc, text, s = _run(
        [sys.executable, "-m", "experiments.benchmarks.kernel_bench", f"--out={path}", *sizes],
        env,
        240,
    )
    if rc != 0 or not os.path.exists(path):
        return [dict(part="kernel speed", case="kernel_bench", rc=rc, result=text[-300:],
                     seconds=s)]  # fmt: skip
    with open(path) as f:
        res = json.load(f)
    rows = []
    for r in res["attention"]:
        result = r.get("error") or (
            f"fwd {r['fwd_tflops']:.1f}, fwd+bwd {r['fwd_bwd_tflops']:.1f} TFLOP/s"
        )
        rows.append(dict(part="attention speed", case=f"{r['impl']} t={r.get('t')}",
                         result=result, seconds=r.get("fwd_bwd_s", 0.0)))  # fmt: skip
    for r in res["logprobs"]:
        result = r.get("error") or (
            f"fwd {r['fwd_tflops']:.1f}, fwd+bwd {r['fwd_bwd_tflops']:.1f} TFLOP/s"
        )
        rows.append(dict(part="log-prob speed", case=f"{r['impl']} n={r.get('n')}",
                         result=result, seconds=r.get("fwd_bwd_s", 0.0)))  # fmt: skip
    rows.append(dict(part="kernel speed", case="whole benchmark", result=f"rc {rc}", seconds=s))
    return rows


def _model_cfg():
    from k15jax.model.config import KernelConfig, ModelConfig, qwen25_05b

    kernels = KernelConfig(
        attention_impl="xla_chunked", logprob_impl="xla_chunked", logprob_chunk=1024, remat=True
    )
    if _SMOKE.value:
        return ModelConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, dtype="bfloat16",
            attention_bias=True, tie_word_embeddings=True,
            kernels=KernelConfig(attention_impl="xla_chunked", attention_block=64,
                                 logprob_impl="xla_chunked", logprob_chunk=64, remat=True),
        )  # fmt: skip
    return qwen25_05b(kernels=kernels)


def train_step_case(t: int) -> dict:
    """One train step at `t` tokens in this (fresh) process: plan, peak memory, time."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from k15jax.model import decoder, sharding
    from k15jax.train import preflight, train_step

    cfg = _model_cfg()
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    opt = train_step.make_optimizer(1e-6)
    step_cfg = train_step.StepConfig(tau=0.1, group_size=1)
    t0 = time.perf_counter()
    compiled, plan = preflight.compile_step(
        cfg, opt, step_cfg, mesh, rows=1, seq_len=t, what=f"step t={t}"
    )
    compile_s = time.perf_counter() - t0
    shardings = sharding.param_shardings(cfg, mesh)
    params = jax.jit(lambda k: decoder.init(cfg, k), out_shardings=shardings)(jax.random.key(0))
    state = train_step.init_state(params, cfg, opt, mesh)
    del params
    rng = np.random.default_rng(0)
    host = train_step.Batch(
        tokens_bt=rng.integers(0, cfg.vocab_size, (1, t)).astype(np.int32),
        mask_bt=np.ones((1, t), np.float32),
        ref_logp_bt=np.full((1, t), -5.0, np.float32),
        reward_b=np.ones((1,), np.float32),
        segment_ids_bt=np.ones((1, t), np.int32),
        valid_b=np.ones((1,), np.float32),
    )
    batch = train_step.batch_shardings(mesh)
    batch = jax.tree.map(lambda x, s: jax.device_put(x, s), host, batch)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - start)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return dict(
        t=t, plan_total=plan.total_bytes, plan_state=plan.state_bytes, plan_temp=plan.temp_bytes,
        peak=peak, step_s=sorted(times)[1], compile_s=compile_s, loss=float(m["loss"]),
        finite=bool(jnp.isfinite(m["loss"])),
    )  # fmt: skip


def train_steps(env: dict) -> list[dict]:
    rows = []
    for t in (256, 512) if _SMOKE.value else (8192, 32768):
        cmd = [sys.executable, "-m", "experiments.checks.gpu_check", "--part=step", f"--tokens={t}",
               f"--out={_OUT.value}"] + (["--smoke"] if _SMOKE.value else [])  # fmt: skip
        rc, text, s = _run(cmd, env, timeout=200)
        line = next((ln for ln in text.splitlines() if ln.startswith("STEP ")), None)
        if rc != 0 or line is None:
            rows.append(dict(part="train step", case=f"t={t}", rc=rc, result=text[-300:],
                             seconds=s))  # fmt: skip
            continue
        r = json.loads(line[5:])
        gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f} GiB"
        result = (
            f"plan {gib(r['plan_total'])} (state {gib(r['plan_state'])}, temp "
            f"{gib(r['plan_temp'])}); measured peak {gib(r['peak'])}; step {r['step_s']:.3f} s "
            f"({t / r['step_s']:,.0f} tokens/s); compile {r['compile_s']:.0f} s; "
            f"loss finite {r['finite']}"
        )
        rows.append(dict(part="train step 0.5B", case=f"t={t}", result=result, seconds=s, **r))
    return rows


def rl_iterations() -> list[dict]:
    """Three RL iterations of the built-in task with the JAX sampler."""
    import dataclasses

    from k15jax.data import prompt_sets
    from k15jax.infra import distributed
    from k15jax.rollout import engines
    from k15jax.run import loop, run_config
    from k15jax.train import train_step

    d = run_config.RunConfig()
    small = _SMOKE.value
    cfg = dataclasses.replace(
        d,
        out_dir=os.path.join(_OUT.value, "rl"),
        task=prompt_sets.TaskConfig(train_problems=32 if small else 128, sft_examples=16),
        rl=dataclasses.replace(
            d.rl,
            iterations=3,
            prompts_per_iteration=4 if small else 16,
            groups_per_step=2 if small else 8,
            difficulty_samples=2,
            easy_to_hack_tries=2,
        ),
        partial=dataclasses.replace(
            d.partial, budget=32 if small else 192, max_length=48 if small else 256
        ),  # fmt: skip
    )
    t0 = time.perf_counter()
    setup = loop.prepare(cfg)
    params = distributed.host_value(setup.params)
    engine = engines.FakeEngine(setup.model_cfg, params, eos_id=setup.tok.eos_id)
    optimizer = train_step.make_optimizer(cfg.rl.learning_rate)
    step_cfg = train_step.StepConfig(tau=cfg.rl.tau, group_size=cfg.rl.samples_per_prompt)
    trainer = train_step.make_trainer(setup.model_cfg, optimizer, step_cfg, setup.mesh)
    fresh = train_step.init_state(setup.params, setup.model_cfg, optimizer, setup.mesh)
    state = loop.start_rl(setup, engine, fresh, console=lambda *a: None)
    pool = prompt_sets.select(setup.problems.train, state.train_ids)
    rows = [dict(part="RL (JAX sampler)", case="setup + difficulty", result=f"{len(pool)} "
                 f"problems kept", seconds=time.perf_counter() - t0)]  # fmt: skip
    for it in range(3):
        start = time.perf_counter()
        state, m = loop.rl_iteration(setup, engine, trainer, state, pool, it)
        s = time.perf_counter() - start
        result = (
            f"{m['finished_groups']} groups finished, {m['pending_samples']} pending, "
            f"rollout {m['rollout_tokens_per_s']:,.0f} tok/s"
            + (f", reward {m['reward']:.3f}, train {m['train_tokens_per_s']:,.0f} tok/s"
               if "reward" in m else "")
        )  # fmt: skip
        rows.append(dict(part="RL (JAX sampler)", case=f"iteration {it}", result=result,
                         seconds=s))  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| part | case | result | s |", "|---|---|---|---|"]
    for r in rows:
        result = str(r["result"]).replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['part']} | {r['case']} | {result} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def check() -> list[dict]:
    out = os.path.abspath(_OUT.value)
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ)
    if not _SMOKE.value:
        env.update(
            JAX_PLATFORMS="cuda", TRITON_INTERPRET="0", XLA_PYTHON_CLIENT_PREALLOCATE="false"
        )
    t_start = time.perf_counter()
    rows = environment()
    parts = [
        ("tests", "GPU kernel tests", lambda: kernel_tests(env)),
        ("speed", "kernel speed", lambda: kernel_speed(env, out)),
        ("step", "train step", lambda: train_steps(env)),
        ("rl", "RL", rl_iterations),
    ]
    unknown = set(_PARTS.value) - set(PARTS)
    if unknown:
        raise app.UsageError(f"--parts: unknown {sorted(unknown)}; known: {PARTS}")
    for key, name, part in parts:
        if key not in _PARTS.value:
            continue
        if time.perf_counter() - t_start > _BUDGET.value:
            rows.append(dict(part=name, case="-", result="not run: time budget spent", seconds=0))
            continue
        try:
            rows.extend(part())
        except Exception as err:  # noqa: BLE001 (a failed part is a result of the check)
            rows.append(dict(part=name, case="-", result=f"{type(err).__name__}: {err}"[:300],
                             seconds=0))  # fmt: skip
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump(rows, f, indent=2, default=str)
    text = table(rows)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(text + "\n")
    print(f"GPU check in {time.perf_counter() - t_start:.0f} s; {out}/gpu_check.md:\n")
    print(text)
    return rows


def main(argv):
    del argv
    if _PART.value == "step":
        print("STEP " + json.dumps(train_step_case(_TOKENS.value)), flush=True)
        return
    check()


if __name__ == "__main__":
    app.run(main)
