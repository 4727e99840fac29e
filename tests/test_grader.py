"""A judge model grading RL samples (`scoring.Grader`, `--grader`): which samples it is asked
about, how its verdicts become rewards, its counts and log, the config checks, the report, and
a whole run with a judge on a second real vLLM engine."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest

from k15jax.data import prompt_sets
from k15jax.model import tokenizer
from k15jax.rewards import judge as judge_lib
from k15jax.rewards import length as length_reward
from k15jax.rewards import scoring
from k15jax.rollout import engines, partial
from k15jax.run import report, run_config, run_setup

TOK = tokenizer.builtin()
PROBLEMS = [
    prompt_sets.Problem("a", "Q:5+7\n", "12"),
    prompt_sets.Problem("b", "Q:2+2\n", "4"),
]
TEMPLATE = "[{problem}|{reference}|<response>{response}</response>]"


class VerdictEngine:
    """A judge engine that answers by a table of the response's last word (and counts calls)."""

    def __init__(self, table: dict[str, tuple[str, str]]):
        self.table = table  # last word of the response -> (judge text, finish reason)
        self.asked = []

    def generate(self, prompts, spec, *, max_tokens=None, seeds=None):
        out = []
        for i, p in enumerate(prompts):
            response = TOK.decode(p).rsplit("|<response>", 1)[1].removesuffix("</response>]")
            word = response.split()[-1]
            self.asked.append(response)
            text, reason = self.table[word]
            out.append(engines.Completion(i, TOK.encode(text), [0.0] * len(text), reason))
        return out

    def load_weights(self, params):
        raise NotImplementedError


TABLE = {
    "12": ('{"correct": true}', "stop"),
    "twelve": ('twelve = 12 {"correct": true}', "stop"),
    "13": ('{"correct": false}', "stop"),
    "4": ('{"correct": false}', "stop"),  # wrong: the rules say 4 is right
    "four": ("no verdict at all", "stop"),
    "3": ('{"correct": true}', "stop"),  # wrong, on a repeating sample: never asked
}


def _group(problem, responses):
    samples = []
    for text, reason in responses:
        s = partial.Sample(problem, TOK.encode("Q"))
        ids = TOK.encode(text)
        s.segments.append(partial.Segment(0, ids, [0.0] * len(ids)))
        s.finish_reason = reason
        samples.append(s)
    return partial.Group(problem, samples)


GROUPS = [
    _group(0, [("answer: 12", "stop"), ("answer: twelve", "stop"), ("answer: 13", "stop")]),
    _group(1, [("answer: 4", "stop"), ("answer: four", "stop"), ("answer: 3", "repeat")]),
]
CUT = _group(0, [("answer: 12", "truncated"), ("answer: twelve", "length"), ("answer: 1", "stop")])


def _score(mode, fallback=judge_lib.zero, groups=GROUPS, log_path=None):
    engine = VerdictEngine(dict(TABLE, **{"1": ('{"correct": false}', "stop")}))
    cfg = judge_lib.JudgeConfig(template=TEMPLATE, max_tokens=40, max_prompt_tokens=200)
    judge = judge_lib.Judge(engine, TOK, fallback=fallback, config=cfg)
    grader = scoring.Grader(judge=judge, mode=mode, log_path=log_path)
    scorer = scoring.Scorer(reward_fn=scoring.reward_fn("task"), decode=TOK.decode)
    off = length_reward.LengthPenaltyConfig(weight=0.0, warmup_iterations=0)
    rewards, correct, stats = scoring.score_groups(
        groups, PROBLEMS, scorer, iteration=3, length=off, grader=grader
    )
    return engine, rewards, correct, stats


def test_judge_mode_grades_every_sample_that_ended(tmp_path):
    log = tmp_path / "judge_log.jsonl"
    engine, rewards, correct, stats = _score("judge", log_path=str(log))
    assert len(engine.asked) == 5  # one batch, every sample that stopped by itself
    # 12 yes, twelve yes (rules: no), 13 no, 4 no (rules: yes), four: unusable -> 0 (fallback
    # zero); 3 stopped for repetition: not judged, -0.5 repeat penalty, never correct.
    np.testing.assert_allclose(rewards, [1, 1, 0, 0, 0, -0.5])
    assert correct.tolist() == [True, True, False, False, False, False]
    # Usable verdicts: 4; they differ from the rules on twelve and 4.
    assert stats["judge_calls"] == 5 and stats["judge_malformed"] == 1
    assert stats["judge_disagreements"] == 2
    assert math.isclose(stats["judge_agreement"], 1 - 2 / 4)
    assert stats["accuracy"] == pytest.approx(2 / 6)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 5 and {r["iteration"] for r in rows} == {3}
    four = next(r for r in rows if r["response_end"].endswith("four"))
    assert four["judge_status"] == "missing" and four["judge_text"] == "no verdict at all"
    assert four["rules"] == 0.0 and four["score"] == 0.0


def test_rules_then_judge_asks_only_about_the_rules_misses():
    engine, rewards, correct, stats = _score("rules_then_judge", fallback=scoring.reward_fn("task"))
    # The rules give 12 and 4 their 1 and are not asked about them; 3 repeated: not asked.
    assert sorted(engine.asked) == ["answer: 13", "answer: four", "answer: twelve"]
    np.testing.assert_allclose(rewards, [1, 1, 0, 1, 0, -0.5])
    assert correct.tolist() == [True, True, False, True, False, False]
    # four: unusable -> the rules' 0; disagreements: twelve.
    assert stats["judge_calls"] == 3 and stats["judge_malformed"] == 1
    assert stats["judge_disagreements"] == 1


def test_a_repeating_sample_gets_its_penalty_and_is_not_judged():
    # "answer: 4" is right by the rules but the first sample stopped for repetition: it earns
    # -0.5 (the repeat penalty) whatever the rules or the judge say, and the judge is not asked.
    rep = [_group(1, [("answer: 4", "repeat"), ("answer: 4", "stop")])]
    engine, rewards, correct, stats = _score("rules_then_judge", groups=rep)
    assert engine.asked == []  # the rules gave the stopped one 1
    np.testing.assert_allclose(rewards, [-0.5, 1.0])
    assert correct.tolist() == [False, True]
    engine, rewards, correct, stats = _score("judge", groups=rep)
    assert engine.asked == ["answer: 4"]  # the stopped one only
    np.testing.assert_allclose(rewards, [-0.5, 0.0])  # the judge says no (TABLE)
    assert stats["judge_disagreements"] == 1  # against the rules' 1


def test_the_log_keeps_only_the_iterations_before_a_resume(tmp_path):
    log = tmp_path / "judge_log.jsonl"
    rows = [{"iteration": i, "score": 1.0} for i in (0, 1, 2, 3)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 4, "sc')
    judge = judge_lib.Judge(VerdictEngine(TABLE), TOK)
    grader = scoring.Grader(judge=judge, log_path=str(log))
    grader.start(2)  # resumed at iteration 2: 2, 3 and the torn line go
    assert [json.loads(x)["iteration"] for x in log.read_text().splitlines()] == [0, 1]
    grader.start(0)  # a fresh run
    assert log.read_text() == ""
    scoring.Grader(judge=judge, log_path=str(tmp_path / "absent")).start(3)  # no file: fine


def test_cut_samples_are_never_judged():
    engine, rewards, correct, stats = _score("judge", groups=[CUT])
    assert engine.asked == ["answer: 1"]
    np.testing.assert_allclose(rewards, [-0.5, -0.5, 0.0])
    assert stats["judge_calls"] == 1 and stats["judge_agreement"] == 1.0


def test_grader_mode_is_checked():
    judge = judge_lib.Judge(VerdictEngine(TABLE), TOK)
    with pytest.raises(ValueError, match="rules"):
        scoring.Grader(judge=judge, mode="rules")


def test_grader_config_needs_a_judge_model_and_the_judge_needs_a_grader():
    with pytest.raises(ValueError, match="needs --judge_model"):
        run_config.GraderConfig(mode="judge")
    with pytest.raises(ValueError, match="needs --judge_model"):
        run_config.GraderConfig(judge_model="/x")
    with pytest.raises(ValueError, match="judge_fallback"):
        run_config.GraderConfig(mode="judge", judge_model="/x", fallback="half")


def _judge_dir(tiny_hf_dir, tmp_path, config=None):
    path = tmp_path / "judge"
    shutil.copytree(tiny_hf_dir[0], path)
    if config is not None:
        judge_lib.save_config(str(path), config)
    return str(path)


def test_judge_model_is_checked_before_anything_runs(tiny_hf_dir, tmp_path):
    def cfg(path):
        return dataclasses.replace(
            run_config.RunConfig(),
            grader=run_config.GraderConfig(mode="judge", judge_model=path),
        )

    with pytest.raises(run_config.ConfigError, match="no such directory"):
        run_setup.check_judge(cfg(str(tmp_path / "missing")))
    # No judge_config.json: the default bounds (3584 + 512 tokens) exceed the tiny model's 512.
    path = _judge_dir(tiny_hf_dir, tmp_path)
    with pytest.raises(run_config.ConfigError, match="max_position_embeddings"):
        run_setup.check_judge(cfg(path))
    with open(os.path.join(path, judge_lib.CONFIG_FILE), "w") as f:
        f.write('{"template": "{problem}", "max_tokens": 8}')
    with pytest.raises(run_config.ConfigError, match="judge_config.json: not a judge config"):
        run_setup.check_judge(cfg(path))
    with open(os.path.join(path, judge_lib.CONFIG_FILE), "w") as f:
        f.write('{"max_tokens": 8, "max_prompt_tokens": 100, "cutoff": 3}')
    with pytest.raises(run_config.ConfigError, match="cutoff"):
        run_setup.check_judge(cfg(path))
    good = judge_lib.JudgeConfig(template=TEMPLATE, max_tokens=8, max_prompt_tokens=100)
    judge_lib.save_config(path, good)
    run_setup.check_judge(cfg(path))
    assert judge_lib.load_config(path) == good


def test_a_run_resumes_only_with_the_judge_it_began_with(tiny_hf_dir, tmp_path):
    jcfg = judge_lib.JudgeConfig(template=TEMPLATE, max_tokens=8, max_prompt_tokens=100)
    path = _judge_dir(tiny_hf_dir, tmp_path, jcfg)
    out = tmp_path / "run"
    cfg = dataclasses.replace(
        run_config.RunConfig(),
        out_dir=str(out),
        grader=run_config.GraderConfig(mode="judge", judge_model=path),
    )
    pinned = run_setup.with_judge_fingerprint(cfg)
    assert pinned.grader.judge_fingerprint == judge_lib.fingerprint(path)
    run_config.check_out_dir(pinned)
    (out / "eval_sft.json").write_text("{}")  # a result: the directory is this run's now
    run_config.check_out_dir(run_setup.with_judge_fingerprint(cfg))  # the same judge resumes
    # the judge retrained in place: other weights under the same path
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(run_config.ConfigError) as err:
        run_config.check_out_dir(run_setup.with_judge_fingerprint(cfg))
    message = str(err.value)
    assert "\n" not in message and f"the judge {path} changed since this run started" in message
    # another prompt in judge_config.json is another judge too
    with open(weights, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(last)
    run_config.check_out_dir(run_setup.with_judge_fingerprint(cfg))
    judge_lib.save_config(path, dataclasses.replace(jcfg, max_tokens=9))
    with pytest.raises(run_config.ConfigError, match="changed since this run started"):
        run_config.check_out_dir(run_setup.with_judge_fingerprint(cfg))
    # a fingerprint asked for by the config must be the directory's
    with pytest.raises(run_config.ConfigError, match="fingerprint"):
        run_setup.with_judge_fingerprint(pinned)
    # a run saved before fingerprints were recorded resumes with the judge as it is now
    saved = json.loads((out / "run_config.json").read_text())
    del saved["grader"]["judge_fingerprint"]
    (out / "run_config.json").write_text(json.dumps(saved))
    run_config.check_out_dir(run_setup.with_judge_fingerprint(cfg))


def test_report_judge_section():
    history = [
        {"iteration": 0, "judge_calls": 10.0, "judge_malformed": 2.0, "judge_disagreements": 1.0,
         "judge_agreement": 7 / 8, "judge_tokens": 20.0},
        {"iteration": 1, "pending_samples": 4},
        {"iteration": 2, "judge_calls": 6.0, "judge_malformed": 0.0, "judge_disagreements": 0.0,
         "judge_agreement": 1.0, "judge_tokens": 18.0},
    ]  # fmt: skip
    grader = {"mode": "judge", "judge_model": "/j", "fallback": "rules"}
    text = "\n".join(report.judge_lines(history, grader))
    assert "0.929 over 14 verdicts (16 judge calls)" in text  # 1 - 1/14
    assert "| 0 | 10 | 2 | 1 | 0.875 | 20.0 |" in text
    assert "| 2 | 6 | 0 | 0 | 1.000 | 18.0 |" in text
    assert report.judge_lines([{"iteration": 0, "reward": 1.0}], grader) == []


@pytest.mark.slow
@pytest.mark.vllm
def test_run_graded_by_a_judge_server_leaves_the_shared_engine_working(
    vllm_engine, tiny_hf_dir, tmp_path
):
    # In this worker, beside its shared engine: the judge is a server of its own (a second
    # in-process engine's close would tear down vLLM's process-wide state and break the shared
    # one). The judge is a random tiny model: its verdicts are unusable, so every judged sample
    # falls back to the rules; the counts, the log and the report show it.
    from test_loop import TINY, _quiet

    from k15jax.rollout import watchdog
    from k15jax.run import loop

    jcfg = judge_lib.JudgeConfig(template=TEMPLATE, max_tokens=8, max_prompt_tokens=200)
    path = _judge_dir(tiny_hf_dir, tmp_path, jcfg)
    cfg = dataclasses.replace(
        TINY,
        out_dir=str(tmp_path / "run"),
        rl=dataclasses.replace(TINY.rl, iterations=2, eval_every=0),
        partial=dataclasses.replace(TINY.partial, budget=100),
        grader=run_config.GraderConfig(mode="judge", judge_model=path, fallback="rules"),
    )
    lines = []
    try:
        loop.run(cfg, engine=vllm_engine, progress=_quiet, console=lines.append)
    finally:
        vllm_engine.load_weights(tiny_hf_dir[2])  # leave the shared engine as it was
    out = cfg.out_dir
    log = [json.loads(x) for x in open(os.path.join(out, "judge_log.jsonl"))]
    assert log and {r["iteration"] for r in log} <= {0, 1}
    for r in log:
        assert r["judge_status"] != "ok" and r["score"] == r["rules"]
    text = open(os.path.join(out, "report.md")).read()
    assert "## Judge" in text and f"judge {path}" in text
    its = [x for x in lines if x.startswith("it ")]
    assert its and all("judge" in x and "calls" in x for x in its if "reward" in x)
    # the judge server is gone with the run, and nothing of it is left recorded
    record = os.path.join(out, run_setup.JUDGE_SERVER_DIR, watchdog.RECORD)
    assert not os.path.exists(record)
    # the shared engine still samples after the judge closed
    spec = engines.SamplingSpec(n=2, temperature=1.0, max_tokens=5)
    done = vllm_engine.generate([TOK.encode("Q:1+2\n")], spec)
    assert len(done) == 2 and all(c.token_ids for c in done)


def test_judge_experiment_trains_on_the_prompts_the_judge_asks():
    # experiments.judge writes its SFT prompts as text; `Judge.prompt_ids` builds them from
    # parts. They must be the same ids, or the judges would be measured on another prompt.
    from k15jax.data import answer_forms, tasks
    from k15jax.rewards import judge_training as judge_exp

    examples = tasks.generate(60, seed=2)
    items = answer_forms.equivalence_set(examples, per_problem=3, seed=0, attack_fraction=0.5)
    assert {it.form for it in items} >= set(answer_forms.ATTACKS)
    for kind in ("classic", "cot"):
        cfg = judge_exp.judge_config(kind, 48)
        judge = judge_lib.Judge(None, TOK, config=cfg)
        for it in items:
            ids = judge.prompt_ids(judge_lib.JudgeItem(it.problem, it.reference, it.response))
            assert ids == TOK.encode(judge_exp.prompt_text(cfg, it))
            assert len(ids) <= cfg.max_prompt_tokens  # nothing cut: the whole window is seen
            text = TOK.decode(ids)
            shown = judge_lib.strip_delimiters(it.response[-48:], judge_exp.DELIMITERS)
            assert text.endswith(f"<r>{shown}</r>\njudge:\n") and text.count("</r>") == 1
            if it.form not in answer_forms.ATTACKS:
                assert text.endswith(f"answer: {it.answer}</r>\njudge:\n")
        target = judge_exp.TARGETS[kind](items[0])
        assert len(TOK.encode(target)) + 1 <= cfg.max_tokens  # + eos
    longest = max(items, key=lambda it: len(answer_forms.cot_target(it)))
    assert len(TOK.encode(answer_forms.cot_target(longest))) < judge_exp.MAX_TOKENS["cot"]
