"""The RL loop end to end with the real vLLM engine (tiny budget), bad input, and resume after
SIGKILL with identical final params."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from k15jax.data import prompt_sets
from k15jax.model import convert
from k15jax.model.config import KernelConfig
from k15jax.rollout import partial
from k15jax.run import evaluation, loop, run_config
from k15jax.train import sft

pytestmark = pytest.mark.vllm

TINY = dataclasses.replace(
    run_config.RunConfig(),
    task=prompt_sets.TaskConfig(
        train_problems=24, sft_examples=200, max_terms=3, max_prompt_tokens=24
    ),
    sft=sft.SftConfig(steps=12, batch_size=8, checkpoint_every=5),
    rl=run_config.RlConfig(
        iterations=3,
        prompts_per_iteration=4,
        samples_per_prompt=4,
        groups_per_step=2,
        difficulty_samples=2,
        easy_to_hack_tries=2,
        checkpoint_every=1,
        eval_every=2,
        learning_rate=1e-4,
    ),
    eval=evaluation.EvalConfig(problems=8, samples=2),
    partial=partial.PartialConfig(budget=40, max_length=100),
    length=dataclasses.replace(run_config.RunConfig().length, warmup_iterations=1),
)


def _quiet(**kw):
    from tqdm import tqdm

    return tqdm(**kw, disable=True)


def test_rl_loop_end_to_end(vllm_engine, tiny_hf_dir, tmp_path):
    # The trainer runs the O(t) paths here (blockwise attention over several tiles, chunked
    # log-probs, remat): vLLM's log-probs must still agree with them.
    kernels = KernelConfig(
        attention_impl="xla_chunked",
        attention_block=32,
        logprob_impl="xla_chunked",
        logprob_chunk=64,
        remat=True,
    )
    cfg = dataclasses.replace(
        TINY,
        out_dir=str(tmp_path / "run"),
        model=dataclasses.replace(TINY.model, kernels=kernels),
        rl=dataclasses.replace(TINY.rl, micro_batches=2),  # groups_per_step=2: one group each
        mesh=(2, 2, 2),  # data, fsdp and tensor sharding of the 8 test devices
    )
    lines = []
    try:
        result = loop.run(cfg, engine=vllm_engine, progress=_quiet, console=lines.append)
    finally:
        vllm_engine.load_weights(tiny_hf_dir[2])  # leave the shared engine as it was
    out = cfg.out_dir
    hist = json.load(open(os.path.join(out, "results.json")))
    assert hist["sft"]["problems"] == 8 and 0 <= hist["rl"]["pass_at_1"] <= 1
    # Per-iteration metrics: budget 40 < trace length, so samples were resumed across iterations.
    from k15jax.infra import checkpoint

    step = checkpoint.latest_step(os.path.join(out, "ckpt", "rl"))
    assert step == 3
    _, extra = checkpoint.restore(
        os.path.join(out, "ckpt", "rl"),
        step,
        _state_target(cfg, result["params"]),
    )
    history = extra["history"]
    assert [m["iteration"] for m in history] == [0, 1, 2]
    assert sum(m["resumed"] for m in history) > 0
    done = [m for m in history if "reward" in m]
    assert done, "no group finished in three iterations"
    for m in done:
        assert np.isfinite(m["loss"]) and m["optimizer_steps"] >= 1
        assert m["logprob_mismatch_max"] < 1e-3, history  # vLLM and JAX agree on the tokens
        assert -1.5 <= m["reward"] <= 1.5
    # δ is exactly 0 on the first step of an iteration and moves afterwards.
    assert any(m["delta_abs_mean"] > 0 for m in done)
    # the length reward is off before its warm-up and on after
    assert all(m["length_weight"] == 0 for m in done if m["iteration"] < 1)
    assert all(m["length_weight"] > 0 for m in done if m["iteration"] >= 1)
    assert any("heldout_pass_at_1" in m for m in history)
    for name in (
        "report.md",
        "heldout_pass_at_1.png",
        "reward.png",
        "loss.png",
        "logprob_mismatch_max.png",
        "run_config.json",
    ):
        assert os.path.exists(os.path.join(out, name)), name
    assert os.listdir(os.path.join(out, "tensorboard"))
    # history.json holds the same per-iteration metrics as the checkpoint, for the reproduction
    saved = json.load(open(os.path.join(out, "history.json")))
    assert saved["rl"] == history and len(saved["sft"]) == cfg.sft.steps
    # The published RL model loads back and is what the run returned.
    _, params = convert.load_hf(os.path.join(out, "rl_model"))
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(result["params"]))
    assert any(line.startswith("it   2 |") for line in lines)
    # The easy-to-hack and always-solved filters ran on the SFT model; their counts add up.
    removed = hist["removed"]
    assert (removed["pool"], removed["easy_to_hack_tries"]) == (24, 2)
    kept = removed["pool"] - removed["easy_to_hack"] - removed["solved"]
    assert len(extra["train_ids"]) == kept
    assert any(line.startswith(f"difficulty: {kept} of 24 problems kept") for line in lines)
    report = open(os.path.join(out, "report.md")).read()
    hack = f"| easy to hack (right within 2 no-reasoning tries) | {removed['easy_to_hack']} |"
    assert hack in report, report


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_prompt_set_drops_overlong_prompts_and_restarts_after_a_failed_start(
    vllm_engine, tiny_hf_dir, tmp_path
):
    from k15jax.data import tasks

    # Built-in-task problems in JSONL files, with prompts over the limit in both, and a
    # multiple-choice, a true/false and a proof problem in the RL pool.
    long = lambda i: "Q:" + "+".join(["1"] * (15 + i)) + "\n"  # noqa: E731  (32+ tokens)
    row = lambda e, i: {"id": f"p{i}", "prompt": e.prompt, "answer": e.answer}  # noqa: E731
    pool = [row(e, i) for i, e in enumerate(tasks.generate(16, seed=5, max_terms=3))]
    pool[3:3] = [{"id": f"long{i}", "prompt": long(i), "answer": str(15 + i)} for i in range(3)]
    pool += [
        {"id": "mc", "prompt": "Q:1+1\n(A) 1 (B) 2 (C) 3 (D) 4", "answer": "B"},
        {"id": "tf", "prompt": "Is 1+1 two?", "answer": "True"},
        {"id": "pr", "prompt": "Prove that 1+1=2.", "answer": "proof"},
    ]
    held = [row(e, i) for i, e in enumerate(tasks.generate(6, seed=5, split="held_out"))]
    held += [{"id": f"hlong{i}", "prompt": long(i), "answer": str(15 + i)} for i in range(2)]
    task = prompt_sets.TaskConfig(
        data=_jsonl(tmp_path / "pool.jsonl", pool),
        eval_data=_jsonl(tmp_path / "held.jsonl", held),
        max_prompt_tokens=24,
        overlong_prompts="error",
    )
    cfg = dataclasses.replace(
        TINY,
        out_dir=str(tmp_path / "run"),
        task=task,
        rl=dataclasses.replace(TINY.rl, iterations=1, eval_every=0),
        partial=partial.PartialConfig(budget=32, max_length=32),
    )
    # A failed start: the first over-long prompt stops the run after run_config.json is written.
    with pytest.raises(prompt_sets.DataError, match="problem long0: prompt of 32 tokens exceeds"):
        loop.run(cfg, engine=vllm_engine, progress=_quiet, console=lambda line: None)
    assert os.path.exists(os.path.join(cfg.out_dir, "run_config.json"))
    # The corrected command runs in the same directory.
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(task, overlong_prompts="drop"))
    lines = []
    try:
        loop.run(cfg, engine=vllm_engine, progress=_quiet, console=lines.append)
    finally:
        vllm_engine.load_weights(tiny_hf_dir[2])  # leave the shared engine as it was
    saved = json.load(open(os.path.join(cfg.out_dir, "run_config.json")))
    assert saved["task"]["overlong_prompts"] == "drop"
    results = json.load(open(os.path.join(cfg.out_dir, "results.json")))
    removed = results["removed"]
    assert removed["screen"] == {"multiple_choice": 1, "true_false": 1, "proof": 1}
    assert removed["overlong"] == {"train": 3, "held_out": 2}
    assert removed["pool"] == 16  # what the difficulty and easy-to-hack filters saw
    assert results["sft"]["problems"] == results["rl"]["problems"] == 6
    assert "screen removed 3 of 22 problems (multiple_choice 1, true_false 1, proof 1)" in lines
    assert (
        "prompts over --max_prompt_tokens=24 dropped: 3 of the RL pool, 2 held-out (first: long0)"
    ) in lines
    assert any(line.startswith("it   0 |") for line in lines), lines
    report = open(os.path.join(cfg.out_dir, "report.md")).read()
    for row_text in (
        "| screen: multiple choice | 1 |",
        "| screen: proof | 1 |",
        "| RL pool: prompt over 24 tokens | 3 |",
        "| held-out: prompt over 24 tokens | 2 |",
        "| easy to hack (right within 2 no-reasoning tries) |",
    ):
        assert row_text in report, report


def _state_target(cfg, params):
    from k15jax.model import sharding, tokenizer
    from k15jax.train import train_step

    opt = train_step.make_optimizer(cfg.rl.learning_rate, max_grad_norm=cfg.rl.max_grad_norm)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.builtin().vocab_size)
    return train_step.init_state(params, model_cfg, opt, sharding.make_mesh(cfg.mesh))


def test_bad_input_stops_with_a_clear_message(tmp_path):
    cfg = dataclasses.replace(TINY, out_dir=str(tmp_path / "a"))
    run_config.check_out_dir(cfg)
    (tmp_path / "a" / "eval_sft.json").write_text("{}")  # a result: the directory is taken
    other = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, tau=0.5))
    with pytest.raises(ValueError, match=r"different run's checkpoints .*\['rl'\]: rl.tau"):
        run_config.check_out_dir(other)
    # Engine knobs and the mesh may change on resume; the config on disk is the first run's.
    run_config.check_out_dir(dataclasses.replace(cfg, mesh=(1, 1, -1)))
    # A run written before a setting existed resumes when the setting keeps its default, and
    # not when it is changed.
    saved = json.loads((tmp_path / "a" / "run_config.json").read_text())
    del saved["rl"]["engine_reference_max_gap"], saved["servers"]
    (tmp_path / "a" / "run_config.json").write_text(json.dumps(saved))
    run_config.check_out_dir(cfg)
    (tmp_path / "a" / "run_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"rl.engine_reference_max_gap"):
        run_config.check_out_dir(
            dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, engine_reference_max_gap=-1))
        )
    with pytest.raises(FileNotFoundError, match="no such directory"):
        loop.prepare(dataclasses.replace(cfg, model_dir=str(tmp_path / "missing")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": 3}\n')
    with pytest.raises(Exception, match=r"bad.jsonl:2: field 'prompt'"):
        loop.prepare(dataclasses.replace(cfg, task=prompt_sets.TaskConfig(data=str(bad))))
    with pytest.raises(ValueError, match="reward="):
        prompt_sets.TaskConfig(reward="bleu")
    with pytest.raises(ValueError, match="micro_batches=3 must be >= 1 and divide"):
        run_config.RlConfig(groups_per_step=16, micro_batches=3)
    with pytest.raises(ValueError, match=r"mesh \(16, 1, 1\) \(data, fsdp, tensor\) needs 16"):
        loop.prepare(dataclasses.replace(cfg, mesh=(16, 1, 1)))
    with pytest.raises(ValueError, match="RL micro-batch of 4 rows does not split over"):
        loop.prepare(dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, micro_batches=2)))


def test_another_trainer_dtype_refuses_to_resume(tmp_path):
    # The trainer's dtype is the model's (not the engine's): a bf16 run cannot continue a f32
    # run's checkpoints, and the message names the field and both values.
    cfg = dataclasses.replace(TINY, out_dir=str(tmp_path / "run"))
    run_config.check_out_dir(cfg)
    os.makedirs(tmp_path / "run" / "ckpt" / "sft" / "step_5")  # a checkpoint: the run is taken
    bf16 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="bfloat16"))
    with pytest.raises(ValueError, match="model.dtype: saved 'float32', now 'bfloat16'"):
        run_config.check_out_dir(bf16)
    # ... while the engine's dtype alone is an engine knob.
    run_config.check_out_dir(
        dataclasses.replace(cfg, vllm=dataclasses.replace(cfg.vllm, dtype="bfloat16"))
    )


def test_flags_reject_unknown_values():
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.rl", "--reward=bleu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "reward" in proc.stderr and "bleu" in proc.stderr


RESUME_FLAGS = [
    "--sft_steps=12",
    "--iterations=4",
    "--prompts_per_iteration=4",
    "--samples_per_prompt=4",
    "--groups_per_step=2",
    "--budget=40",
    "--max_length=100",
    "--eval_problems=8",
    "--eval_samples=2",
    "--learning_rate=1e-4",
    "--kv_cache_bytes=268435456",
    "--train_problems=24",
    "--sft_examples=200",
    "--max_terms=3",
    "--sft_batch_size=8",
    "--difficulty_samples=2",
    "--easy_to_hack_tries=2",
    "--checkpoint_every=1",
    "--eval_every=0",
    "--max_prompt_tokens=24",
    "--micro_batches=2",
    "--mesh=data:2,fsdp:2,tensor:2",
]


def _launch(out_dir, tiny_flags):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.rl", f"--out_dir={out_dir}", *tiny_flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_params(tmp_path):
    out_a, out_b = str(tmp_path / "killed"), str(tmp_path / "straight")
    proc = _launch(out_a, RESUME_FLAGS)
    seen = []
    deadline = time.time() + 600
    for line in proc.stdout:  # kill during iteration 2 (iteration 1's line has just printed)
        seen.append(line)
        if "it   1 |" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
        assert time.time() < deadline, "".join(seen[-20:])
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    assert not os.path.exists(os.path.join(out_a, "rl_model"))
    resumed = subprocess.run(
        [sys.executable, "-m", "experiments.rl", f"--out_dir={out_a}", *RESUME_FLAGS],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "it   0 |" not in resumed.stdout and "it   3 |" in resumed.stdout
    straight = subprocess.run(
        [sys.executable, "-m", "experiments.rl", f"--out_dir={out_b}", *RESUME_FLAGS],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    _, a = convert.load_hf(os.path.join(out_a, "rl_model"))
    _, b = convert.load_hf(os.path.join(out_b, "rl_model"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
