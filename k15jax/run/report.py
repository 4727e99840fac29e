"""The run report: TensorBoard events, PNG plots and report.md, all computed from the run."""

from __future__ import annotations

import json
import os
import sys

from k15jax.infra import atomic
from k15jax.run import evaluation

PLOTS = (
    ("heldout_pass_at_1", "held-out pass@1"),
    ("reward", "mean reward"),
    ("accuracy", "train accuracy"),
    ("response_length", "mean response length (tokens)"),
    ("loss", "mirror-descent loss"),
    ("delta_abs_mean", "mean |δ| (sequence log-ratio)"),
    ("logprob_mismatch_max", "max |vLLM - JAX| log-prob"),
    ("rollout_tokens_per_s", "rollout tokens/s"),
    ("train_tokens_per_s", "training tokens/s"),
    ("judge_agreement", "judge agreement with the rules"),
)


def eval_line(name: str, result: dict) -> str:
    """Returns the one-line console summary of an evaluation."""
    lo, hi = result["ci95"]
    return (
        f"{name} held-out pass@1 {result['pass_at_1']:.3f} [{lo:.3f}, {hi:.3f}], "
        f"mean length {result['mean_length']:.1f}"
    )


def iteration_line(m: dict) -> str:
    """Returns the one-line console summary of an RL iteration."""
    if "reward" not in m:
        return f"it {m['iteration']:3d} | no group finished ({m['pending_samples']} pending)"
    line = (
        f"it {m['iteration']:3d} | reward {m['reward']:+.3f} acc {m['accuracy']:.3f} "
        f"len {m['response_length']:5.1f} | loss {m['loss']:.4f} |δ| {m['delta_abs_mean']:.3f} "
        f"| mismatch {m['logprob_mismatch_max']:.1e} | {m['rollout_tokens_per_s']:.0f} tok/s "
        f"| {m['seconds']:.1f}s"
    )
    if "judge_calls" in m:
        line += f" | judge {m['judge_calls']:.0f} calls, agree {m['judge_agreement']:.3f}"
    if "heldout_pass_at_1" in m:
        line += f" | held-out {m['heldout_pass_at_1']:.3f}"
    return line


def judge_lines(rl_history: list[dict], grader: dict) -> list[str]:
    """Returns the report's judge section: per iteration, the judge's calls, unusable verdicts,
    disagreements with the rules and their agreement; [] when the rules graded alone."""
    rows = [m for m in rl_history if "judge_calls" in m]
    if not rows:
        return []
    calls = sum(m["judge_calls"] for m in rows)
    usable = calls - sum(m["judge_malformed"] for m in rows)
    disagree = sum(m["judge_disagreements"] for m in rows)
    overall = f"{1 - disagree / usable:.3f}" if usable else "n/a"
    lines = [
        "## Judge",
        "",
        f"Grader `{grader['mode']}`, judge {grader['judge_model']}; unusable verdicts fall back "
        f"to `{grader['fallback']}`. Agreement = share of usable verdicts equal to the rules' "
        f"(the task's reward) on the same responses: {overall} over {usable:.0f} verdicts "
        f"({calls:.0f} judge calls). Judge texts: judge_log.jsonl.",
        "",
        "| it | judge calls | unusable | disagreements | agreement | judge tokens |",
        "|---|---|---|---|---|---|",
    ]
    for m in rows:
        lines.append(
            f"| {m['iteration']} | {m['judge_calls']:.0f} | {m['judge_malformed']:.0f} | "
            f"{m['judge_disagreements']:.0f} | {m['judge_agreement']:.3f} | "
            f"{m['judge_tokens']:.1f} |"
        )
    return [*lines, ""]


def removed_lines(removed: dict, max_prompt_tokens: int) -> list[str]:
    """Returns the report's lines on the problems left out before training (`loop`'s counts)."""
    lines = ["| left out | problems |", "|---|---|"]
    for reason, n in removed["screen"].items():
        lines.append(f"| screen: {reason.replace('_', ' ')} | {n} |")
    overlong = removed["overlong"]
    lines.append(f"| RL pool: prompt over {max_prompt_tokens} tokens | {overlong['train']} |")
    lines.append(f"| held-out: prompt over {max_prompt_tokens} tokens | {overlong['held_out']} |")
    sft = removed.get("sft", {})
    if sft.get("held_out") or sft.get("overlong"):
        lines.append(f"| SFT traces: prompt held out | {sft['held_out']} |")
        lines.append(f"| SFT traces: longer than a trainer row | {sft['overlong']} |")
    if "pool" in removed:
        tries = removed["easy_to_hack_tries"]
        hack = f"{removed['easy_to_hack']}" if tries else "off"
        lines.append(f"| easy to hack (right within {tries} no-reasoning tries) | {hack} |")
        lines.append(f"| always solved by the SFT model | {removed['solved']} |")
    if not removed["screen"]:
        lines.append("")
        lines.append("The screen (multiple-choice, true/false, proof) applies to JSONL pools only.")
    return lines


def at_k_lines(results: dict) -> list[str]:
    """Returns the report's pass@k / avg@k / maj@k table (`evaluation.evaluate`'s "at_k") of the
    SFT and RL models, with 95% intervals, for each k > 1 (k = 1 is the pass@1 table above)."""
    names = [n for n in results["rl"].get("at_k", {}) if not n.endswith("@1")]
    if not names:
        return []
    cell = lambda v: f"{v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"  # noqa: E731
    lines = [
        "| model | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label, key in (("SFT", "sft"), ("RL", "rl")):
        at_k = results[key].get("at_k", {})
        lines.append(
            f"| {label} | " + " | ".join(cell(at_k[n]) if n in at_k else "" for n in names) + " |"
        )
    return [*lines, ""]


def _series(history: list[dict], key: str):
    pts = [(m["iteration"], m[key]) for m in history if key in m]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_tensorboard(out_dir: str, sft_history: list[dict], rl_history: list[dict]) -> None:
    from tensorboardX import SummaryWriter

    with SummaryWriter(os.path.join(out_dir, "tensorboard")) as w:
        for m in sft_history:
            w.add_scalar("sft/loss", m["loss"], m["step"])
            w.add_scalar("sft/train_tokens_per_s", m["train_tokens_per_s"], m["step"])
        for m in rl_history:
            for key, value in m.items():
                if key != "iteration" and isinstance(value, int | float):
                    w.add_scalar(f"rl/{key}", value, m["iteration"])


def write_plots(
    out_dir: str, sft_history: list[dict], rl_history: list[dict], results: dict
) -> list[str]:
    """Writes one PNG per metric plus the SFT loss; returns the file names.

    Held-out pass@1 is plotted after the iteration that produced it, from the SFT model
    (after 0 iterations, with its 95% interval) to the final RL model.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    if sft_history:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([m["step"] for m in sft_history], [m["loss"] for m in sft_history])
        ax.set(xlabel="SFT step", ylabel="cross-entropy", yscale="log", title="SFT loss")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "sft_loss.png"), dpi=90)
        plt.close(fig)
        names.append("sft_loss.png")
    for key, title in PLOTS:
        x, y = _series(rl_history, key)
        if key == "heldout_pass_at_1":
            x = [0] + [i + 1 for i in x] + [len(rl_history)]
            y = [results["sft"]["pass_at_1"], *y, results["rl"]["pass_at_1"]]
        if not x:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(x, y, marker="o" if len(x) < 12 else None)
        if key == "heldout_pass_at_1":
            for i, name in ((0, "sft"), (-1, "rl")):
                lo, hi = results[name]["ci95"]
                ax.errorbar([x[i]], [y[i]], yerr=[[y[i] - lo], [hi - y[i]]], fmt="none", capsize=4)
        ax.set(xlabel="RL iteration", title=title)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{key}.png"), dpi=90)
        plt.close(fig)
        names.append(f"{key}.png")
    return names


def _paired(sft: dict, rl: dict) -> str:
    gain, (low, high) = evaluation.paired_gain(sft, rl)
    return f"{gain:+.3f} [{low:+.3f}, {high:+.3f}] (95% interval of the per-problem difference)"


def verdict_line(config: dict, sft: dict, rl: dict) -> str:
    """Returns what the run showed, in words, naming its seed (a run shows its own seed only)."""
    seed = config["seed"]
    if rl["ci95"][0] > sft["ci95"][1]:
        shown = (
            f"On seed {seed}, RL raised held-out pass@1 from {sft['pass_at_1']:.3f} to "
            f"{rl['pass_at_1']:.3f}, with the two 95% intervals apart: RL improved the model "
            "beyond its SFT warm-up on problems it never trained on, by more than the "
            "evaluation's noise."
        )
    elif sft["ci95"][0] > rl["ci95"][1]:
        shown = (
            f"On seed {seed}, RL lowered held-out pass@1 from {sft['pass_at_1']:.3f} to "
            f"{rl['pass_at_1']:.3f}, with the two 95% intervals apart: RL made the model worse."
        )
    else:
        shown = (
            f"On seed {seed}, the held-out pass@1 of RL ({rl['pass_at_1']:.3f}) and of the SFT "
            f"warm-up ({sft['pass_at_1']:.3f}) have overlapping 95% intervals: this run shows "
            "no difference beyond the evaluation's noise."
        )
    return shown + " Another seed draws other problems, weights and samples; run it with --seed."


def write(out_dir: str, config: dict, sft_history, rl_history, results: dict) -> None:
    """Writes tensorboard/, *.png, history.json (the per-step and per-iteration metrics),
    results.json and report.md into `out_dir`."""
    write_tensorboard(out_dir, sft_history, rl_history)
    plots = write_plots(out_dir, sft_history, rl_history, results)
    atomic.write_json(
        os.path.join(out_dir, "history.json"), {"sft": list(sft_history), "rl": list(rl_history)}
    )
    atomic.write_json(os.path.join(out_dir, "results.json"), results)
    sft, rl = results["sft"], results["rl"]
    separated = rl["ci95"][0] > sft["ci95"][1]
    lines = [
        "# k15jax run report",
        "",
        f"Held-out set: {sft['problems']} problems x {sft['samples']} samples at temperature "
        f"{config['eval']['temperature']}. pass@1 = mean correctness; 95% interval = mean ± 1.96 "
        "standard errors over problems.",
        "",
        "| model | held-out pass@1 | 95% interval | mean response length |",
        "|---|---|---|---|",
        f"| SFT (long-CoT warm-up) | {sft['pass_at_1']:.3f} | [{sft['ci95'][0]:.3f}, "
        f"{sft['ci95'][1]:.3f}] | {sft['mean_length']:.1f} |",
        f"| RL (mirror descent) | {rl['pass_at_1']:.3f} | [{rl['ci95'][0]:.3f}, "
        f"{rl['ci95'][1]:.3f}] | {rl['mean_length']:.1f} |",
        "",
        f"Gain: {rl['pass_at_1'] - sft['pass_at_1']:+.3f}; the intervals "
        f"{'do not overlap (RL above SFT)' if separated else 'overlap'}. "
        f"Paired over the same problems: {_paired(sft, rl)}.",
        "",
        verdict_line(config, sft, rl),
        "",
        f"Wall time: {results['wall_seconds']:.0f} s; {results['parameters']:,} parameters; "
        f"{len(rl_history)} RL iterations.",
        "",
        *at_k_lines(results),
        *judge_lines(rl_history, config.get("grader", {})),
        "## Prompt set",
        "",
        *removed_lines(results["removed"], config["task"]["max_prompt_tokens"]),
        "",
        "## Per iteration",
        "",
        "| it | reward | train acc | length | loss | mean abs δ | zero-var groups | "
        "max mismatch | rollout tok/s | train tok/s | held-out |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in rl_history:
        if "reward" not in m:
            continue
        held = f"{m['heldout_pass_at_1']:.3f}" if "heldout_pass_at_1" in m else ""
        lines.append(
            f"| {m['iteration']} | {m['reward']:+.3f} | {m['accuracy']:.3f} | "
            f"{m['response_length']:.1f} | {m['loss']:.4f} | {m['delta_abs_mean']:.3f} | "
            f"{m['zero_variance_groups']:.2f} | {m['logprob_mismatch_max']:.1e} | "
            f"{m['rollout_tokens_per_s']:.0f} | {m['train_tokens_per_s']:.0f} | {held} |"
        )
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Configuration", "", "```json", json.dumps(config, indent=2), "```", ""]
    atomic.write_text(os.path.join(out_dir, "report.md"), "\n".join(lines))


def progress_bar(**kw):
    """Returns a tqdm bar that redraws each second on a terminal and every 30 s into a file or a
    pipe, so that a log gets a few lines a phase rather than one a step."""
    from tqdm import tqdm

    return tqdm(**kw, leave=False, mininterval=1.0 if sys.stderr.isatty() else 30.0)


class Quiet:
    """The progress bar of a process other than 0: prints nothing."""

    def __init__(self, **kw):
        pass

    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass
