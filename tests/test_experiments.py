"""Every experiment script builds its configuration from default flags, and flags reach it."""

import dataclasses

from absl import flags

from experiments import convert, eval, rl, run_flags, sft  # noqa: F401 - define their flags
from experiments.benchmarks import rollout_bench  # noqa: F401 - defines its flags
from k15jax.model.config import KernelConfig
from k15jax.run import run_config


def _parse(*args):
    f = flags.FLAGS
    f.unparse_flags()
    f(["prog", *args])


def test_default_flags_give_the_default_config():
    _parse()
    assert run_flags.make_config() == run_config.RunConfig()


def test_flags_reach_the_config():
    _parse(
        "--tau=0.05",
        "--objective=rest",
        "--rest_threshold=0.8",
        "--samples_per_prompt=16",
        "--budget=100",
        "--max_length=200",
        "--length_weight=0.3",
        "--curriculum_iterations=4",
        "--kv_cache_bytes=0",
        "--data=x.jsonl",
        "--reward=math",
        "--attention_impl=xla_chunked",
        "--logprob_impl=xla_chunked",
        "--remat",
        "--mesh=data:2,tensor:-1",
        "--micro_batches=4",
        "--param_dtype=bfloat16",
        "--easy_to_hack_tries=0",
        "--overlong_prompts=error",
        "--noscreen",
        "--answer_prefix=The answer is ",
        "--max_model_len=4096",
        "--engine_reference_max_gap=-1",
        "--sft_data=traces.jsonl",
        "--chat_template",
        "--curriculum_order=uniform",
        "--priority_floor=0.05",
        "--eval_samples=8",
        "--eval_ks=8,1,2",
        "--task_family=columns",
        "--min_digits=3",
        "--max_digits=5",
        "--min_terms=3",
        "--model_layers=3",
        "--model_width=64",
    )
    cfg = run_flags.make_config()
    assert (cfg.task.family, cfg.task.min_digits, cfg.task.max_digits) == ("columns", 3, 5)
    assert cfg.task.min_terms == 3 and cfg.model.num_hidden_layers == 3
    m = cfg.model
    assert (m.hidden_size, m.intermediate_size, m.num_attention_heads) == (64, 192, 2)
    assert cfg.task.sft_data == "traces.jsonl" and cfg.task.chat_template
    assert cfg.sampler.order == "uniform" and cfg.eval.ks == (1, 2, 8)
    assert cfg.sampler.epsilon == 0.05
    _parse("--eval_samples=2")  # the default k=4 is left out rather than refused
    assert run_flags.make_config().eval.ks == (1,)
    assert cfg.rl.engine_reference_max_gap == -1
    assert cfg.rl.easy_to_hack_tries == 0 and cfg.task.overlong_prompts == "error"
    assert not cfg.task.screen and cfg.task.answer_prefix == "The answer is "
    assert cfg.vllm.max_model_len == run_config.engine_config(cfg).max_model_len == 4096
    assert cfg.model.kernels == KernelConfig(
        attention_impl="xla_chunked", logprob_impl="xla_chunked", remat=True
    )
    assert cfg.mesh == (2, 1, -1) and cfg.rl.micro_batches == 4
    assert cfg.model.dtype == cfg.vllm.dtype == "bfloat16"
    assert cfg.rl.tau == 0.05 and cfg.rl.samples_per_prompt == 16
    assert cfg.rl.objective == cfg.rl.step_config().objective == "rest"
    assert cfg.rl.rest_threshold == cfg.rl.step_config().rest_threshold == 0.8
    assert (cfg.partial.budget, cfg.partial.max_length) == (100, 200)
    assert cfg.length.weight == 0.3 and cfg.sampler.curriculum_iterations == 4
    assert cfg.vllm.kv_cache_memory_bytes is None
    task = dataclasses.replace(
        cfg.task,
        data=None,
        sft_data=None,
        chat_template=False,
        reward="task",
        overlong_prompts="drop",
        screen=True,
        answer_prefix="answer: ",
        family="columns",
        min_terms=2,
        min_digits=2,
        max_digits=3,
    )
    assert task == run_config.RunConfig().task
    _parse()


def _run_script(module: str, *args, tmp_path) -> str:
    """Runs `python -m module args` (scripts whose flag names overlap the run flags run alone)."""
    import pathlib
    import subprocess
    import sys

    out = tmp_path / f"{module.rsplit('.', 1)[-1]}.json"
    proc = subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", f"--out={out}", *args],
        capture_output=True,
        text=True,
        cwd=pathlib.Path(__file__).parents[1],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.exists()
    return proc.stdout


def test_kernel_bench_speed_path_runs_on_cpu(tmp_path):
    text = _run_script(
        "benchmarks.kernel_bench", "--impls=xla_chunked,triton", "--speed_lengths=128",
        "--heads=2", "--tokens_per_batch=128", "--logprob_impls=", "--repeats=1",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert "| xla_chunked | 128 |" in text
    assert "| triton | - |" in text and "jax-triton" in text  # recorded, not fatal, on CPU


def test_bad_mesh_flag_is_refused():
    import pytest
    from absl import app

    with pytest.raises(app.UsageError, match="'pipe:2' is not AXIS:SIZE"):
        run_flags.parse_mesh("data:2,pipe:2")
    assert run_flags.parse_mesh("fsdp:4") == (1, 4, 1)


def test_sandbox_bench_runs(tmp_path):
    text = _run_script("benchmarks.sandbox_bench", "--programs=4", "--repeats=1", tmp_path=tmp_path)
    assert "| rlimits_only | stdio |" in text


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys, tmp_path):
    import pytest

    from k15jax.data import prompt_sets
    from k15jax.run import loop

    def fails_with(error):
        def run(cfg):
            raise error

        return run

    cases = [
        (("--tau=0",), None, "error: tau=0.0 must be > 0"),
        (("--max_model_len=100",), None, "error: max_model_len=100 is below"),
        ((), prompt_sets.DataError("x.jsonl:3: invalid JSON"), "error: x.jsonl:3: invalid JSON"),
        ((), run_config.ConfigError("runs/x holds a\ndifferent run"), "runs/x holds a different"),
        ((), FileNotFoundError("--model=/m: no such directory"), "error: --model=/m: no such"),
    ]
    for args, error, line in cases:
        _parse(f"--out_dir={tmp_path}", *args)
        monkeypatch.setattr(loop, "run", fails_with(error))
        with pytest.raises(SystemExit) as exit_info:
            rl.main(["rl"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and line in err, err
    # Anything else is a bug: its traceback stays.
    monkeypatch.setattr(loop, "run", fails_with(KeyError("sft")))
    with pytest.raises(KeyError):
        rl.main(["rl"])
    _parse()


def test_broken_prompt_file_is_one_line_before_any_model_is_built(tmp_path):
    import subprocess
    import sys
    import time

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q:1+1\\n", "answer": "2"}\n{"prompt": "Q:2+2\\n", "answer": }\n')
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.rl", f"--out_dir={tmp_path / 'run'}", f"--data={bad}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {bad}:2: invalid JSON (Expecting value at column 33)"], lines
    assert time.perf_counter() - t0 < 60  # imports only: no model, no engine


def test_verbosity_sets_the_engine_log_level():
    _parse()
    assert run_flags.make_config().vllm.log_level == "WARNING"
    _parse("-v", "1")
    assert run_flags.make_config().vllm.log_level == "INFO"
    _parse("--verbosity=0")  # the run's own INFO lines; the libraries stay at warnings
    assert run_flags.make_config().vllm.log_level == "WARNING"
    _parse()
