"""Multi-process training equals single-process training: 2 processes x 4 CPU devices vs 1 x 8.

  python -m experiments.checks.multihost_check          # ~5 minutes on 2 cores

Starts, on this machine, (1) one process with 8 CPU devices and (2) two processes with 4 CPU
devices each, joined by `jax.distributed` on a loopback coordinator with gloo collectives. Each
runs the run's RL update (`update.rl_update`: optimizer reset, samples packed by length, two
micro-batches, reference log-probs from the trainer) from the same weights on the same samples,
on meshes with data,
fsdp and tensor axes, and writes its final params; the 2-process run also writes a checkpoint
(orbax, every process its own shards), which (3) a 1-process run restores onto another mesh.
Prints, per mesh, the largest parameter difference between (1) and (2), whether (3) restored
the 2-process params exactly, and the overall max difference last.

`--loop` (default) also runs the RL job itself (`loop.run`: SFT, difficulty estimate, two RL
iterations with partial rollouts, checkpoints, evaluation; process 0 generates with the JAX
sampler) as 1x8 and 2x4, compares the samples, rewards and final params, then deletes the 2x4
run's last checkpoint and runs it again: it must resume and end with the same params.

Tolerance: the two runs reduce gradients in a different order (XLA's in-process all-reduce vs
gloo's), a float32 rounding difference. The default optimizer, momentum SGD (lr 0.1), is linear
in the gradient, so that difference stays at rounding size and `--tolerance=1e-6` holds it;
with `--optimizer=adamw` (lr 1e-3) the division by sqrt(v) enlarges it on near-zero gradient
entries to a fraction of one step (1e-4 after `--optimizer=adamw --steps=6`), so pass a
tolerance to match.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from absl import app, flags

_ROLE = flags.DEFINE_enum(
    "role",
    "check",
    ["check", "train", "restore", "loop", "restore_loop"],
    "What this process does.",
)
_OUT = flags.DEFINE_string("out", "runs/multihost_check", "Where workers write their results.")
_STEPS = flags.DEFINE_integer("steps", 3, "Optimizer steps per mesh.")
_TOL = flags.DEFINE_float("tolerance", 1e-6, "Largest accepted parameter difference.")
_OPT = flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adamw"], "The optimizer of the steps.")
_TRAIN = flags.DEFINE_bool("train", True, "Check train steps on every mesh (SGD, 1x8 vs 2x4).")
_LOOP = flags.DEFINE_bool("loop", True, "Also check the RL loop (1x8, 2x4, 2x4 resumed).")
_LOOP_TOL = flags.DEFINE_float(
    "loop_tolerance",
    1e-4,
    "Largest accepted param difference of the RL loop (AdamW: see the module docstring).",
)
_MESHES = flags.DEFINE_list("meshes", None, "Subset of the meshes to check (default: all).")
_COORD = flags.DEFINE_string("coordinator_address", None, "Worker: host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", 1, "Worker: number of processes.")
_PROC_ID = flags.DEFINE_integer("process_id", 0, "Worker: this process's index.")

DEVICES = 8  # in all, over every process
MESHES = {"data2_fsdp2_tensor2": (2, 2, 2), "fsdp4_tensor2": (1, 4, 2), "data2_fsdp4": (2, 4, 1)}
GROUP, ROWS, SEQ = 4, 16, 24


def _model_cfg():
    from k15jax.model.config import ModelConfig

    return ModelConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
    )  # fmt: skip


def _meshes() -> dict[str, tuple[int, int, int]]:
    names = _MESHES.value or list(MESHES)
    unknown = [n for n in names if n not in MESHES]
    if unknown:
        raise app.UsageError(f"--meshes: unknown {unknown}; known: {list(MESHES)}")
    return {n: MESHES[n] for n in names}


def _optimizer():
    import optax

    from k15jax.train import train_step

    if _OPT.value == "adamw":
        return train_step.make_optimizer(1e-3)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))


def _batch(step: int):
    """The host batch of `step`, the same on every process."""
    import numpy as np

    rng = np.random.default_rng(1000 + step)
    tokens = rng.integers(3, 64, (ROWS, SEQ)).astype(np.int32)
    lengths = rng.integers(SEQ // 2, SEQ + 1, ROWS)
    seg = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
    mask = (seg * (np.arange(SEQ)[None] >= 6)).astype(np.float32)
    reward = rng.integers(0, 2, ROWS).astype(np.float32)
    return tokens, seg, mask, reward


def train(out: str) -> None:
    """Worker: the train steps on every mesh; process 0 writes the params, every process the
    checkpoint of the last mesh."""
    import jax
    import numpy as np

    from k15jax.infra import checkpoint, distributed
    from k15jax.model import decoder, sharding
    from k15jax.train import train_step, update

    cfg = _model_cfg()
    optimizer = _optimizer()
    step_cfg = train_step.StepConfig(tau=0.5, group_size=GROUP, micro_batches=2)
    host_params = jax.device_get(decoder.init(cfg, jax.random.key(0)))  # the same everywhere
    results = {}
    for name, shape in _meshes().items():
        mesh = sharding.make_mesh(shape)
        trainer = train_step.make_trainer(cfg, optimizer, step_cfg, mesh)
        state = train_step.init_state(host_params, cfg, optimizer, mesh)
        losses = []
        for i in range(_STEPS.value):
            tokens, seg, mask, reward = _batch(i)
            samples = update.Samples(  # no engine log-probs: the trainer computes every π_θi
                tokens_bt=tokens, mask_bt=mask, segment_ids_bt=seg, reward_b=reward,
                engine_logp_bt=np.zeros(mask.shape, np.float32), current_mask_bt=mask,
            )  # fmt: skip
            state, metrics = update.rl_update(
                trainer, state, samples, rows_per_step=ROWS // 2, micro_batches=2,
                shards=sharding.batch_shards(mesh), gap=None, max_gap=0.0,
                where=f"{name} iteration {i}",
            )  # fmt: skip
            losses.append(metrics["loss"])
        per_device = sharding.per_device_bytes(state.params)
        params = distributed.host_value(state.params)
        if distributed.is_main():
            np.savez(os.path.join(out, f"{name}.npz"), **_flat(params))
            results[name] = {"losses": losses, "param_bytes_per_device": per_device}
        ckpt_state = state
    checkpoint.save(os.path.join(out, "ckpt"), 1, ckpt_state, {"mesh": list(shape)})
    if distributed.is_main():
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump({"processes": jax.process_count(), "meshes": results}, f)


def restore(out: str, ckpt_dir: str) -> None:
    """Worker (1 process): restores the checkpoint onto a data-parallel mesh, writes params."""
    import jax
    import numpy as np

    from k15jax.infra import checkpoint
    from k15jax.model import decoder, sharding
    from k15jax.train import train_step

    cfg = _model_cfg()
    optimizer = _optimizer()
    mesh = sharding.make_mesh((-1, 1, 1))
    target = train_step.init_state(decoder.init(cfg, jax.random.key(1)), cfg, optimizer, mesh)
    state, extra = checkpoint.restore(ckpt_dir, 1, target)
    np.savez(os.path.join(out, "restored.npz"), **_flat(jax.device_get(state.params)))


def _flat(params) -> dict:
    import jax

    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}


def loop_run(out: str) -> None:
    """Worker: the RL run (`loop.run`: SFT, difficulty, RL iterations with partial rollouts,
    checkpoints, evaluation) on a tiny built-in task, with the JAX-sampler engine on process 0."""
    import dataclasses

    import jax
    import numpy as np

    from k15jax.infra import distributed
    from k15jax.model import tokenizer as tokenizer_lib
    from k15jax.rollout import engines
    from k15jax.run import loop

    cfg = _loop_cfg(out)
    engine = None
    if distributed.is_main():
        tok = tokenizer_lib.builtin()
        shape = dataclasses.replace(cfg.model, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)
        engine = engines.FakeEngine(shape, None, eos_id=tok.eos_id)
    result = loop.run(cfg, engine=engine, progress=None, console=print)
    if distributed.is_main():
        np.savez(os.path.join(out, "loop.npz"), **_flat(jax.device_get(result["params"])))
        with open(os.path.join(out, "loop.json"), "w") as f:
            json.dump({"rl": result["rl"], "processes": jax.process_count()}, f)


def restore_loop(out: str, run_dir: str) -> None:
    """Worker (1 process): restores the RL run's latest checkpoint onto a data-parallel mesh."""
    import dataclasses

    import jax
    import numpy as np

    from k15jax.model import decoder, sharding
    from k15jax.model import tokenizer as tokenizer_lib
    from k15jax.run import run_state
    from k15jax.train import train_step

    cfg = _loop_cfg(run_dir)
    tok = tokenizer_lib.builtin()
    model_cfg = dataclasses.replace(
        cfg.model, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id
    )
    opt = train_step.make_optimizer(cfg.rl.learning_rate, max_grad_norm=cfg.rl.max_grad_norm)
    mesh = sharding.make_mesh((-1, 1, 1))
    target = train_step.init_state(decoder.init(model_cfg, jax.random.key(9)), model_cfg, opt, mesh)
    state, _ = run_state.restore_latest(
        os.path.join(cfg.out_dir, "ckpt", "rl"), run_state.RlState, target
    )
    params = jax.device_get(state.train.params)
    np.savez(os.path.join(out, "restored_loop.npz"), **_flat(params))


def _loop_cfg(out: str):
    """The RL run of the check: a tiny built-in task, SFT, two iterations with partial rollouts."""
    import dataclasses

    from k15jax.data import prompt_sets
    from k15jax.rollout import partial
    from k15jax.run import evaluation, run_config
    from k15jax.train import sft

    d = run_config.RunConfig()
    return dataclasses.replace(
        d,
        out_dir=os.path.join(out, "run"),
        model=dataclasses.replace(d.model, hidden_size=64, intermediate_size=128, head_dim=16),
        mesh=(2, 2, 2),
        task=prompt_sets.TaskConfig(
            train_problems=16, sft_examples=64, max_terms=2, max_prompt_tokens=16
        ),
        sft=sft.SftConfig(steps=4, batch_size=8, checkpoint_every=2),
        rl=run_config.RlConfig(
            iterations=2, prompts_per_iteration=4, samples_per_prompt=4, groups_per_step=2,
            difficulty_samples=2, easy_to_hack_tries=2, checkpoint_every=1, eval_every=0,
        ),
        eval=evaluation.EvalConfig(problems=4, samples=2),
        partial=partial.PartialConfig(budget=24, max_length=32),
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(role: str, out: str, processes: int, extra=()) -> list[subprocess.Popen]:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES // processes}",
    )
    os.makedirs(out, exist_ok=True)
    port = _free_port()
    procs = []
    for i in range(processes):
        cmd = [sys.executable, "-m", "experiments.checks.multihost_check", f"--role={role}",
               f"--out={out}", f"--steps={_STEPS.value}", f"--optimizer={_OPT.value}",
               f"--meshes={','.join(_meshes())}",
               f"--num_processes={processes}",
               f"--process_id={i}", *extra]  # fmt: skip
        if processes > 1:
            cmd.append(f"--coordinator_address=127.0.0.1:{port}")
        log = open(os.path.join(out, f"log_{role}_{i}.txt"), "w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"{what}: timed out after {timeout:.0f} s") from None
        if rc != 0:
            for q in procs:
                q.kill()
            raise SystemExit(f"{what}: a process exited with {rc}; see its log in {_OUT.value}")


def check() -> float:
    out = os.path.abspath(_OUT.value)
    ok, worst, tol = True, 0.0, _TOL.value
    if _TRAIN.value:
        worst, ok = check_train(out)
    if _LOOP.value:
        loop_diff, loop_ok = check_loop(out)
        ok = ok and loop_ok
        print(f"RL loop: 1x8 vs 2x4 max param difference {loop_diff:.3e} "
              f"(tolerance {_LOOP_TOL.value:.0e})")  # fmt: skip
        if not _TRAIN.value:
            worst, tol = loop_diff, _LOOP_TOL.value
    print(f"max difference: {worst:.3e} (tolerance {tol:.0e})")
    if not ok:
        raise SystemExit(1)
    return worst


def check_train(out: str) -> tuple[float, bool]:
    """Train steps on every mesh as 1x8 and 2x4; the 2x4 checkpoint restored by 1 process."""
    import numpy as np

    one, two = os.path.join(out, "1x8"), os.path.join(out, "2x4")
    t0 = time.perf_counter()
    procs = _launch("train", one, 1) + _launch("train", two, 2)
    _wait(procs, "training")
    t_train = time.perf_counter() - t0
    _wait(_launch("restore", one, 1, [f"--restore_from={two}/ckpt"]), "restore")
    with open(os.path.join(one, "results.json")) as f:
        r1 = json.load(f)
    with open(os.path.join(two, "results.json")) as f:
        r2 = json.load(f)
    assert r1["processes"] == 1 and r2["processes"] == 2, (r1["processes"], r2["processes"])
    print(f"trained in {t_train:.0f} s (both runs side by side)")
    print("| mesh (data, fsdp, tensor) | max param diff 1x8 vs 2x4 | param bytes/device 1x8, 2x4 |")
    print("|---|---|---|")
    worst = 0.0
    for name, shape in _meshes().items():
        a, b = np.load(os.path.join(one, f"{name}.npz")), np.load(os.path.join(two, f"{name}.npz"))
        assert sorted(a.files) == sorted(b.files)
        diff = max(float(np.abs(a[k] - b[k]).max()) for k in a.files)
        moved = max(float(np.abs(a[k]).max()) for k in a.files)
        worst = max(worst, diff)
        bytes1 = r1["meshes"][name]["param_bytes_per_device"]
        bytes2 = r2["meshes"][name]["param_bytes_per_device"]
        print(f"| {shape} | {diff:.2e} (largest |param| {moved:.2f}) | {bytes1:,}, {bytes2:,} |")
    last = np.load(os.path.join(two, f"{list(_meshes())[-1]}.npz"))
    restored = np.load(os.path.join(one, "restored.npz"))
    exact = all(np.array_equal(last[k], restored[k]) for k in last.files)
    print(f"2-process checkpoint restored by 1 process on mesh (8, 1, 1): "
          f"{'bit-identical' if exact else 'DIFFERENT'}")  # fmt: skip
    return worst, exact and worst <= _TOL.value


SAMPLED = ("finished_groups", "pending_samples", "resumed", "reward", "accuracy", "mean_length")


def _loop_result(out: str):
    import glob

    import numpy as np

    (last,) = sorted(glob.glob(os.path.join(out, "run", "ckpt", "rl", "step_2", "extra.json")))
    with open(last) as f:
        history = json.load(f)["history"]
    sampled = [{k: m[k] for k in SAMPLED if k in m} for m in history]
    return dict(np.load(os.path.join(out, "loop.npz"))), sampled


def check_loop(out: str) -> tuple[float, bool]:
    """The RL run on 1x8 and 2x4, then the 2x4 run resumed from its iteration-1 checkpoint."""
    import shutil

    import numpy as np

    one, two = os.path.join(out, "loop_1x8"), os.path.join(out, "loop_2x4")
    t0 = time.perf_counter()
    _wait(_launch("loop", one, 1) + _launch("loop", two, 2), "RL loop")
    print(f"RL loop (SFT, difficulty, 2 iterations) in {time.perf_counter() - t0:.0f} s")
    p1, h1 = _loop_result(one)
    p2, h2 = _loop_result(two)
    diff = max(float(np.abs(p1[k] - p2[k]).max()) for k in p1)
    same_samples = h1 == h2
    print(f"RL loop: the same samples and rewards in every iteration: {same_samples} ({h2})")
    # Resume: drop the last checkpoint and what the run wrote after it; run the same command.
    run = os.path.join(two, "run")
    shutil.rmtree(os.path.join(run, "ckpt", "rl", "step_2"))
    os.remove(os.path.join(run, "eval_rl.json"))
    _wait(_launch("loop", two, 2), "RL loop resume")
    p3, h3 = _loop_result(two)
    resumed = h3 == h2 and all(np.array_equal(p2[k], p3[k]) for k in p2)
    print(f"RL loop: 2x4 run resumed at iteration 1 ends with the same params: {resumed}")
    # The 2-process run's RL checkpoint, restored by one process onto another mesh.
    _wait(_launch("restore_loop", one, 1, [f"--restore_from={two}"]), "RL checkpoint restore")
    restored = np.load(os.path.join(one, "restored_loop.npz"))
    exact = all(np.array_equal(p3[k], restored[k]) for k in p3)
    print(f"RL loop: 2-process RL checkpoint restored by 1 process on mesh (8, 1, 1): "
          f"{'bit-identical' if exact else 'DIFFERENT'}")  # fmt: skip
    return diff, same_samples and resumed and exact and diff <= _LOOP_TOL.value


_RESTORE_FROM = flags.DEFINE_string("restore_from", None, "Restore worker: checkpoint dir.")


def main(argv):
    del argv
    if _ROLE.value == "check":
        check()
        return
    from absl import logging

    from k15jax.infra import distributed

    logging.set_verbosity(logging.WARNING)
    distributed.initialize(
        distributed.DistributedConfig(
            coordinator_address=_COORD.value,
            num_processes=_NPROC.value if _COORD.value else None,
            process_id=_PROC_ID.value if _COORD.value else None,
        )
    )
    if _ROLE.value == "train":
        train(_OUT.value)
    elif _ROLE.value == "loop":
        loop_run(_OUT.value)
    elif _ROLE.value == "restore_loop":
        restore_loop(_OUT.value, _RESTORE_FROM.value)
    else:
        restore(_OUT.value, _RESTORE_FROM.value)


if __name__ == "__main__":
    app.run(main)
