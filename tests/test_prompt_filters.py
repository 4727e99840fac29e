"""What a run leaves out of its prompt set before training (screen, over-long prompts, the
easy-to-hack and always-solved filters), the engine's context, and when a run directory may
take a new config. No engine, no model: each test runs in about a second."""

import dataclasses
import json
import os
import re

import pytest

from k15jax.data import prompt_sets, tasks
from k15jax.model import tokenizer
from k15jax.rewards import scoring
from k15jax.rollout.engines import Completion
from k15jax.run import difficulty, run_config, run_setup
from k15jax.train import sft


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
    task = prompt_sets.TaskConfig(data=pool, eval_data=held, max_prompt_tokens=24)
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
    with pytest.raises(
        prompt_sets.DataError, match=r"pool.jsonl\): problem long1: prompt of 32 tokens"
    ):
        run_setup.load_problems(strict, encode)
    # The built-in task is not screened.
    _, removed = run_setup.load_problems(run_config.RunConfig(), encode)
    assert removed.screened == {} and removed.overlong_train == ()


def test_sft_traces_from_files_leave_out_held_out_prompts_and_overlong_traces(tmp_path):
    """Long-CoT SFT from files: the pool's `response` rows and an --sft_data file become warm-up
    traces, except a held-out problem's (it would leak into evaluation) and any longer than a
    trainer row; the traces are tokenized with the rollouts' prompt wrapping."""
    long_response = "step " * 30  # 150 tokens: over a row of 24 + 100
    pool = _jsonl(tmp_path / "pool.jsonl", [
        {"id": "a", "prompt": "Q:1+2\n", "answer": "3", "response": "1+2=3\nanswer: 3"},
        {"id": "b", "prompt": "Q:2+2\n", "answer": "4"},  # no response: RL only
        {"id": "c", "prompt": "Q:4+4\n", "answer": "8", "response": long_response},
    ])  # fmt: skip
    held = _jsonl(tmp_path / "held.jsonl", [{"id": "h", "prompt": "Q:3+3\n", "answer": "6"}])
    sft_file = _jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "Q:5+1\n", "response": "5+1=6\nanswer: 6"},
        {"prompt": " Q:3+3\n", "response": "3+3=6\nanswer: 6"},  # the held-out problem
    ])  # fmt: skip
    task = prompt_sets.TaskConfig(
        data=pool, eval_data=held, sft_data=sft_file, max_prompt_tokens=24,
        prompt_template="Solve {prompt}",
    )  # fmt: skip
    cfg = dataclasses.replace(
        run_config.RunConfig(), task=task, partial=dataclasses.replace(
            run_config.RunConfig().partial, budget=100, max_length=100)
    )  # fmt: skip
    tok = tokenizer.builtin()
    encode = lambda text: run_setup.encode_prompt(tok, task, text)  # noqa: E731
    problems, removed = run_setup.load_problems(cfg, encode, response_tokens=tok.encode)
    assert problems.sft_traces == (
        ("Q:1+2\n", "1+2=3\nanswer: 3"),
        ("Q:5+1\n", "5+1=6\nanswer: 6"),
    )
    assert (removed.sft_held_out, removed.sft_overlong) == (1, 1)
    assert removed.counts()["sft"] == {"held_out": 1, "overlong": 1}
    assert [p.id for p in problems.train] == ["a", "b", "c"]  # every row stays an RL problem
    (prompt_ids, response_ids), _ = sft.tokenize(
        problems.sft_traces, tok.encode, tok.eos_id, encode_prompt=encode
    )
    assert tok.decode(prompt_ids) == "Solve Q:1+2\n" and response_ids[-1] == tok.eos_id
    strict = dataclasses.replace(cfg, task=dataclasses.replace(task, overlong_prompts="error"))
    message = "SFT trace 'Q:4+4\\n': 163 tokens exceed a trainer row of 124"  # 12 + 150 + eos
    with pytest.raises(prompt_sets.DataError, match=re.escape(message)):
        run_setup.load_problems(strict, encode, response_tokens=tok.encode)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q:1+1\n", "response": "ok"}, {"prompt": "x"}])
    with pytest.raises(
        prompt_sets.DataError, match=r"bad.jsonl:2: field 'response' must be a non-empty"
    ):
        prompt_sets.load_traces(bad)


def test_chat_template_wraps_every_prompt_of_the_run(tmp_path):
    """--chat_template: a model directory's template wraps the prompts that evaluation and the
    difficulty pass send to the engine (one encoder for all: `Setup.prompt_ids`), counts toward
    the prompt limit, and stays in the directories the run writes; a model without one is a
    one-line configuration error."""
    import jax

    from k15jax.model import convert, decoder

    template = (
        "{% for m in messages %}User: {{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}A:{% endif %}"
    )
    tok = dataclasses.replace(tokenizer.builtin(), chat_template=template)
    shape = dataclasses.replace(run_config.RunConfig().model, vocab_size=tok.vocab_size)
    model_dir = str(tmp_path / "m")
    convert.save_hf(shape, decoder.init(shape, jax.random.key(0)), model_dir, tokenizer=tok)
    rows = [{"id": f"p{i}", "prompt": f"Q:{i}+1\n", "answer": str(i + 1)} for i in range(6)]
    task = prompt_sets.TaskConfig(
        data=_jsonl(tmp_path / "pool.jsonl", rows[:4]),
        eval_data=_jsonl(tmp_path / "held.jsonl", rows[4:]),
        chat_template=True,
        max_prompt_tokens=24,
    )
    cfg = dataclasses.replace(run_config.RunConfig(), model_dir=model_dir, task=task)
    setup = run_setup.prepare(cfg)
    assert setup.tok.chat_template == template
    wrapped = lambda p: f"User: {p.prompt}A:"  # noqa: E731
    engine = ScriptedEngine(setup.tok, plain=[1.0] * 10, direct=[0.0] * 10)
    run_setup.evaluate(dataclasses.replace(setup, cfg=cfg), engine)
    assert engine.prompts == [wrapped(p) for p in setup.problems.held_out]
    engine.prompts.clear()
    difficulty.select_problems(setup, engine)
    seen = set(engine.prompts)
    assert {wrapped(p) for p in setup.problems.train} <= seen  # the difficulty pass
    assert {wrapped(p) + "answer: " for p in setup.problems.train} <= seen  # easy-to-hack
    # The template counts toward --max_prompt_tokens (18 + 8 wrapping characters > 24).
    first = setup.problems.train[0]
    assert len(setup.prompt_ids(first)) == len(wrapped(first))  # one token per character
    long_rows = [{"id": "x", "prompt": "Q:" + "1+" * 7 + "1\n", "answer": "8"}, *rows[1:4]]
    long_task = dataclasses.replace(task, data=_jsonl(tmp_path / "long.jsonl", long_rows))
    setup = run_setup.prepare(dataclasses.replace(cfg, task=long_task))
    assert setup.removed.overlong_train == ("x",)
    # Directories the run writes keep the template.
    convert.save_hf(shape, setup.params, str(tmp_path / "out"), tokenizer=setup.tok)
    assert tokenizer.load(str(tmp_path / "out")).chat_template == template
    plain_dir = str(tmp_path / "plain")
    convert.save_hf(shape, setup.params, plain_dir, tokenizer=tokenizer.builtin())
    with pytest.raises(run_config.ConfigError, match="--chat_template: .*plain has no chat"):
        run_setup.prepare(dataclasses.replace(cfg, model_dir=plain_dir))


class ScriptedEngine:
    """Answers with "answer: <right or wrong>": problem `i` right in `plain[i]` of the samples
    of a normal prompt, `direct[i]` of those of a prompt that ends with the forced start."""

    def __init__(self, tok, plain, direct):
        self.tok, self.plain, self.direct = tok, plain, direct
        self.prompts = []

    def generate(self, prompts, spec, **kw):
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
    problem_set = prompt_sets.ProblemSet(tuple(problems), (), ())
    return run_setup.Setup(cfg, None, None, tok, problem_set, scorer, None, prompt_sets.Removed({}))


def test_select_problems_drops_easy_to_hack_and_always_solved():
    # Problem i is "Q:i+0" with answer 1: the scripted engine's "1" is right.
    problems = [prompt_sets.Problem(f"p{i}", f"Q:{i}+0\n", "1") for i in range(4)]
    base = run_config.RunConfig()
    task = dataclasses.replace(base.task, prompt_template="<{prompt}>")
    rl = dataclasses.replace(base.rl, difficulty_samples=4, easy_to_hack_tries=2)
    setup = _setup(dataclasses.replace(base, task=task, rl=rl), problems)
    # p0 always solved, p1 guessed without reasoning, p2 half solved, p3 never.
    engine = ScriptedEngine(setup.tok, plain=[1.0, 1.0, 0.5, 0.0], direct=[0.0, 0.5, 0.0, 0.0])
    chosen = difficulty.select_problems(setup, engine)
    assert chosen["train_ids"] == ["p2", "p3"] and chosen["rates"] == [0.5, 0.0]
    assert (chosen["pool"], chosen["easy_to_hack"], chosen["solved"]) == (4, 1, 1)
    # The no-reasoning prompt is the templated prompt followed by the forced answer start.
    assert "<Q:1+0\n>answer: " in engine.prompts
    assert difficulty.pool_line(chosen) == (
        "difficulty: 2 of 4 problems kept (removed: easy-to-hack (2 tries) 1, always solved 1), "
        "mean SFT pass rate 0.625"
    )
    # 0 tries: no forced prompt is sent, and the guessable problem stays.
    off = dataclasses.replace(setup.cfg, rl=dataclasses.replace(rl, easy_to_hack_tries=0))
    engine = ScriptedEngine(setup.tok, plain=[1.0, 0.5, 0.5, 0.0], direct=[1.0] * 4)
    chosen = difficulty.select_problems(dataclasses.replace(setup, cfg=off), engine)
    assert chosen["train_ids"] == ["p1", "p2", "p3"] and chosen["easy_to_hack"] == 0
    assert not any(p.endswith("answer: ") for p in engine.prompts)
    assert "easy-to-hack off" in difficulty.pool_line(chosen)


def test_engine_context_is_derived_and_checked():
    cfg = run_config.RunConfig()
    assert cfg.vllm.max_model_len is None
    assert run_config.engine_config(cfg).max_model_len == cfg.seq_len == 24 + 192
    big = dataclasses.replace(cfg.vllm, max_model_len=2048)
    assert run_config.engine_config(dataclasses.replace(cfg, vllm=big)).max_model_len == 2048
    with pytest.raises(ValueError, match=r"max_model_len=100 is below .* 24 \+ 192 = 216"):
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
