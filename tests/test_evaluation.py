"""pass@k, avg@k, maj@k against brute force over all k-subsets; evaluate() and the eval script."""

import collections
import itertools
import json
import math
import os
from fractions import Fraction

import numpy as np
import pytest

from k15jax.data import prompt_sets, tasks
from k15jax.rewards import scoring
from k15jax.rollout.engines import Completion
from k15jax.run import evaluation

# ------------------------------------------------------------------ brute-force references


def _subsets(n, k):
    return list(itertools.combinations(range(n), k))


def _brute_pass(n, c, k):
    """Fraction of k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = _subsets(n, k)
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def _brute_avg(n, c, k):
    subsets = _subsets(n, k)
    return sum(Fraction(sum(i < c for i in s), k) for s in subsets) / len(subsets)


def _vote(answers, correct):
    """Majority vote of one draw, written independently: ties share the credit evenly."""
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return Fraction(0)
    top = max(counts.values())
    tied = sorted(a for a, v in counts.items() if v == top)
    good = {a for a, ok in zip(answers, correct) if ok and a is not None}
    return Fraction(sum(a in good for a in tied), len(tied))


def _brute_maj(answers, correct, k):
    subsets = _subsets(len(answers), k)
    return sum(_vote([answers[i] for i in s], [correct[i] for i in s]) for s in subsets) / len(
        subsets
    )


# ---------------------------------------------------------------------------- estimators


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_and_avg_at_k_equal_brute_force_over_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert evaluation.pass_at_k(n, c, k) == pytest.approx(
                float(_brute_pass(n, c, k)), rel=1e-12, abs=1e-15
            ), (n, c, k)
            assert evaluation.avg_at_k(n, c, k) == pytest.approx(float(_brute_avg(n, c, k)))


@pytest.mark.parametrize("n, c, k", [(1024, 1, 1), (1024, 3, 16), (1024, 100, 512), (1000, 999, 1)])
def test_pass_at_k_is_exact_for_large_n(n, c, k):
    # Exact rational reference from integer binomials (no floating point on the way).
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert evaluation.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


def test_pass_at_k_edges():
    assert evaluation.pass_at_k(16, 0, 16) == 0.0
    assert evaluation.pass_at_k(16, 16, 1) == 1.0
    assert evaluation.pass_at_k(16, 1, 16) == 1.0  # every 16-subset of 16 holds the correct one
    assert evaluation.pass_at_k(4, 2, 1) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "n, c, k, named",
    [
        (4, 1, 5, "k=5"),
        (4, 5, 1, "c=5"),
        (4, -1, 1, "c=-1"),
        (4, 1, 0, "k=0"),
        (-2, 0, 1, "n=-2"),
        (4, 1.5, 1, "c=1.5"),
        (4, True, 1, "c=True"),
    ],
)
def test_bad_counts_raise_naming_the_value(n, c, k, named):
    for fn in (evaluation.pass_at_k, evaluation.avg_at_k):
        with pytest.raises(ValueError, match=named):
            fn(n, c, k)


def test_maj_at_k_by_hand():
    # One block of 3: "4" twice (correct) beats "5" once.
    assert evaluation.maj_at_k(["4", "5", "4"], [True, False, True], 3) == 1.0
    # "5" twice (wrong) beats the one correct "4".
    assert evaluation.maj_at_k(["5", "4", "5"], [False, True, False], 3) == 0.0
    # A tie of one correct and one wrong answer: half credit (expected random tie-break).
    assert evaluation.maj_at_k(["4", "5"], [True, False], 2) == 0.5
    # Abstentions (None) do not vote; a block with no answer scores 0.
    assert evaluation.maj_at_k([None, None, "4"], [False, False, True], 3) == 1.0
    assert evaluation.maj_at_k([None, None], [False, False], 2) == 0.0
    # Blocks of 2: [4, 5] -> 0.5, [5, 5] -> 0; the fifth sample is left out.
    assert evaluation.maj_at_k(["4", "5", "5", "5", "4"], [1, 0, 0, 0, 1], 2) == 0.25
    with pytest.raises(ValueError, match="differ in length"):
        evaluation.maj_at_k(["4"], [True, False], 1)
    with pytest.raises(ValueError, match="k=3"):
        evaluation.maj_at_k(["4", "5"], [True, False], 3)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_maj_at_k_blocks_are_unbiased_for_the_subset_expectation(k):
    # Averaged over every order of the samples, the block estimate equals the mean vote over
    # all k-subsets: blocks of independent samples are fair draws of k.
    answers = ["7", "7", "8", None, "8", "9"]
    correct = [True, True, False, False, False, False]
    orders = list(itertools.permutations(range(6)))
    mean = np.mean(
        [evaluation.maj_at_k([answers[i] for i in o], [correct[i] for i in o], k) for o in orders]
    )
    assert mean == pytest.approx(float(_brute_maj(answers, correct, k)), rel=1e-12)


def test_mean_ci95():
    mean, (lo, hi) = evaluation.mean_ci95([0.0, 1.0, 1.0, 0.0])
    # std(ddof=1) of [0, 1, 1, 0] = sqrt(1/3); half width 1.96 * sqrt(1/3) / 2.
    assert mean == 0.5 and hi - mean == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)
    assert mean - lo == pytest.approx(hi - mean)
    mean, (lo, hi) = evaluation.mean_ci95([0.25])
    assert mean == 0.25 and math.isnan(lo) and math.isnan(hi)


def test_eval_config_checks_ks():
    assert evaluation.EvalConfig(samples=4, ks=(1, 4)).ks == (1, 4)
    with pytest.raises(ValueError, match=r"ks=\(1, 8\).*samples=4"):
        evaluation.EvalConfig(samples=4, ks=(1, 8))
    with pytest.raises(ValueError, match=r"ks=\(0,\)"):
        evaluation.EvalConfig(samples=4, ks=(0,))


# ----------------------------------------------------------------- evaluate() with a script

ENC = lambda s: [ord(c) for c in s]  # noqa: E731
DEC = lambda ids: "".join(chr(c) for c in ids)  # noqa: E731
SCORER = scoring.Scorer(reward_fn=tasks.reward, decode=DEC)


class _Scripted:
    """Answers prompt i with outputs[i]: a list of (text, finish reason), one per sample."""

    def __init__(self, outputs):
        self.outputs = outputs
        self.seeds = None

    def generate(self, prompts, spec, *, max_tokens=None, seeds=None):
        self.seeds = seeds
        assert all(len(o) == spec.n for o in self.outputs)
        return [
            Completion(i, ENC(text), [0.0] * len(text), reason)
            for i in range(len(prompts))
            for text, reason in self.outputs[i]
        ]


PROBLEMS = [prompt_sets.Problem("a", "Q:1+2\n", "3"), prompt_sets.Problem("b", "Q:2+2\n", "4")]
OUTPUTS = [
    # a: 2 of 4 correct; votes 3, 3, 5 (the fourth is cut: abstains) -> maj@4 = 1.
    [("answer: 3", "stop"), ("answer: 3", "stop"), ("answer: 5", "stop"), ("answer: 3", "length")],
    # b: 1 of 4 correct; votes 4, 1, 1, and a repeat that does not vote -> maj@4 = 0.
    [("answer: 4", "stop"), ("answer: 1", "stop"), ("answer: 1", "stop"), ("answer: 4", "repeat")],
]


def _evaluate(engine, ks, **kw):
    cfg = evaluation.EvalConfig(problems=2, samples=4, ks=ks)
    prompts = [ENC(p.prompt) for p in PROBLEMS]
    return evaluation.evaluate(
        engine, PROBLEMS, prompts, SCORER, cfg, max_tokens=16, repeat=None, seed=3, **kw
    )


def test_evaluate_reports_every_k_with_intervals():
    engine = _Scripted(OUTPUTS)
    result = _evaluate(engine, (1, 2, 4))
    assert result["correct"] == [2, 1]
    assert (result["problems"], result["samples"]) == (2, 4)
    assert result["pass_at_1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert result["mean_length"] == pytest.approx(9.0)
    assert result["at_k"]["pass@1"]["mean"] == pytest.approx(result["pass_at_1"])
    assert result["at_k"]["pass@1"]["ci95"] == pytest.approx(result["ci95"])
    for k in (1, 2, 4):
        want = [float(_brute_pass(4, 2, k)), float(_brute_pass(4, 1, k))]
        got = result["at_k"][f"pass@{k}"]
        assert got["mean"] == pytest.approx(np.mean(want))
        assert got["ci95"] == pytest.approx(evaluation.mean_ci95(want)[1])
        assert result["at_k"][f"avg@{k}"]["mean"] == pytest.approx(0.375)
    assert result["at_k"]["maj@4"]["mean"] == pytest.approx(0.5)  # a: 1, b: 0 (above)
    # maj@1, one block per sample: a votes right in 2 of 4 blocks, b in 1 of 4.
    assert result["at_k"]["maj@1"]["mean"] == pytest.approx((0.5 + 0.25) / 2)
    assert engine.seeds == [3 * 7919, 3 * 7919 + 1]  # fixed per-prompt seeds
    json.dumps(result)  # the result is plain JSON


def test_maj_needs_final_answers():
    code_like = scoring.Scorer(
        reward_fn=lambda p, r, a: (float(r.endswith(a)), {"passed": 1}), decode=DEC
    )
    cfg = evaluation.EvalConfig(problems=2, samples=4, ks=(1, 4))
    prompts = [ENC(p.prompt) for p in PROBLEMS]
    args = (_Scripted(OUTPUTS), PROBLEMS, prompts, code_like, cfg)
    result = evaluation.evaluate(*args, max_tokens=16, repeat=None, seed=0)
    assert "maj@4" not in result["at_k"] and "pass@4" in result["at_k"]
    # A caller's answer function: the last character, whatever the reward says.
    result = evaluation.evaluate(
        *args, max_tokens=16, repeat=None, seed=0, answer_of=lambda p, text: text[-1]
    )
    assert result["at_k"]["maj@4"]["mean"] == pytest.approx(0.5)


def test_markdown_table_lists_each_k():
    result = _evaluate(_Scripted(OUTPUTS), (1, 4))
    table = evaluation.markdown_table("toy.jsonl", result)
    lines = table.strip().splitlines()
    assert lines[0].startswith("### toy.jsonl: 2 problems x 4 samples")
    assert lines[2] == "| k | pass@k [95% interval] | avg@k [95% interval] | maj@k [95% interval] |"
    p4 = result["at_k"]["pass@4"]
    assert lines[-1].startswith(f"| 4 | {p4['mean']:.3f} [{p4['ci95'][0]:.3f}, ")
    assert len(lines) == 6


# ------------------------------------------------------------------ the eval script's parts


def test_eval_script_parses_ks_and_checks_samples():
    from absl import app

    from experiments import eval as eval_script
    from k15jax.run.run_config import RunConfig

    assert eval_script.parse_ks("16, 1,4,4") == (1, 4, 16)
    for bad in ("", "1,x", "0,2", "-1"):
        with pytest.raises(app.UsageError, match="--k="):
            eval_script.parse_ks(bad)
    cfg = eval_script.eval_config(RunConfig(), samples=8, ks=(1, 8))
    assert (cfg.samples, cfg.ks) == (8, (1, 8))
    with pytest.raises(app.UsageError, match="--samples=4"):
        eval_script.eval_config(RunConfig(), samples=4, ks=(1, 16))


@pytest.mark.slow
@pytest.mark.vllm
def test_eval_sets_with_the_real_engine(tiny_hf_dir, vllm_engine, tmp_path):
    import dataclasses

    from experiments import eval as eval_script
    from k15jax.run import run_setup
    from k15jax.run.run_config import RunConfig

    rows = [
        {"id": f"p{i}", "prompt": f"Q:{i}+{i + 1}\n", "answer": str(2 * i + 1)} for i in range(5)
    ]
    files = []
    for name, part in (("one.jsonl", rows[:2]), ("two.jsonl", rows[2:])):
        files.append(tmp_path / name)
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in part))
    base = RunConfig()
    cfg = dataclasses.replace(
        base,
        model_dir=tiny_hf_dir[0],
        task=dataclasses.replace(base.task, data=str(files[0])),
        partial=dataclasses.replace(base.partial, budget=12, max_length=12),
        repeat=None,
    )
    eval_cfg = eval_script.eval_config(cfg, samples=4, ks=(1, 2, 4))
    setup = run_setup.prepare(dataclasses.replace(cfg, eval=eval_cfg))
    sets = {f.name: prompt_sets.load_jsonl(str(f)) for f in files}

    # A random model neither stops nor answers right within 12 tokens: a stand-in scorer calls
    # a sample correct by the parity of its first token, so pass@k is not trivially 0.
    class FirstTokenParity:
        decode = staticmethod(setup.tok.decode)

        def __call__(self, problem, ids, finish_reason):
            ok = ids[0] % 2 == 0
            return float(ok), ok, {"extracted": str(ids[0])}

    setup = dataclasses.replace(setup, scorer=FirstTokenParity())
    first = eval_script.evaluate_sets(setup, vllm_engine, sets, eval_cfg)
    again = eval_script.evaluate_sets(setup, vllm_engine, sets, eval_cfg)
    assert first == again  # fixed seeds: the same numbers
    assert list(first) == ["one.jsonl", "two.jsonl"]
    assert [first[n]["problems"] for n in first] == [2, 3]
    for result in first.values():
        for k in (1, 2, 4):
            want = [float(_brute_pass(4, c, k)) for c in result["correct"]]
            assert result["at_k"][f"pass@{k}"]["mean"] == pytest.approx(np.mean(want))
            assert 0 <= result["at_k"][f"maj@{k}"]["mean"] <= 1
    assert 0 < sum(sum(r["correct"]) for r in first.values()) < 20  # not all right or wrong
    eval_script.write(first, str(tmp_path / "out"))
    with open(tmp_path / "out" / "eval.json") as f:
        assert json.load(f) == first
    md = (tmp_path / "out" / "eval.md").read_text()
    assert "### one.jsonl: 2 problems x 4 samples" in md and "### two.jsonl" in md
    assert sorted(os.listdir(tmp_path / "out")) == ["eval.json", "eval.md"]


def test_run_report_lists_pass_at_k_of_both_models():
    from k15jax.run import report

    sft = _evaluate(_Scripted(OUTPUTS), (1, 4))
    rl = dict(sft, at_k={**sft["at_k"], "pass@4": {"mean": 0.75, "ci95": [0.5, 1.0]}})
    lines = report.at_k_lines({"sft": sft, "rl": rl})
    assert lines[0] == "| model | pass@4 | avg@4 | maj@4 |"
    p4 = sft["at_k"]["pass@4"]
    sft_p4 = f"{p4['mean']:.3f} [{p4['ci95'][0]:.3f}, {p4['ci95'][1]:.3f}]"
    assert lines[2].startswith("| SFT |") and sft_p4 in lines[2]
    assert "| 0.750 [0.500, 1.000] |" in lines[3]
    only_one = _evaluate(_Scripted(OUTPUTS), (1,))
    assert report.at_k_lines({"sft": only_one, "rl": only_one}) == []  # k = 1: its own table


def test_report_says_in_words_what_its_seed_showed():
    from k15jax.run import report

    def result(p, low, high):
        return {"pass_at_1": p, "ci95": [low, high]}

    sft = result(0.22, 0.19, 0.25)
    above = report.verdict_line({"seed": 2}, sft, result(0.33, 0.29, 0.36))
    assert "On seed 2, RL raised held-out pass@1 from 0.220 to 0.330" in above
    assert "intervals apart" in above and "--seed" in above
    touching = report.verdict_line({"seed": 0}, sft, result(0.28, 0.25, 0.31))  # 0.25 = 0.25
    assert "overlapping 95% intervals" in touching and "no difference" in touching
    below = report.verdict_line({"seed": 1}, sft, result(0.10, 0.07, 0.13))
    assert "RL made the model worse" in below


def test_paired_gain_is_over_the_same_problems():
    from k15jax.run import evaluation

    # Four problems, 4 samples each; RL gains one sample on every problem: a sure gain of 0.25
    # whose separate intervals overlap (the problems' spread is shared, and drops out here).
    sft = {"correct": [0, 1, 2, 3], "samples": 4}
    rl = {"correct": [1, 2, 3, 4], "samples": 4}
    gain, (low, high) = evaluation.paired_gain(sft, rl)
    assert gain == low == high == 0.25
    rl_mixed = {"correct": [2, 1, 2, 4], "samples": 4}  # differences 0.5, 0, 0, 0.25
    gain, (low, high) = evaluation.paired_gain(sft, rl_mixed)
    d = [0.5, 0.0, 0.0, 0.25]
    half = 1.96 * float(np.std(d, ddof=1)) / 2.0
    assert gain == pytest.approx(0.1875)
    assert (low, high) == pytest.approx((0.1875 - half, 0.1875 + half))
    with pytest.raises(ValueError, match="not the same problems"):
        evaluation.paired_gain(sft, {"correct": [1, 2], "samples": 4})
