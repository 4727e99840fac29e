"""k1.5's findings in miniature: one command, several seeds fixed before the runs, one report.

  python -m experiments.reproduce --out_dir=runs/reproduce --seeds=0,1,2   # the built-in task
  python -m experiments.reproduce --quick --out_dir=runs/reproduce_quick   # toy size, one seed

For each seed it runs the default run (long-CoT SFT warm-up, then RL: the *base* arm) and, from
that seed's SFT model with the same problems, RL arms that differ from the base in one setting
each: the ReST objective (F4), an easy-first curriculum and uniform sampling (F5), no length
penalty (F6) and partial rollouts at half the budget (the partial-rollout finding). Then a model
warmed up on direct answers and the SFT and RL models at several response budgets (F3), and
long2short from the seed's RL model: merge with the direct model, shortest rejection sampling +
SFT, DPO and long2short RL (F7). Every arm has the base run's iterations.

Each finding is one or more paired quantities (arm − reference on the same seed) with the
paper's direction, judged by the rule in `k15jax.run.findings` (written before any run):
holds / does not hold / inconclusive from the 95% interval over seeds. `<out_dir>/report.md`
has, per finding, the paper's claim, the setup, a table per seed, mean and interval, the
verdict and a PNG beside it; results.json has every number. A rerun of the same command reads
back every finished arm and model and runs only what is missing.

Another scale by flags alone (untested on a GPU; BUILD.md gives the sizes):
  python -m experiments.reproduce --model=/models/Qwen2.5-0.5B-Instruct \\
      --data=../shared/data/gsm8k_train.jsonl --reward=math --sft_steps=0 --max_length=4096 \\
      --budget=4096 --budgets=1024,2048,4096 --short_model=/models/short --mesh=1,8,1
With --data (no built-in direct answers) the direct-answer half of F3 needs --short_model, the
short model merged in F7; without one both are left out and the report says so.

Every other flag is experiments/rl.py's, experiments/task_study.py's (--seeds, --budgets) or
experiments/long2short.py's (the F7 settings); --l2s_max_length defaults here to 85% of
--max_length, so long2short RL has room for the task's traces. One process only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil

import numpy as np
from absl import app, flags

from experiments import long2short as l2s  # its flags (F7) are this script's flags too
from experiments import run_flags, task_study  # the run's flags, --seeds and --budgets
from k15jax.infra import atomic
from k15jax.model import convert
from k15jax.run import evaluation, findings, loop, report, run_config, run_setup, warmup
from k15jax.run import long2short as l2s_lib
from k15jax.run.run_config import RunConfig

_QUICK = flags.DEFINE_bool(
    "quick", False, "Toy size and the first seed only: checks the command, not the findings."
)
FLAGS = flags.FLAGS
r = dataclasses.replace


# ------------------------------------------------------------------------------- settings


def quick_config(cfg: RunConfig) -> RunConfig:
    """Returns `cfg` at toy size (`--quick`): every phase runs, in about a minute each."""
    return r(
        cfg,
        model=r(cfg.model, num_hidden_layers=1),
        task=r(cfg.task, min_digits=2, max_digits=2, train_problems=16, sft_examples=64),
        sft=r(cfg.sft, steps=4, batch_size=8, warmup_steps=1),
        rl=r(
            cfg.rl, iterations=2, prompts_per_iteration=4, samples_per_prompt=4,
            groups_per_step=4, difficulty_samples=2, easy_to_hack_tries=0, eval_every=1,
        ),
        eval=r(cfg.eval, problems=8, samples=2, ks=(1,)),
        partial=r(cfg.partial, max_length=48, budget=48),
        length=r(cfg.length, warmup_iterations=1),
    )  # fmt: skip


QUICK_L2S = {"rs_problems": 8, "rs_samples": 4, "rs_sft_steps": 2, "dpo_steps": 2,
             "dpo_pairs_per_step": 2, "l2s_iterations": 1}  # fmt: skip


def arms(cfg: RunConfig) -> dict[str, RunConfig]:
    """Returns the RL arms: name -> the base run's config with its one change (module docstring).

    The curriculum arms sample without prioritization so that only the order differs: the
    run's own easy-first curriculum (its warm-up, then the hard pool) against uniform draws from
    every problem throughout.
    """
    plain = r(cfg.sampler, prioritized=False)
    return {
        "rest": r(cfg, rl=r(cfg.rl, objective="rest")),
        "curriculum": r(cfg, sampler=plain),
        "uniform": r(cfg, sampler=r(plain, curriculum_iterations=0, hard_threshold=1.0)),
        "no_length_penalty": r(cfg, length=r(cfg.length, weight=0.0)),
        "partial": r(cfg, partial=r(cfg.partial, budget=max(cfg.partial.max_length // 2, 1))),
    }


# ------------------------------------------------------------------------------ one seed


def _read(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out_dir, "history.json")) as f:
        results["history"] = json.load(f)["rl"]
    return results


def run_once(cfg: RunConfig, engine, console) -> dict:
    """Runs `cfg` (SFT and RL, `loop.run`) on `engine` unless it finished; returns its results
    with its RL history."""
    if not os.path.exists(os.path.join(cfg.out_dir, "results.json")):
        loop.run(cfg, engine=engine, progress=report.progress_bar, console=console)
    return _read(cfg.out_dir)


def rl_arm(base: RunConfig, arm: RunConfig, name: str, engine, console) -> dict:
    """Runs one RL arm from the base run's SFT model (no SFT of its own, no mid evaluations).

    The SFT model's evaluation and difficulty pass are the base run's: the same model, seed,
    problems and settings (the arms change none of what they read), so they are copied.
    """
    out = os.path.join(os.path.dirname(base.out_dir), name)
    cfg = r(
        arm,
        out_dir=out,
        model_dir=os.path.join(base.out_dir, "sft_model"),
        sft=r(arm.sft, steps=0),
        rl=r(arm.rl, eval_every=0),
    )
    os.makedirs(out, exist_ok=True)
    for name_ in ("eval_sft.json", "difficulty.json"):
        if not os.path.exists(os.path.join(out, name_)):
            shutil.copy(os.path.join(base.out_dir, name_), os.path.join(out, name_))
    return run_once(cfg, engine, console)


def at_budgets(setup: run_setup.Setup, engine, params, budgets: list[int]) -> dict[str, dict]:
    """Returns held-out results of `params` at each response budget (vLLM's max_tokens)."""
    engine.load_weights(params)
    held = setup.problems.held_out
    prompts = [setup.prompt_ids(p) for p in held]
    out = {}
    for b in budgets:
        res = evaluation.evaluate(
            engine, held, prompts, setup.scorer, setup.cfg.eval,
            max_tokens=b, repeat=setup.cfg.repeat, seed=setup.cfg.seed + 1,
        )  # fmt: skip
        out[str(b)] = {k: res[k] for k in ("pass_at_1", "ci95", "mean_length")}
        out[str(b)]["levels"] = task_study.by_level(held, res)
    return out


def direct_model(base: RunConfig) -> str | None:
    """Returns the directory of a model warmed up on direct answers: --short_model, or on the
    built-in task the base run's SFT with every trace a direct answer; None without either."""
    if FLAGS.short_model:
        return FLAGS.short_model
    if base.task.data is not None:
        return None
    cfg = r(
        base,
        out_dir=os.path.join(os.path.dirname(base.out_dir), "direct"),
        task=r(base.task, short_fraction=1.0),
    )
    run_config.check_out_dir(cfg)
    setup = run_setup.prepare(cfg)
    path = os.path.join(cfg.out_dir, "sft_model")
    l2s.model_once(setup, path, lambda: warmup.run_sft(setup, report.progress_bar)[0])
    return path


def long_to_short(base: RunConfig, engine, rl_params, short_dir: str | None) -> dict:
    """Returns {method: held-out result} of long2short from the RL model (k1.5 §2.4, Fig. 7)."""
    cfg = r(base, out_dir=os.path.join(os.path.dirname(base.out_dir), "long2short"))
    run_config.check_out_dir(cfg)
    setup = run_setup.prepare(cfg)
    info: dict = {}
    builds = {}
    if short_dir is not None:
        short = convert.load_hf(short_dir, dtype=setup.model_cfg.dtype)[1]
        builds["merge"] = lambda: l2s.model_once(
            setup, os.path.join(cfg.out_dir, "merge", "model"),
            lambda: l2s_lib.merge_params(rl_params, short, weight_a=FLAGS.merge_weight),
        )  # fmt: skip
    builds["shortest rejection + SFT"] = lambda: l2s.shortest_rejection(
        setup, engine, rl_params, cfg.out_dir, info
    )
    builds["DPO"] = lambda: l2s.dpo(setup, engine, rl_params, cfg.out_dir, info)
    builds["long2short RL"] = lambda: l2s.long2short_rl(cfg, engine, rl_params, info)
    results = {}
    for i, (name, build) in enumerate(builds.items()):
        params = build()

        def evaluate(params=params):
            engine.load_weights(params)
            return run_setup.evaluate(setup, engine)

        res = atomic.json_once(os.path.join(cfg.out_dir, f"eval_{i}.json"), evaluate)
        results[name] = {k: res[k] for k in ("pass_at_1", "ci95", "mean_length")}
    return results


def one_seed(cfg: RunConfig, seed: int, engine, budgets: list[int]) -> dict:
    """Runs every arm and model of `seed`; returns its measurements (plain data)."""
    d = os.path.join(cfg.out_dir, f"seed{seed}")
    console = lambda line: print(f"[seed {seed}] {line}", flush=True)  # noqa: E731
    base = r(cfg, seed=seed, out_dir=os.path.join(d, "base"))
    out = {"base": run_once(base, engine, console)}
    for name, arm in arms(base).items():
        console(f"arm {name}")
        out[name] = rl_arm(base, arm, name, engine, console)
    setup = run_setup.prepare(r(base, model_dir=os.path.join(base.out_dir, "sft_model")))
    load = lambda path: convert.load_hf(path, dtype=setup.model_cfg.dtype)[1]  # noqa: E731
    sft_params, rl_params = load(setup.cfg.model_dir), load(os.path.join(base.out_dir, "rl_model"))
    short_dir = direct_model(base)
    models = {"SFT (long traces)": sft_params, "RL": rl_params}
    if short_dir is not None:
        models["SFT (direct answers)"] = load(short_dir)

    def budget_table():
        return {name: at_budgets(setup, engine, p, budgets) for name, p in models.items()}

    console("response budgets")
    out["budgets"] = atomic.json_once(os.path.join(d, "budgets.json"), budget_table)
    console("long2short from the RL model")
    out["long2short"] = {
        "RL model": {k: out["base"]["rl"][k] for k in ("pass_at_1", "ci95", "mean_length")},
        **long_to_short(base, engine, rl_params, short_dir),
    }
    return out


# ------------------------------------------------------------------------------ findings


def _series(history: list[dict], key: str) -> list[float]:
    return [m.get(key, np.nan) for m in history]


def _levels(history: list[dict]) -> list[str]:
    found = {k.split("/")[1] for m in history for k in m if k.startswith("level/")}
    return sorted(found, key=float)


def _rl_seconds(run: dict) -> float:
    return float(sum(m.get("seconds", 0.0) for m in run["history"]))


def _efficiency(res: dict) -> float:
    """pass@1 per 100 response tokens."""
    return 100 * res["pass_at_1"] / max(res["mean_length"], 1e-9)


def measure(runs: dict[int, dict], out_dir: str, budgets: list[int]) -> list[findings.Finding]:
    """Returns F1-F7 and the partial-rollout finding from every seed's runs, with pictures."""
    seeds = list(runs)
    Q, F = findings.Quantity, findings.Finding
    per = lambda f: tuple(float(f(runs[s])) for s in seeds)  # noqa: E731
    png = lambda name: os.path.join(out_dir, name)  # noqa: E731
    pass1 = lambda arm: per(lambda x: x[arm]["rl"]["pass_at_1"])  # noqa: E731
    base_rl, base_sft = pass1("base"), per(lambda x: x["base"]["sft"]["pass_at_1"])
    diff = lambda a, b: tuple(x - y for x, y in zip(a, b, strict=True))  # noqa: E731
    apart = sum(runs[s]["base"]["rl"]["ci95"][0] > runs[s]["base"]["sft"]["ci95"][1] for s in seeds)
    out = []
    f1_arms = {"SFT warm-up": base_sft, "RL": base_rl}
    out.append(F(
        "F1", "RL beats the SFT warm-up",
        "RL from the long-CoT warm-up raises pass@1 on every benchmark (k1.5 Tables 2-3).",
        f"held-out pass@1 of the seed's SFT model and of its RL model (the default run); on "
        f"{apart} of {len(seeds)} seeds the two 95% intervals over problems are apart",
        (Q("RL − SFT held-out pass@1", diff(base_rl, base_sft), 1),),
        f1_arms, "held-out pass@1",
        findings.plot_arms(png("f1_rl_vs_sft.png"), f1_arms, title="F1: RL vs SFT warm-up",
                           ylabel="held-out pass@1"),
    ))  # fmt: skip
    hist = {s: runs[s]["base"]["history"] for s in seeds}
    levels = _levels(hist[seeds[0]])
    x = list(range(len(hist[seeds[0]])))
    acc = {f"accuracy, level {lv}": (x, [_series(hist[s], f"level/{lv}/accuracy") for s in seeds])
           for lv in levels}  # fmt: skip
    length = {
        f"length, level {lv}": (x, [_series(hist[s], f"level/{lv}/response_length") for s in seeds])
        for lv in levels
    }
    f2 = [
        Q("training accuracy, last − first third of RL", per(
            lambda x: findings.thirds_change(_series(x["base"]["history"], "accuracy"))), 1),
        Q("response length, last − first third of RL", per(
            lambda x: findings.thirds_change(_series(x["base"]["history"], "response_length"))),
          1),
    ]  # fmt: skip
    if len(levels) > 1:
        top, low = levels[-1], levels[0]
        mean_len = lambda x, lv: np.nanmean(  # noqa: E731
            _series(x["base"]["history"], f"level/{lv}/response_length")
        )
        gap = per(lambda x: mean_len(x, top) - mean_len(x, low))
        f2.append(Q(f"response length during RL, level {top} − level {low}", gap, 1))
    out.append(F(
        "F2", "training accuracy and response length rise together; harder levels longer",
        "During RL, training accuracy and response length grow together, and harder problems "
        "get longer responses (k1.5 Fig. 5).",
        "the base run's training samples per iteration (prioritized sampling draws harder "
        "problems as the easy ones are solved, so the mix of levels changes too)",
        tuple(f2), {}, "",
        findings.plot_curves(png("f2_accuracy_length.png"), acc, title="F2: during RL",
                             xlabel="RL iteration", ylabel="training accuracy", right=length,
                             right_label="response tokens"),
    ))  # fmt: skip
    lo_b, hi_b = str(min(budgets)), str(max(budgets))
    bud = lambda model, b: per(lambda x: x["budgets"][model][b]["pass_at_1"])  # noqa: E731
    f3 = [Q(f"RL pass@1, budget {hi_b} − {lo_b} tokens", diff(bud("RL", hi_b), bud("RL", lo_b)),
            1)]  # fmt: skip
    direct = "SFT (direct answers)" in runs[seeds[0]]["budgets"]
    if direct:
        cot = diff(bud("SFT (long traces)", hi_b), bud("SFT (direct answers)", hi_b))
        f3.append(Q(f"SFT pass@1 at {hi_b} tokens, long traces − direct answers", cot, 1))
    curves = {m: ([int(b) for b in budgets], [[runs[s]["budgets"][m][str(b)]["pass_at_1"]
                                               for b in budgets] for s in seeds])
              for m in runs[seeds[0]]["budgets"]}  # fmt: skip
    out.append(F(
        "F3", "accuracy rises with the allowed response length; long CoT beats direct answers",
        "Accuracy grows with the response length the model may use (k1.5 Figs. 6, 8), and "
        "long chains of thought beat short ones.",
        "the seed's SFT and RL models sampled on the held-out set at each budget (vLLM "
        "max_tokens; a response cut before its answer scores 0); the direct model is the same "
        "SFT on direct answers" + ("" if direct else " (left out: no built-in task and no "
                                   "--short_model)"),
        tuple(f3), {f"{m} @ {b}": bud(m, str(b)) for m in curves for b in budgets},
        "held-out pass@1",
        findings.plot_curves(png("f3_budgets.png"), curves, title="F3: pass@1 per budget",
                             xlabel="response budget (tokens)", ylabel="held-out pass@1"),
    ))  # fmt: skip
    for key, title, paper, setup_text, a, b, name in (
        ("F4", "OPMD with negative gradients beats ReST",
         "Mirror descent, which also pushes down wrong samples, learns faster than ReST, which "
         "fits the correct samples only (k1.5 Fig. 10).",
         "objective: the base's mirror-descent loss vs ReST (likelihood of the samples with "
         "reward >= 0.5 only), everything else equal", "base", "rest", "f4_opmd_vs_rest.png"),
        ("F5", "an easy-first curriculum beats uniform sampling",
         "Starting on easy problems and moving to hard ones beats uniform sampling at equal "
         "iterations (k1.5 Fig. 9).",
         "the sampler: the run's easy-first curriculum (a warm-up widening from the easiest "
         "problems to all, then the hard pool) vs uniform draws from every problem, both "
         "without prioritization",
         "curriculum", "uniform", "f5_curriculum.png"),
    ):  # fmt: skip
        arm_values = {a: pass1(a), b: pass1(b)}
        out.append(F(
            key, title, paper, setup_text,
            (Q(f"held-out pass@1, {a} − {b}", diff(pass1(a), pass1(b)), 1),),
            arm_values, "held-out pass@1",
            findings.plot_arms(png(name), arm_values, title=f"{key}: {title}",
                               ylabel="held-out pass@1"),
        ))  # fmt: skip
    rl_len = lambda arm: per(lambda x: x[arm]["rl"]["mean_length"])  # noqa: E731
    f6_arms = {"length penalty": rl_len("base"), "none": rl_len("no_length_penalty")}
    out.append(F(
        "F6", "the length penalty shortens responses at no loss of accuracy",
        "The length reward (after a warm-up without it) cuts response length while keeping "
        "accuracy (k1.5 §2.3.3).",
        "the base's length reward (weight and warm-up of the default run) vs none",
        (Q("held-out mean length, penalty − none", diff(rl_len("base"),
                                                        rl_len("no_length_penalty")), -1),
         Q("held-out pass@1, penalty − none (guard)", diff(base_rl, pass1("no_length_penalty")),
           0)),
        f6_arms, "held-out mean response tokens",
        findings.plot_arms(png("f6_length_penalty.png"), f6_arms, title="F6: length penalty",
                           ylabel="held-out mean response tokens"),
    ))  # fmt: skip
    methods = list(runs[seeds[0]]["long2short"])
    l2s_at = lambda m, k: per(lambda x: x["long2short"][m][k])  # noqa: E731
    eff = lambda m: per(lambda x: _efficiency(x["long2short"][m]))  # noqa: E731
    others = [m for m in methods if m not in ("RL model", "long2short RL")]
    out.append(F(
        "F7", "long2short RL is the most token-efficient long2short method",
        "From the long-CoT RL model, long2short RL reaches the best accuracy per token among "
        "merging, shortest rejection sampling and DPO (k1.5 Fig. 7, §2.4).",
        "each method starts from the seed's RL model; token efficiency = held-out pass@1 per "
        "100 response tokens" + ("" if "merge" in methods else "; merge left out (no short "
                                 "model)"),
        tuple(Q(f"efficiency, long2short RL − {m}", diff(eff("long2short RL"), eff(m)), 1)
              for m in others),
        {f"{m}: pass@1": l2s_at(m, "pass_at_1") for m in methods}
        | {f"{m}: tokens": l2s_at(m, "mean_length") for m in methods},
        "held-out",
        findings.plot_points(png("f7_long2short.png"),
                             {m: (l2s_at(m, "mean_length"), l2s_at(m, "pass_at_1"))
                              for m in methods}, title="F7: long2short from the RL model"),
    ))  # fmt: skip
    secs = lambda arm: per(lambda x: _rl_seconds(x[arm]))  # noqa: E731
    p_arms = {"full rollouts": secs("base"), "partial": secs("partial")}
    out.append(F(
        "P", "partial rollouts: the same accuracy in less time",
        "Partial rollouts carry unfinished long samples to the next iteration, saving time at "
        "no loss (k1.5 §2.6.2).",
        "the rollout budget per iteration: the whole maximum length (full) vs half of it "
        "(partial); RL seconds are the iterations' own wall time, this machine",
        (Q("RL wall seconds, partial − full", diff(secs("partial"), secs("base")), -1),
         Q("held-out pass@1, partial − full (guard)", diff(pass1("partial"), base_rl), 0)),
        p_arms, "RL wall seconds",
        findings.plot_arms(png("partial_rollouts.png"), p_arms, title="Partial rollouts",
                           ylabel="RL wall seconds"),
    ))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------- main


class EngineOnDemand:
    """The reproduction's one vLLM engine, started at its first use: a rerun that finds every
    arm and model finished reads them back and starts none."""

    def __init__(self, start):
        self._start, self.engine = start, None

    def __getattr__(self, name):  # only what this object lacks: the engine's own methods
        if self.engine is None:
            self.engine = self._start()
        return getattr(self.engine, name)


def reproduce(cfg: RunConfig, seeds: list[int], budgets: list[int]) -> list[findings.Finding]:
    """Runs every seed, writes report.md and results.json into cfg.out_dir; returns findings."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    with contextlib.ExitStack() as stack:

        def start():
            init = os.path.join(cfg.out_dir, "engine_model")  # any model of the run's shape
            if cfg.model_dir is None and not os.path.exists(os.path.join(init, "config.json")):
                setup = run_setup.prepare(r(cfg, out_dir=init))
                convert.save_hf(setup.model_cfg, setup.params, init, tokenizer=setup.tok)
            return l2s.start_engine(cfg, cfg.model_dir or init, stack)

        engine = EngineOnDemand(start)
        runs = {s: one_seed(cfg, s, engine, budgets) for s in seeds}
        if engine.engine is None:
            print("every arm and model was finished: no engine started", flush=True)
    results = measure(runs, cfg.out_dir, budgets)
    header = (
        f"# k1.5 in miniature: seeds {seeds}, fixed before the runs\n\n"
        f"{cfg.rl.iterations} RL iterations per arm; held-out set of {cfg.eval.problems} "
        f"problems x {cfg.eval.samples} samples. Verdict rule (k15jax/run/findings.py, written "
        "before the runs): a quantity holds when the 95% t-interval over seeds of its mean lies "
        "wholly on the paper's side of 0, does not hold when wholly on the other side, else "
        "inconclusive; a guard holds unless wholly below 0; a finding holds when all its "
        "quantities hold."
    )
    text = findings.markdown(results, seeds, header=header)
    atomic.write_text(os.path.join(cfg.out_dir, "report.md"), text)
    atomic.write_json(
        os.path.join(cfg.out_dir, "results.json"),
        {
            "seeds": seeds,
            "budgets": budgets,
            "findings": [
                {"key": f.key, "verdict": f.verdict,
                 "quantities": [dataclasses.asdict(q) for q in f.quantities],
                 "arms": {k: list(v) for k, v in f.arms.items()}, "picture": f.picture}
                for f in results
            ],
            "config": run_config.as_json(cfg),
        },
    )  # fmt: skip
    print(text)
    return results


def main(argv):
    try:
        cfg = run_flags.config_from_argv(argv)
        if _QUICK.value:
            cfg = quick_config(cfg)
            for name, value in QUICK_L2S.items():
                FLAGS[name].value = value
        if not FLAGS["l2s_max_length"].present:
            FLAGS.l2s_max_length = max(int(0.85 * cfg.partial.max_length), 1)
        seeds = [int(s) for s in FLAGS.seeds][: 1 if _QUICK.value else None]
        budgets = sorted({int(b) for b in FLAGS.budgets})
        if not FLAGS["budgets"].present:  # quarters of the maximum length; two at toy size
            n = cfg.partial.max_length
            budgets = [8, n] if _QUICK.value else [n // 4, n // 2, 3 * n // 4, n]
        if not seeds or not budgets or min(budgets) < 1 or max(budgets) > cfg.partial.max_length:
            raise ValueError(
                f"--seeds and --budgets must be non-empty, budgets in [1, --max_length="
                f"{cfg.partial.max_length}]; got {FLAGS.seeds}, {FLAGS.budgets}"
            )
        l2s.rl_config(cfg), l2s.dpo_config(), l2s.pair_rules()  # refuse bad F7 flags early
        if cfg.partial.budget != cfg.partial.max_length:
            raise ValueError(
                f"--budget={cfg.partial.budget} must equal --max_length="
                f"{cfg.partial.max_length}: the base arm rolls out whole responses, and the "
                "partial-rollout arm is the one with half the budget"
            )
        arms(cfg)  # and arms the run's settings cannot make
    except ValueError as e:
        run_flags.fail(e)
    try:
        reproduce(cfg, seeds, budgets)
    except (*run_flags.USER_ERRORS, l2s_lib.MergeError) as e:
        run_flags.fail(e)


if __name__ == "__main__":
    app.run(main)
