"""Classic vs chain-of-thought judge (k1.5 §2.3.3), reproduced at CPU scale on the built-in task.

  python -m experiments.judge --out_dir=runs/judge           # both judges, table and PNG

Builds an answer-equivalence set from the built-in task (`answer_forms`: the reference sum and
a long trace whose final answer is written as `12`, `12.0`, `twelve`, `3*4`, `24/2`, `5+7`,
`15-3`, or as a near miss in the same shape, `13`, `21`, `12.5`, `thirteen`, `2*7`, `26/2`, or
`1 2`; half equal, and no shape tells the label), split by problem with the task's fixed
held-out hash. Two judges are trained from the same starting model
(the built-in tiny model's initialisation with --seed, or --start_model) on the same items, the
same steps and batches:
  - classic: writes the verdict at once, `{"correct": true}`;
  - cot: first writes a normalisation of the response's answer and the reference
    (`twelve = 12; reference 12; same`), then the verdict.
Each is saved as a Hugging Face directory with its judge_config.json (its prompt template and
bounds): `--grader=judge --judge_model=<out_dir>/cot/judge_model` grades an RL run with it.
A share of the training items (`--attack_fraction`, 0.25) are attacks (`answer_forms.ATTACKS`):
responses that write a fake verdict, a fake reference or a fake judge turn, a verdict after
the answer, `12 or 13`, or two answer lines, labelled by the rules (the last line's answer).
Both are then measured on the held-out items, and on held-out attacks of every kind, through a
real vLLM engine and `rewards.judge.Judge` (greedy, the response in its delimited field, the
verdict parsed from the text; an unusable verdict counts as wrong), with the task's
digits-only checker as a baseline. Writes judge.md, judge.json and judge.png.
`--attack_fraction=0` trains the same judges without attacks (the comparison in BUILD.md).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import time

from absl import app, flags

from k15jax.data import answer_forms, tasks
from k15jax.infra import atomic
from k15jax.model import convert, tokenizer
from k15jax.rewards import judge as judge_lib
from k15jax.rewards.judge_training import MAX_PROMPT_TOKENS, TARGETS, judge_config, prompt_text
from k15jax.rollout import engines
from k15jax.run import evaluation, loop, report, run_config, warmup

_OUT = flags.DEFINE_string("out_dir", "runs/judge", "Output directory.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data, the initial weights and the batches.")
_START = flags.DEFINE_string("start_model", None, "Starting HF directory (default: built-in init).")
_TRAIN_N = flags.DEFINE_integer("train_problems", 3000, "Training problems (built-in task).")
_HELD_N = flags.DEFINE_integer("held_out_problems", 400, "Held-out problems.")
_PER = flags.DEFINE_integer("per_problem", 3, "Responses (answer forms) per problem.")
_STEPS = flags.DEFINE_integer("judge_steps", 600, "Optimizer steps per judge.")
_BATCH = flags.DEFINE_integer("judge_batch", 32, "Items per step.")
_LR = flags.DEFINE_float("judge_lr", 3e-3, "Peak learning rate (AdamW, warm-up + cosine).")
_CHARS = flags.DEFINE_integer(
    "max_response_chars", 48, "The end of the response a judge sees (its last lines)."
)
_ATTACKS = flags.DEFINE_float(
    "attack_fraction", 0.25, "Share of training items that are attacks (answer_forms.ATTACKS)."
)
_JUDGES = flags.DEFINE_list("judges", ["classic", "cot"], "Which judges to train and measure.")


def items() -> tuple[list[answer_forms.Item], list[answer_forms.Item], list[answer_forms.Item]]:
    """Returns (train, held-out, held-out attacks) items, train disjoint from both by problem."""
    seed = _SEED.value
    train = tasks.generate(_TRAIN_N.value, seed=seed)
    held = tasks.generate(_HELD_N.value, seed=seed, split="held_out")
    per = _PER.value
    return (
        answer_forms.equivalence_set(
            train, per_problem=per, seed=seed, attack_fraction=_ATTACKS.value
        ),
        answer_forms.equivalence_set(held, per_problem=per, seed=seed + 1),
        answer_forms.equivalence_set(held, per_problem=per, seed=seed + 2, attack_fraction=1.0),
    )


def train(kind: str, train_items: list[answer_forms.Item]) -> str:
    """Trains judge `kind` by SFT on (prompt, target) and returns its HF directory."""
    jcfg = judge_config(kind, _CHARS.value)
    out = os.path.join(_OUT.value, kind)
    d = run_config.RunConfig()
    cfg = dataclasses.replace(
        d,
        out_dir=out,
        seed=_SEED.value,
        model_dir=_START.value,
        task=dataclasses.replace(d.task, max_prompt_tokens=MAX_PROMPT_TOKENS, sft_examples=1),
        partial=dataclasses.replace(d.partial, budget=jcfg.max_tokens, max_length=jcfg.max_tokens),
        sft=dataclasses.replace(
            d.sft, steps=_STEPS.value, batch_size=_BATCH.value, learning_rate=_LR.value
        ),
    )
    run_config.check_out_dir(cfg)
    setup = loop.prepare(cfg)
    traces = tuple((prompt_text(jcfg, it), TARGETS[kind](it)) for it in train_items)
    check_same_data(out, traces, jcfg)
    asker = judge_lib.Judge(None, setup.tok, config=jcfg)
    for it, (text, _) in zip(train_items, traces, strict=True):
        item = judge_lib.JudgeItem(it.problem, it.reference, it.response)
        if asker.prompt_ids(item) != setup.tok.encode(text):
            raise app.UsageError(
                f"the tokenizer of {_START.value or 'the built-in model'} encodes the judge prompt "
                "differently in parts (as the judge asks) and whole (as it would be trained): "
                f"{text!r}; use a character-level tokenizer"
            )
    setup = dataclasses.replace(
        setup, problems=dataclasses.replace(setup.problems, sft_traces=traces)
    )
    t0 = time.perf_counter()
    params, history = warmup.run_sft(setup, progress=report.progress_bar)
    path = convert.save_hf(
        setup.model_cfg, params, os.path.join(out, "judge_model"), tokenizer=setup.tok
    )
    judge_lib.save_config(path, jcfg)
    print(
        f"{kind}: {len(history)} steps in {time.perf_counter() - t0:.0f} s, final loss "
        f"{history[-1]['loss'] if history else float('nan'):.4f}; {path}"
    )
    return path


def check_same_data(out: str, traces, jcfg: judge_lib.JudgeConfig) -> None:
    """Refuses to continue a judge in `out` trained on other items or another prompt (flags
    such as --train_problems are not in the run config that guards its checkpoints)."""
    digest = hashlib.sha256(json.dumps([traces, dataclasses.asdict(jcfg)]).encode()).hexdigest()
    path = os.path.join(out, "judge_data.sha256")
    if os.path.exists(path) and open(path).read() != digest and run_config.run_products(out):
        raise app.UsageError(
            f"{out} holds a judge trained on other items or another prompt (--train_problems, "
            "--per_problem, --max_response_chars, --seed); use another --out_dir"
        )
    atomic.write_text(path, digest)


def measure(kind: str, path: str, sets: dict[str, list[answer_forms.Item]]) -> dict[str, dict]:
    """Returns {set name: judge `kind`'s accuracy on it} for each held-out set, on one engine."""
    jcfg = judge_lib.load_config(path)
    vcfg = engines.VllmConfig(
        max_model_len=jcfg.max_prompt_tokens + jcfg.max_tokens,
        enable_prefix_caching=False,
        publish_dir=os.path.join(_OUT.value, "publish"),
        kv_cache_memory_bytes=256 << 20,
    )
    engine = engines.VllmEngine(path, vcfg)
    try:
        judge = judge_lib.Judge(engine, tokenizer.load(path), config=jcfg)
        return {name: _accuracy(judge, held) for name, held in sets.items()}
    finally:
        engine.close()


def _accuracy(judge: judge_lib.Judge, held: list[answer_forms.Item]) -> dict:
    """Returns the judge's accuracy, interval, judge tokens and per-form accuracy on `held`."""
    before = judge.stats["malformed"]
    t0 = time.perf_counter()
    results = judge([judge_lib.JudgeItem(it.problem, it.reference, it.response) for it in held])
    seconds = time.perf_counter() - t0
    right = [float(r.verdict.correct == it.label) for r, it in zip(results, held, strict=True)]
    acc, ci = evaluation.mean_ci95(right)
    by_form = collections.defaultdict(list)
    for r, it in zip(right, held, strict=True):
        by_form[f"{it.form} ({'equal' if it.label else 'differs'})"].append(r)
    wrong = [
        {"answer": it.answer, "reference": it.reference, "label": it.label, "judge": r.text}
        for r, it, ok in zip(results, held, right, strict=True)
        if not ok
    ]
    return {
        "accuracy": acc,
        "ci95": ci,
        "items": len(held),
        "judge_tokens": sum(r.judge_tokens for r in results) / len(results),
        "unusable": judge.stats["malformed"] - before,
        "seconds": seconds,
        "by_form": {f: sum(v) / len(v) for f, v in sorted(by_form.items())},
        "errors": wrong[:40],
    }


def rules_baseline(held: list[answer_forms.Item]) -> dict:
    """Returns the digits-only task checker's accuracy on the same items."""
    right = [
        float((tasks.reward(it.problem, it.response, it.reference)[0] >= 1.0) == it.label)
        for it in held
    ]
    acc, ci = evaluation.mean_ci95(right)
    return {"accuracy": acc, "ci95": ci, "judge_tokens": 0.0, "items": len(held)}


SETS = {
    "equivalence": "answer-equivalence items (the answer written in a shape or as a near miss)",
    "attacks": "attacks (`answer_forms.ATTACKS`, on the same held-out problems), labelled by "
    "the rules",
}


def markdown(results: dict[str, dict], n_train: int, attack_fraction: float) -> str:
    """Returns judge.md: per held-out set, each grader's accuracy and the per-shape table."""
    lines = [
        f"Training items: {n_train} ({attack_fraction:.0%} attacks), disjoint by problem from "
        "the held-out sets. Accuracy: verdict equals the label (an unusable verdict counts as "
        "wrong); 95% interval = mean ± 1.96 standard errors.",
    ]
    for name, by_grader in results.items():
        n = by_grader[next(iter(by_grader))]["items"]
        lines += [
            "",
            f"### Held out: {n} {SETS[name]}",
            "",
            "| grader | accuracy [95% interval] | mean judge tokens | unusable verdicts |",
            "|---|---|---|---|",
        ]
        for grader, r in by_grader.items():
            lo, hi = r["ci95"]
            lines.append(
                f"| {grader} | {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | "
                f"{r['judge_tokens']:.1f} | {r.get('unusable', 0)} |"
            )
        judged = [k for k in by_grader if "by_form" in by_grader[k]]
        if judged:
            forms = sorted(by_grader[judged[0]]["by_form"])
            lines += ["", "| shape (label) | " + " | ".join(judged) + " |"]
            lines.append("|---" * (len(judged) + 1) + "|")
            for f in forms:
                row = " | ".join(f"{by_grader[k]['by_form'][f]:.3f}" for k in judged)
                lines.append(f"| {f} | {row} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results)
    graders = list(results[sets[0]])
    width = 0.8 / len(sets)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for i, name in enumerate(sets):
        acc = [results[name][g]["accuracy"] for g in graders]
        err = [
            [a - results[name][g]["ci95"][0] for a, g in zip(acc, graders, strict=True)],
            [results[name][g]["ci95"][1] - a for a, g in zip(acc, graders, strict=True)],
        ]
        xs = [k + (i - (len(sets) - 1) / 2) * width for k in range(len(graders))]
        ax.bar(xs, acc, width, yerr=err, capsize=4, label=name)
    ax.set_xticks(range(len(graders)), graders)
    ax.set(ylim=(0, 1), ylabel="held-out accuracy", title="judges: equivalence and attacks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = set(_JUDGES.value) - set(TARGETS)
    if unknown:
        raise app.UsageError(f"--judges: {sorted(unknown)} not in {sorted(TARGETS)}")
    os.makedirs(_OUT.value, exist_ok=True)
    train_items, held, attacks = items()
    print(
        f"{len(train_items)} training items, {len(held)} held-out and {len(attacks)} held-out "
        f"attacks; {sum(it.label for it in held) / len(held):.3f} of held-out are equal"
    )
    paths = {kind: train(kind, train_items) for kind in _JUDGES.value}
    sets = {"equivalence": held, "attacks": attacks}
    results = {name: {"rules (digits only)": rules_baseline(s)} for name, s in sets.items()}
    for kind, path in paths.items():
        for name, r in measure(kind, path, sets).items():
            results[name][kind] = r
            print(f"{kind} on {name}: accuracy {r['accuracy']:.3f} {r['ci95']}")
    text = markdown(results, len(train_items), _ATTACKS.value)
    atomic.write_text(os.path.join(_OUT.value, "judge.md"), text)
    atomic.write_json(os.path.join(_OUT.value, "judge.json"), results)
    plot(results, os.path.join(_OUT.value, "judge.png"))
    print(text)


if __name__ == "__main__":
    app.run(main)
