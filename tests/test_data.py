"""JSONL prompt sets (errors name file and line) and the curriculum + prioritized sampler."""

import json

import numpy as np
import pytest

from k15jax import data, sampler


def _write(tmp_path, lines):
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_load_jsonl_fields_and_defaults(tmp_path):
    path = _write(
        tmp_path,
        [
            json.dumps(
                {"prompt": "1+1?", "answer": "2", "id": "a", "difficulty": 0.3, "source": "x"}
            ),
            "",
            json.dumps({"prompt": "2+2?", "answer": 4, "level": 3}),
        ],
    )
    probs = data.load_jsonl(path)
    assert probs[0] == data.Problem("a", "1+1?", "2", 0.3, "x")
    assert probs[1] == data.Problem("set.jsonl:3", "2+2?", "4", 3.0, None)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x", "answer": "1"', r"set.jsonl:2: invalid JSON"),
        ('{"answer": "1"}', r"set.jsonl:2: field 'prompt' must be a non-empty string"),
        ('{"prompt": "x"}', r"set.jsonl:2: field 'answer' must be a string or number"),
        ('{"prompt": "x", "answer": ""}', r"set.jsonl:2: field 'answer' is empty"),
        (
            '{"prompt": "x", "answer": "1", "difficulty": "hard"}',
            r"set.jsonl:2: field 'difficulty'",
        ),
        ("[1, 2]", r"set.jsonl:2: expected a JSON object"),
        ('{"prompt": "y", "answer": "1", "id": "a"}', r"set.jsonl:2: duplicate id 'a'"),
    ],
)
def test_bad_lines_name_file_line_and_problem(tmp_path, line, message):
    path = _write(tmp_path, [json.dumps({"prompt": "ok", "answer": "1", "id": "a"}), line])
    with pytest.raises(data.DataError, match=message):
        data.load_jsonl(path)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(data.DataError, match="no problems"):
        data.load_jsonl(_write(tmp_path, [""]))
    with pytest.raises(data.DataError, match="cannot read"):
        data.load_jsonl(str(tmp_path / "missing.jsonl"))


def test_shared_sets_load():
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
    if not os.path.isdir(root):
        pytest.skip("shared data not present")
    assert len(data.load_jsonl(os.path.join(root, "gsm8k_train.jsonl"))) == 7473
    assert len(data.load_jsonl(os.path.join(root, "math_train.jsonl"))) == 11998


# ----------------------------------------------------------------------------- sampler


def test_draw_frequencies_follow_one_minus_success():
    rates = [0.0, 0.25, 0.5, 0.9, 1.0]
    cfg = sampler.SamplerConfig(epsilon=0.05)
    state = sampler.init_state(rates, seed=0)
    idx, _ = sampler.draw(state, cfg, iteration=0, n=40000)
    freq = np.bincount(idx, minlength=5) / idx.size
    w = np.maximum(1 - np.array(rates), 0.05)
    p = w / w.sum()
    # 5 standard errors of a binomial proportion: fails only on a real mismatch.
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / idx.size) + 1e-9)
    assert freq[4] > 0  # the floor keeps solved problems drawable


def test_curriculum_switches_to_hard_pool():
    rates = [0.9, 0.1, 0.8, 0.3]
    cfg = sampler.SamplerConfig(curriculum_iterations=3, hard_threshold=0.5)
    state = sampler.init_state(rates, seed=1)
    early, state = sampler.draw(state, cfg, iteration=2, n=2000)
    late, state = sampler.draw(state, cfg, iteration=3, n=2000)
    assert set(early.tolist()) == {0, 1, 2, 3}
    assert set(late.tolist()) == {1, 3}


def test_update_is_running_mean_and_state_round_trips():
    cfg = sampler.SamplerConfig()
    state = sampler.init_state([0.5, 0.5], seed=2)
    state = sampler.update(state, [0, 0, 1], [1.0, 1.0, 0.0])
    assert state.success == [pytest.approx((0.5 + 1 + 1) / 3), pytest.approx(0.25)]
    a1, s1 = sampler.draw(state, cfg, 0, 5)
    restored = sampler.SamplerState.from_json(json.loads(json.dumps(s1.to_json())))
    a2, _ = sampler.draw(s1, cfg, 1, 7)
    b2, _ = sampler.draw(restored, cfg, 1, 7)
    np.testing.assert_array_equal(a2, b2)  # a restored sampler continues the same sequence
    c1, _ = sampler.draw(state, cfg, 0, 5)
    np.testing.assert_array_equal(a1, c1)  # same state, same draws


def test_problem_selection_and_prompt_length_are_checked():
    problems = [data.Problem(str(i), f"Q:{i}\n", "1") for i in range(4)]
    # A saved selection comes back in its own order, as new values.
    assert [p.id for p in data.select(problems, ["3", "1"])] == ["3", "1"]
    with pytest.raises(data.DataError, match=r"problems \['9'\] of the saved run"):
        data.select(problems, ["1", "9"])
    encode = lambda s: [ord(c) for c in f"<{s}>"]  # noqa: E731  (a templated encoder)
    ids = data.prompt_ids(problems[0], encode=encode, max_tokens=6)
    assert ids == [ord(c) for c in "<Q:0\n>"]
    with pytest.raises(data.DataError, match="problem 0: prompt of 6 tokens exceeds"):
        data.prompt_ids(problems[0], encode=encode, max_tokens=5)


def test_builtin_problem_set_is_deterministic_and_split():
    task = data.TaskConfig(train_problems=20, sft_examples=10, short_fraction=0.5)
    a = data.load_problems(task, held_out_problems=5, seed=3)
    assert a == data.load_problems(task, held_out_problems=5, seed=3)
    assert (len(a.train), len(a.held_out), len(a.sft_traces)) == (20, 5, 10)
    assert not {p.prompt for p in a.train} & {p.prompt for p in a.held_out}
    short = sum(not r.startswith("plan:") for _, r in a.sft_traces)
    assert 0 < short < 10  # both kinds of trace at short_fraction 0.5
