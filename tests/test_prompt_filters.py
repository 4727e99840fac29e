"""What a run leaves out of its prompt set before training (screen, over-long prompts, the
easy-to-hack and always-solved filters), the engine's context, and when a run directory may
take a new config. No engine, no model: each test runs in about a second."""

import dataclasses
import json
import os

import pytest

from k15jax import data, loop, run_config, run_setup, scoring, tasks, tokenizer
from k15jax.rollout import Completion


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_pool_is_screened_and_overlong_prompts_dropped_or_refused(tmp_path):
    long = "Q:" + "+".join(["1"] * 15) + "\n"  # 32 tokens with the built-in tokenizer
    pool = _jsonl(tmp_path / "pool.jsonl", [
        {"id": "a", "prompt": "Q:1+2\n", "answer": "3"},
        {"id": "long1", "prompt": long, "answer": "15"},
        {"id": "mc", "prompt": "Q:1+1\n(A) 1 (B) 2 (C) 3 (D) 4", "answer": "B"},
        {"id": "b", "prompt": "Q:2+2\n", "answer": "4"},
        {"id": "tf", "prompt": "Is 1+1 two?", "answer": "Yes"},
        {"id": "long2", "prompt": long + "+1", "answer": "16"},
    ])  # fmt: skip
    held = _jsonl(tmp_path / "held.jsonl", [
        {"id": "h1", "prompt": "Q:3+3\n", "answer": "6"},
        {"id": "hlong", "prompt": long, "answer": "15"},
    ])  # fmt: skip
    task = data.TaskConfig(data=pool, eval_data=held, max_prompt_tokens=24)
    cfg = dataclasses.replace(run_config.RunConfig(), task=task)
    tok = tokenizer.builtin()
    encode = lambda text: run_setup.encode_prompt(tok, task, text)  # noqa: E731
    problems, removed = run_setup.load_problems(cfg, encode)
    assert [p.id for p in problems.train] == ["a", "b"]
    assert [p.id for p in problems.held_out] == ["h1"]
    assert removed.screened == {"multiple_choice": ("mc",), "true_false": ("tf",), "proof": ()}
    assert (removed.overlong_train, removed.overlong_held_out) == (("long1", "long2"), ("hlong",))
    # The template counts toward the limit.
    templated = dataclasses.replace(task, prompt_template="Solve: {prompt}")
    problems, removed = run_setup.load_problems(
        dataclasses.replace(cfg, task=templated),
        lambda text: run_setup.encode_prompt(tok, templated, text),
    )
    assert [p.id for p in problems.train] == ["a", "b"] and len(removed.overlong_train) == 2
    # --noscreen keeps the true/false row; the multiple-choice one (30 tokens) is too long.
    problems, removed = run_setup.load_problems(
        dataclasses.replace(cfg, task=dataclasses.replace(task, screen=False)), encode
    )
    assert [p.id for p in problems.train] == ["a", "b", "tf"] and removed.screened == {}
    assert removed.overlong_train == ("long1", "mc", "long2")
    strict = dataclasses.replace(cfg, task=dataclasses.replace(task, overlong_prompts="error"))
    with pytest.raises(data.DataError, match=r"pool.jsonl\): problem long1: prompt of 32 tokens"):
        run_setup.load_problems(strict, encode)
    # The built-in task is not screened.
    _, removed = run_setup.load_problems(run_config.RunConfig(), encode)
    assert removed.screened == {} and removed.overlong_train == ()


class ScriptedEngine:
    """Answers with "answer: <right or wrong>": problem `i` right in `plain[i]` of the samples
    of a normal prompt, `direct[i]` of those of a prompt that ends with the forced start."""

    def __init__(self, tok, plain, direct):
        self.tok, self.plain, self.direct = tok, plain, direct
        self.prompts = []

    def generate(self, prompts, spec):
        out = []
        for i, ids in enumerate(prompts):
            text = self.tok.decode(ids)
            self.prompts.append(text)
            forced = text.endswith("answer: ")
            right = (self.direct if forced else self.plain)[int(text.split("+")[0][-1])]
            for j in range(spec.n):
                answer = "1" if j < right * spec.n else "9"
                ids_out = self.tok.encode(answer if forced else f"answer: {answer}")
                out.append(Completion(i, ids_out, [0.0] * len(ids_out), "stop"))
        return out


def _setup(cfg, problems):
    tok = tokenizer.builtin()
    scorer = scoring.Scorer(reward_fn=tasks.reward, decode=tok.decode)
    problem_set = data.ProblemSet(tuple(problems), (), ())
    return run_setup.Setup(cfg, None, None, tok, problem_set, scorer, None, data.Removed({}))


def test_select_problems_drops_easy_to_hack_and_always_solved():
    # Problem i is "Q:i+0" with answer 1: the scripted engine's "1" is right.
    problems = [data.Problem(f"p{i}", f"Q:{i}+0\n", "1") for i in range(4)]
    base = run_config.RunConfig()
    task = dataclasses.replace(base.task, prompt_template="<{prompt}>")
    rl = dataclasses.replace(base.rl, difficulty_samples=4, easy_to_hack_tries=2)
    setup = _setup(dataclasses.replace(base, task=task, rl=rl), problems)
    # p0 always solved, p1 guessed without reasoning, p2 half solved, p3 never.
    engine = ScriptedEngine(setup.tok, plain=[1.0, 1.0, 0.5, 0.0], direct=[0.0, 0.5, 0.0, 0.0])
    chosen = loop.select_problems(setup, engine)
    assert chosen["train_ids"] == ["p2", "p3"] and chosen["rates"] == [0.5, 0.0]
    assert (chosen["pool"], chosen["easy_to_hack"], chosen["solved"]) == (4, 1, 1)
    # The no-reasoning prompt is the templated prompt followed by the forced answer start.
    assert "<Q:1+0\n>answer: " in engine.prompts
    assert loop.difficulty_line(chosen) == (
        "difficulty: 2 of 4 problems kept (removed: easy-to-hack (2 tries) 1, always solved 1), "
        "mean SFT pass rate 0.625"
    )
    # 0 tries: no forced prompt is sent, and the guessable problem stays.
    off = dataclasses.replace(setup.cfg, rl=dataclasses.replace(rl, easy_to_hack_tries=0))
    engine = ScriptedEngine(setup.tok, plain=[1.0, 0.5, 0.5, 0.0], direct=[1.0] * 4)
    chosen = loop.select_problems(dataclasses.replace(setup, cfg=off), engine)
    assert chosen["train_ids"] == ["p1", "p2", "p3"] and chosen["easy_to_hack"] == 0
    assert not any(p.endswith("answer: ") for p in engine.prompts)
    assert "easy-to-hack off" in loop.difficulty_line(chosen)


def test_engine_context_is_derived_and_checked():
    cfg = run_config.RunConfig()
    assert cfg.vllm.max_model_len is None
    assert run_config.engine_config(cfg).max_model_len == cfg.seq_len == 24 + 256
    big = dataclasses.replace(cfg.vllm, max_model_len=2048)
    assert run_config.engine_config(dataclasses.replace(cfg, vllm=big)).max_model_len == 2048
    with pytest.raises(ValueError, match=r"max_model_len=100 is below .* 24 \+ 256 = 280"):
        dataclasses.replace(cfg, vllm=dataclasses.replace(cfg.vllm, max_model_len=100))
    # A context the model cannot hold stops the run before any weights are built.
    longer = dataclasses.replace(cfg, partial=dataclasses.replace(cfg.partial, max_length=600))
    with pytest.raises(
        run_config.ConfigError, match="context of 624 tokens .*max_position_embeddings=512"
    ):
        run_setup.prepare(longer)


def test_a_directory_without_results_takes_a_new_config(tmp_path):
    cfg = dataclasses.replace(run_config.RunConfig(), out_dir=str(tmp_path / "run"))
    path = os.path.join(cfg.out_dir, "run_config.json")
    run_config.check_out_dir(cfg)
    # The first run stopped before any result: corrected flags take the directory.
    fixed = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, tau=0.5))
    run_config.check_out_dir(fixed)
    assert json.load(open(path))["rl"]["tau"] == 0.5
    # Once it holds a result, only the same config (engine knobs aside) continues.
    out = cfg.out_dir
    open(os.path.join(out, "eval_sft.json"), "w").write("{}")
    os.makedirs(os.path.join(out, "ckpt", "rl", "step_3"))
    assert run_config.run_products(out) == ["ckpt/rl step 3", "eval_sft.json"]
    with pytest.raises(
        run_config.ConfigError,
        match=r"\(ckpt/rl step 3, eval_sft.json; .*rl.tau: saved 0.5, now 0.1",
    ):
        run_config.check_out_dir(cfg)
    run_config.check_out_dir(dataclasses.replace(fixed, mesh=(1, 1, -1)))
    os.remove(os.path.join(out, "eval_sft.json"))
    with pytest.raises(run_config.ConfigError, match="ckpt/rl step 3; config differs"):
        run_config.check_out_dir(cfg)
    os.rmdir(os.path.join(out, "ckpt", "rl", "step_3"))
    run_config.check_out_dir(cfg)  # nothing computed any more
    assert json.load(open(path))["rl"]["tau"] == 0.1
