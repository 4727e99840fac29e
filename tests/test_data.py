"""JSONL prompt sets (errors name file and line) and the curriculum + prioritized sampler."""

import dataclasses
import json

import numpy as np
import pytest

from k15jax.data import prompt_sets, sampler, screen


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
    probs = prompt_sets.load_jsonl(path)
    assert probs[0] == prompt_sets.Problem("a", "1+1?", "2", 0.3, "x")
    assert probs[1] == prompt_sets.Problem("set.jsonl:3", "2+2?", "4", 3.0, None)


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
    with pytest.raises(prompt_sets.DataError, match=message):
        prompt_sets.load_jsonl(path)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(prompt_sets.DataError, match="no problems"):
        prompt_sets.load_jsonl(_write(tmp_path, [""]))
    with pytest.raises(prompt_sets.DataError, match="cannot read"):
        prompt_sets.load_jsonl(str(tmp_path / "missing.jsonl"))


def test_shared_sets_load():
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
    if not os.path.isdir(root):
        pytest.skip("shared data not present")
    assert len(prompt_sets.load_jsonl(os.path.join(root, "gsm8k_train.jsonl"))) == 7473
    assert len(prompt_sets.load_jsonl(os.path.join(root, "math_train.jsonl"))) == 11998


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


def test_prioritized_weights_are_one_minus_success_without_a_floor_by_default():
    # k1.5 §2.3.4: P(i) ∝ 1 - s_i. By hand for s = 0, 0.25, 0.5, 1: weights 1, 0.75, 0.5, 0,
    # sum 2.25, so P = 4/9, 3/9, 2/9, 0: the always-solved problem is not drawn.
    state = sampler.init_state([0.0, 0.25, 0.5, 1.0], seed=0)
    cfg = sampler.SamplerConfig()
    np.testing.assert_allclose(sampler.probabilities(state, cfg, 0), [4 / 9, 3 / 9, 2 / 9, 0])
    drawn, _ = sampler.draw(state, cfg, iteration=0, n=500)
    assert 3 not in drawn.tolist() and set(drawn.tolist()) == {0, 1, 2}
    # The floor is a setting: ε = 0.1 gives weights 1, 0.75, 0.5, 0.1, sum 2.35.
    floored = sampler.probabilities(state, sampler.SamplerConfig(epsilon=0.1), 0)
    np.testing.assert_allclose(floored, [1 / 2.35, 0.75 / 2.35, 0.5 / 2.35, 0.1 / 2.35])
    # Every problem of the pool solved, no floor: the pool is drawn uniformly. The pool after a
    # 1-iteration warm-up at threshold 0.5: problems 0, 1, 2 (pass rates 0, 0.25, 0.5); with
    # all of them now solved (s = 1), P = 1/3, 1/3, 1/3 and 0 for problem 3 (outside).
    solved = dataclasses.replace(state, success=[1.0, 1.0, 1.0, 1.0])
    hard = sampler.SamplerConfig(curriculum_iterations=1, hard_threshold=0.5)
    np.testing.assert_allclose(sampler.probabilities(solved, hard, 1), [1 / 3, 1 / 3, 1 / 3, 0])
    with pytest.raises(ValueError, match="epsilon=-0.1"):
        sampler.SamplerConfig(epsilon=-0.1)


def test_curriculum_switches_to_hard_pool():
    rates = [0.9, 0.1, 0.8, 0.3]
    cfg = sampler.SamplerConfig(curriculum_iterations=3, order="uniform", hard_threshold=0.5)
    state = sampler.init_state(rates, seed=1)
    early, state = sampler.draw(state, cfg, iteration=2, n=2000)
    late, state = sampler.draw(state, cfg, iteration=3, n=2000)
    assert set(early.tolist()) == {0, 1, 2, 3}
    assert set(late.tolist()) == {1, 3}


def test_easy_first_order_uses_labels_then_pass_rates():
    rates = [0.2, 0.9, 0.5, 0.9, 0.1]
    # No labels: highest SFT pass rate first, ties by index.
    assert sampler.easy_first_order(rates).tolist() == [1, 3, 2, 0, 4]
    # Labels first (the MATH level): a level-1 problem the model fails still comes before a
    # level-3 one it solves; an unlabelled problem counts as the mean label (2).
    labels = [1, 3, 1, None, 2]
    assert sampler.easy_first_order(rates, labels).tolist() == [2, 0, 3, 4, 1]


def test_easy_first_curriculum_then_one_minus_success():
    """Easy first: the pool widens from the easiest problems (by label) to all of them over the
    warm-up; then every problem of the hard pool is drawn ∝ max(1 - s_i, ε)."""
    labels = [5, 1, 4, 2, 3, 1, 5, 2]  # easiest: 1 and 5 (label 1), then 3 and 7 (label 2), ...
    rates = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    cfg = sampler.SamplerConfig(curriculum_iterations=4, hard_threshold=0.65, epsilon=0.05)
    state = sampler.init_state(rates, seed=3, labels=labels)
    pools = []
    for it in range(4):
        drawn, state = sampler.draw(state, cfg, it, 400)
        pools.append(set(drawn.tolist()))
    # Quarter by quarter of the easy-first order 5, 1, 7, 3, 4, 2, 6, 0 (label, then pass rate).
    assert pools == [{5, 1}, {5, 1, 7, 3}, {5, 1, 7, 3, 4, 2}, set(range(8))]
    p = sampler.probabilities(state, cfg, 4)  # after the warm-up: the hard pool by 1 - s_i
    hard = np.array(rates) <= 0.65
    w = np.where(hard, np.maximum(1 - np.array(rates), 0.05), 0.0)
    np.testing.assert_allclose(p, w / w.sum())
    # A state saved before ranks existed orders by pass rate alone.
    old = sampler.SamplerState.from_json({k: v for k, v in state.to_json().items() if k != "rank"})
    assert set(sampler.pool(old, cfg, 0).tolist()) == {7, 6}
    with pytest.raises(ValueError, match="order='hardest'"):
        sampler.SamplerConfig(order="hardest")
    with pytest.raises(ValueError, match="3 difficulty labels for 8 problems"):
        sampler.init_state(rates, seed=0, labels=[1, 2, 3])


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
    problems = [prompt_sets.Problem(str(i), f"Q:{i}\n", "1") for i in range(4)]
    # A saved selection comes back in its own order, as new values.
    assert [p.id for p in prompt_sets.select(problems, ["3", "1"])] == ["3", "1"]
    with pytest.raises(prompt_sets.DataError, match=r"problems \['9'\] of the saved run"):
        prompt_sets.select(problems, ["1", "9"])
    encode = lambda s: [ord(c) for c in f"<{s}>"]  # noqa: E731  (a templated encoder)
    ids = prompt_sets.prompt_ids(problems[0], encode=encode, max_tokens=6)
    assert ids == [ord(c) for c in "<Q:0\n>"]
    with pytest.raises(prompt_sets.DataError, match="problem 0: prompt of 6 tokens exceeds"):
        prompt_sets.prompt_ids(problems[0], encode=encode, max_tokens=5)


def test_builtin_problem_set_is_deterministic_and_split():
    task = prompt_sets.TaskConfig(train_problems=20, sft_examples=10, short_fraction=0.5)
    a = prompt_sets.load_problems(task, held_out_problems=5, seed=3)
    assert a == prompt_sets.load_problems(task, held_out_problems=5, seed=3)
    assert (len(a.train), len(a.held_out), len(a.sft_traces)) == (20, 5, 10)
    assert not {p.prompt for p in a.train} & {p.prompt for p in a.held_out}
    short = sum(not r.startswith("plan:") for _, r in a.sft_traces)
    assert 0 < short < 10  # both kinds of trace at short_fraction 0.5


# ----------------------------------------------------------------------------- screening


def _p(prompt, answer, pid="x"):
    return prompt_sets.Problem(pid, prompt, answer)


@pytest.mark.parametrize(
    "prompt, answer",
    [
        # Capital option lists, whatever the answer (AMC: the answer is the option's value).
        ("What is 6 times 7?\n(A) 40 (B) 41 (C) 42 (D) 43 (E) 44", "42"),
        (
            r"$k$ is $\textbf{(A) }\ 1 \qquad \textbf{(B) }\ 2 \qquad \textbf{(C) }\ 3 \qquad "
            r"\textbf{(D) }\ 4$",
            "2",
        ),  # fmt: skip
        (
            r"$\mathrm{(A)}\ x \qquad\mathrm{(B)}\ y \qquad\mathrm{(C)}\ z \qquad\mathrm{(D)}\ w$",
            "y",
        ),
        ("The curve is: (A) circle (B) parabola (C) ellipse (D) hyperbola.", "ellipse"),
        ("Which number is even?\n\nA. 3\nB. 5\nC. 8\nD. 9", "8"),
        ("Which is smallest?\nA) 0.5\nB) 0.25\nC) 0.125\nD) 1", "0.125"),
        (
            "Which is prime?\n$\\bullet$ A. 4\n$\\bullet$ B. 6\n$\\bullet$ C. 7\n$\\bullet$ D. 8",
            "7",
        ),
        (r"Odd: $$\text A. \ 2 \qquad \text B. \ 3 \qquad \text C. \ 4 \qquad \text D. \ 6$$", "3"),
        # Three labels when the answer is a letter.
        ("Smallest?\nA) 0.5\nB) 0.25\nC) 0.125", "C"),
        # A parenthesised letter as the answer.
        ("Name the curve traced by the point.", "(C)"),
        ("Name the curve traced by the point.", r"\text{(e)}"),
        ("Classify the conic.", r"\boxed{\textbf{(B)}}"),
        # A bare letter (or letters) with a prompt that asks for options.
        ("Which of the following is largest: A = 2, B = 3, C = 1?", "B"),
        ("Enter the letter of the correct option.", r"\text{D}"),
        ("Express your answer as A, B, C, D, or E.", "$E$"),
        ("Which of the following statements are true? List them.", r"\text{A, C}"),
        ('Enter "C" for circle, "P" for parabola, "H" for hyperbola.', "H"),
        ("Which set works?\n(a) {1}\n(b) {2}\n(c) {3}\n(d) {4}", "D"),
    ],
)
def test_screen_removes_multiple_choice(prompt, answer):
    assert screen.screen_reason(_p(prompt, answer)) == "multiple_choice"


@pytest.mark.parametrize(
    "answer", ["True", "false", "YES", "no", r"\text{Yes}", r"\boxed{\text{No}}", "$True$", "No."]
)
def test_screen_removes_true_false(answer):
    assert screen.screen_reason(_p("Is 91 a prime number?", answer)) == "true_false"


@pytest.mark.parametrize(
    "prompt, answer",
    [
        ("Prove that the sum of two odd numbers is even.", "proof"),
        ("Show that there are infinitely many primes.", r"\text{QED}"),
        ("Prove that $a^2 + b^2 \\ge 2ab$ for all real $a, b$.", r"a^2 + b^2 \geq 2ab"),
        ("Show that $n^3 - n$ is divisible by six.", r"6 \mid n^3 - n"),
        ("Prove the triangle inequality for complex numbers.", "|z + w| <= |z| + |w|"),
        ("Give a proof that every tree has a leaf.", "see solution"),
        ("Show that the triangle is isosceles.", "The two base angles are equal"),
        ("Prove that no such function exists.", "N/A"),
    ],
)
def test_screen_removes_proofs(prompt, answer):
    assert screen.screen_reason(_p(prompt, answer)) == "proof"


@pytest.mark.parametrize(
    "prompt, answer",
    [
        # "(a)"/"(b)" part labels with a value as the answer.
        ("(a) Find x if 2x = 10. (b) Then find x + 3.", "8"),
        ("A box holds 12 eggs.\n(a) How many in 3 boxes?\n(b) In 4?\n(c) In 5?", "60"),
        # Function values and angle names are not option labels.
        (r"In triangle $ABC$, find $\sin (A) + \sin (B) + \sin (C)$ if $A = B = C$.", "3"),
        ("If f(A) = 2, f(B) = 3, f(C) = 4, f(D) = 1, what is f(A) + f(B) + f(C) + f(D)?", "10"),
        (r"$P (A) = P (B) = P (C) = P (D) = 0.1$. Find $P (A) + P (B)$.", "0.2"),
        # Three labelled conditions and a count as the answer.
        ("How many 3-digit numbers have (A) odd digits, (B) no repeats, (C) sum 9?", "10"),
        # "show that" / "prove" inside a computation whose answer is a value.
        ("Show that x = 2 solves x^2 = 4, then find the other root.", "-2"),
        ("Records show that the team won 3 of 4 games. How many did it lose?", "1"),
        ("How many ways can the letters of the word PROOF be arranged?", "60"),
        ("Bread dough must proof for 2 hours and bake for 1. How many hours in all?", "3"),
        ("Prove that the answer is at least 5, then find the least n.", "5"),
        ("Show that one of them tells the truth. Who is it?", "Alice"),
        # A letter computed, not chosen; a true/false quiz counted.
        ("What is the 100th letter in the pattern ABCABCABC...?", "A"),
        ("How many answer keys does a 5-question true-false quiz have?", "32"),
        ("What is the median of 0, 1, a, b when 0 < a < 1 < b?", "b"),
        ("A point has coordinates (3, 4). How far is it from the origin?", "5"),
    ],
)
def test_screen_keeps_near_misses(prompt, answer):
    assert screen.screen_reason(_p(prompt, answer)) is None


def test_screen_splits_ids_by_reason_and_keeps_order():
    problems = [
        _p("What is 2 + 2?", "4", "keep1"),
        _p("Is 7 odd?", "Yes", "tf"),
        _p("Which is 4? (A) 3 (B) 4 (C) 5 (D) 6", "4", "mc"),
        _p("Prove that sqrt 2 is irrational.", "proof", "pr"),
        _p("Show that 3 + 4 = 7, then compute 7 * 2.", "14", "keep2"),
        # Both a lettered list and a True answer: the first rule (multiple_choice) names it.
        _p("Pick one: (A) True (B) False (C) Unknown (D) Both", "True", "both"),
    ]
    kept, dropped = screen.screen(problems)
    assert [p.id for p in kept] == ["keep1", "keep2"]
    assert dropped == {"multiple_choice": ("mc", "both"), "true_false": ("tf",), "proof": ("pr",)}
    assert screen.screen_line(dropped, len(problems)) == (
        "screen removed 4 of 6 problems (multiple_choice 2, true_false 1, proof 1)"
    )
    kept, dropped = screen.screen(problems[:1])
    assert len(kept) == 1 and dropped == {"multiple_choice": (), "true_false": (), "proof": ()}


def test_overlong_prompts_are_dropped_or_refused():
    texts = {"a": "Q:1\n", "long": "Q:1+2+3\n", "b": "Q:22\n", "longer": "Q:1+2+3+4\n"}
    problems = [prompt_sets.Problem(pid, prompt, "1") for pid, prompt in texts.items()]
    encode = lambda s: [ord(c) for c in f"<{s}>"]  # noqa: E731  (a templated encoder: +2 tokens)
    keep = dict(encode=encode, max_tokens=7, what="RL pool (x.jsonl)")
    kept, dropped = prompt_sets.drop_overlong(problems, overlong="drop", **keep)
    assert [p.id for p in kept] == ["a", "b"] and dropped == ("long", "longer")
    # The template counts: "<Q:22\n>" is 7 tokens and fits; 6 would not.
    kept, _ = prompt_sets.drop_overlong(problems, overlong="drop", **dict(keep, max_tokens=6))
    assert [p.id for p in kept] == ["a"]
    with pytest.raises(
        prompt_sets.DataError,
        match=r"RL pool \(x.jsonl\): problem long: prompt of 10 tokens exceeds "
        r"--max_prompt_tokens=7",
    ):  # fmt: skip
        prompt_sets.drop_overlong(problems, overlong="error", **keep)
    assert prompt_sets.drop_overlong(problems[:1], overlong="error", **keep) == ((problems[0],), ())
    with pytest.raises(ValueError, match="overlong_prompts='cut' must be one of"):
        prompt_sets.TaskConfig(overlong_prompts="cut")
    removed = prompt_sets.Removed({"proof": ("p1", "p2")}, ("long",), ())
    assert removed.counts() == {
        "screen": {"proof": 2},
        "overlong": {"train": 1, "held_out": 0},
        "sft": {"held_out": 0, "overlong": 0},
    }


def test_built_in_task_too_small_for_the_sizes_is_a_clear_error():
    task = prompt_sets.TaskConfig(max_terms=2, max_term=3)
    with pytest.raises(prompt_sets.DataError, match=r"cannot find .* \(--train_problems"):
        prompt_sets.load_problems(task, held_out_problems=150, seed=0)


def test_answer_forms_traces_and_their_checks():
    task = prompt_sets.TaskConfig(answer_forms=True, reward="forms", sft_examples=300)
    traces = prompt_sets.load_problems(task, held_out_problems=8, seed=0).sft_traces
    plain = prompt_sets.load_problems(
        prompt_sets.TaskConfig(sft_examples=300), held_out_problems=8, seed=0
    ).sft_traces
    from k15jax.data import answer_forms

    shapes = set()
    for (prompt, text), (prompt0, text0) in zip(traces, plain, strict=True):
        head, _, answer = text.rpartition("answer: ")
        assert prompt == prompt0 and text0.startswith(head)  # only the answer line differs
        assert answer_forms.is_value(answer)
        assert answer_forms.reward(prompt, text, text0.rpartition("answer: ")[2])[0] == 1.0
        shapes.add(
            "words"
            if answer.isalpha() or "-" in answer
            else "decimal"
            if "." in answer
            else "digits"
        )
    assert shapes == {"digits", "decimal", "words"}
    with pytest.raises(ValueError, match="--reward=forms"):
        prompt_sets.TaskConfig(answer_forms=True)
    with pytest.raises(ValueError, match="up to 99"):
        prompt_sets.TaskConfig(answer_forms=True, reward="forms", max_terms=12)
