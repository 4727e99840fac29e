"""Long2short (k1.5 §2.4): turn a long-CoT model into a short one; the token-efficiency report.

  python -m experiments.long2short --method=report --out_dir=runs/long2short \\
      --max_length=192 --budget=192 --short_fraction=0.1 --sft_steps=250 --sft_batch_size=16 \\
      --short_sft_steps=150 --train_problems=64 --rs_problems=64 --rs_sft_steps=60 \\
      --dpo_steps=30 --dpo_pairs_per_step=8 --l2s_iterations=6 --prompts_per_iteration=16 \\
      --groups_per_step=8 --difficulty_samples=4 --easy_to_hack_tries=0 \\
      --eval_problems=150 --eval_samples=4

builds, on the built-in task, the long model (the run's SFT phase on the solver's traces: long
ones, and direct answers for a --short_fraction of them), the short model (SFT on the short
traces only) and one model per method from the long one, evaluates each on the held-out set
with the same engine and sampling, and writes
report.md (the table), results.json and long2short.png (accuracy against mean response tokens,
like k1.5 Fig. 7) into --out_dir. Re-running the same command resumes: finished models and
evaluations are read back. The other methods, one at a time, from Hugging Face directories:

  python -m experiments.long2short --method=merge --long_model=A --short_model=B --merge_weight=0.5
  python -m experiments.long2short --method=shortest --model=A --rs_samples=8   # SFT set as JSONL
  python -m experiments.long2short --method=dpo --model=A --dpo_length_ratio=1.5
  python -m experiments.long2short --method=rl --model=A --l2s_max_length=64 --l2s_length_weight=0.5
  python -m experiments.long2short --method=short                                # built-in task

Each writes <out_dir>/<method>/model. Every other flag is experiments/rl.py's (the task, lengths,
RL settings, engine knobs). One process only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable

from absl import app, flags

from experiments import run_flags  # the run flags are this script's flags too
from k15jax.infra import atomic
from k15jax.model import convert, decoder
from k15jax.rollout import engines
from k15jax.run import long2short, loop, run_config, run_setup, warmup
from k15jax.run.report import progress_bar
from k15jax.run.run_config import RunConfig
from k15jax.train import sft

METHODS = ("report", "merge", "shortest", "dpo", "rl", "short")
_METHOD = flags.DEFINE_enum("method", "report", METHODS, "What to run (module docstring).")
_LONG = flags.DEFINE_string("long_model", None, "--method=merge: the long-CoT model directory.")
_SHORT_MODEL = flags.DEFINE_string(
    "short_model", None, "--method=merge: the short-CoT model directory."
)
_MERGE_W = flags.DEFINE_float("merge_weight", 0.5, "Merge: weight of the long model (0..1).")
_RS_N = flags.DEFINE_integer("rs_samples", 8, "Shortest rejection / DPO: samples per prompt.")
_RS_PROBLEMS = flags.DEFINE_integer(
    "rs_problems", 256, "Shortest rejection / DPO: RL-pool problems sampled (the first ones)."
)
_RS_STEPS = flags.DEFINE_integer("rs_sft_steps", 150, "Shortest rejection: SFT steps.")
_RS_LR = flags.DEFINE_float("rs_learning_rate", 1e-3, "Shortest rejection: SFT peak LR.")
_DPO = long2short.DpoConfig()
_DPO_STEPS = flags.DEFINE_integer("dpo_steps", _DPO.steps, "DPO steps.")
_DPO_PAIRS = flags.DEFINE_integer("dpo_pairs_per_step", _DPO.pairs_per_step, "DPO pairs/step.")
_DPO_LR = flags.DEFINE_float("dpo_learning_rate", _DPO.learning_rate, "DPO learning rate.")
_DPO_BETA = flags.DEFINE_float("dpo_beta", _DPO.beta, "DPO β.")
_RULES = long2short.PairRules()
_DPO_WRONG = flags.DEFINE_enum(
    "dpo_wrong",
    _RULES.wrong,
    list(long2short.WRONG_RULES),
    "DPO: the wrong responses rejected: longer (than the chosen; the paper), all, or none.",
)
_DPO_RATIO = flags.DEFINE_float(
    "dpo_length_ratio",
    _RULES.length_ratio,
    "DPO: correct responses this many times longer than the shortest are rejected (0: none).",
)
_PRESET = long2short.RlPreset()
_L2S_W = flags.DEFINE_float(
    "l2s_length_weight", _PRESET.length_weight, "Long2short RL: length-reward weight."
)
_L2S_WARM = flags.DEFINE_integer(
    "l2s_length_warmup", _PRESET.length_warmup, "Long2short RL: iterations without it."
)
_L2S_MAXLEN = flags.DEFINE_integer(
    "l2s_max_length", _PRESET.max_length, "Long2short RL: maximum rollout length."
)
_L2S_ITERS = flags.DEFINE_integer("l2s_iterations", 8, "Long2short RL: iterations.")
_SHORT_STEPS = flags.DEFINE_integer("short_sft_steps", 300, "Short model: SFT steps.")
_SHORT_MAXLEN = flags.DEFINE_integer(
    "short_max_length", 32, "Short model: response tokens of its SFT rows (short traces fit)."
)


def dpo_config() -> long2short.DpoConfig:
    return long2short.DpoConfig(
        steps=_DPO_STEPS.value,
        pairs_per_step=_DPO_PAIRS.value,
        learning_rate=_DPO_LR.value,
        beta=_DPO_BETA.value,
    )


def pair_rules() -> long2short.PairRules:
    return long2short.PairRules(wrong=_DPO_WRONG.value, length_ratio=_DPO_RATIO.value)


def rl_config(cfg: RunConfig) -> RunConfig:
    """Returns the long2short RL run of `cfg`: the preset, its iterations, in <out>/rl."""
    preset = long2short.RlPreset(
        length_weight=_L2S_W.value, length_warmup=_L2S_WARM.value, max_length=_L2S_MAXLEN.value
    )
    r = dataclasses.replace
    cfg = r(
        cfg,
        out_dir=os.path.join(cfg.out_dir, "rl"),
        rl=r(cfg.rl, iterations=_L2S_ITERS.value, eval_every=0),
    )
    return long2short.rl_preset(cfg, preset)


def short_config(cfg: RunConfig) -> RunConfig:
    """Returns the short model's run: SFT on the short traces only, in <out>/short."""
    r = dataclasses.replace
    n = _SHORT_MAXLEN.value
    return r(
        cfg,
        out_dir=os.path.join(cfg.out_dir, "short"),
        task=r(cfg.task, short_fraction=1.0),
        sft=r(cfg.sft, steps=_SHORT_STEPS.value),
        partial=r(cfg.partial, max_length=n, budget=min(n, cfg.partial.budget)),
    )


def model_once(setup: run_setup.Setup, path: str, compute: Callable[[], decoder.Params]):
    """Returns the params of the model directory `path`; computes and writes it if absent."""
    if os.path.exists(os.path.join(path, "config.json")):
        return convert.load_hf(path, dtype=setup.model_cfg.dtype)[1]
    params = compute()
    convert.save_hf(setup.model_cfg, params, path, tokenizer=setup.tok)
    return params


def start_engine(cfg: RunConfig, model_dir: str, stack: contextlib.ExitStack):
    """Returns a vLLM engine on `model_dir`, closed with `stack`."""
    vcfg = run_config.engine_config(cfg)
    vcfg = dataclasses.replace(
        vcfg, publish_dir=os.path.join(vcfg.publish_dir, f"l2s-{os.getpid()}")
    )
    engine = engines.VllmEngine(model_dir, vcfg)
    stack.callback(engine.close)
    return engine


def samples(setup: run_setup.Setup, engine, params, out_dir: str) -> list:
    """Returns the long model's scored samples of the first `--rs_problems` RL problems
    (`--rs_samples` each, the run's temperature and maximum length), cached in samples.json."""
    problems = setup.problems.train[: _RS_PROBLEMS.value]

    def compute():
        engine.load_weights(params)
        groups = long2short.sample(
            setup,
            engine,
            problems,
            n=_RS_N.value,
            max_tokens=setup.cfg.partial.max_length,
            temperature=setup.cfg.rl.temperature,
            seed=setup.cfg.seed + 3,
        )
        return long2short.groups_to_json(groups)

    return long2short.groups_from_json(
        atomic.json_once(os.path.join(out_dir, "samples.json"), compute)
    )


def shortest_rejection(setup, engine, params, out_dir: str, info: dict) -> decoder.Params:
    """SFT of `params` on the shortest correct of `--rs_samples` samples per prompt."""
    groups = samples(setup, engine, params, out_dir)
    chosen, skipped = long2short.shortest_correct(groups)
    problems = setup.problems.train[: len(groups)]
    traces = long2short.sft_traces(setup, problems, chosen)
    sub = os.path.join(out_dir, "shortest")
    long2short.write_sft_jsonl(os.path.join(sub, "sft.jsonl"), problems, chosen, traces)
    info["shortest"] = {
        "prompts": len(groups),
        "kept": len(chosen),
        "skipped_no_correct": skipped,
        "mean_chosen_tokens": sum(len(s.token_ids) for s in chosen) / max(len(chosen), 1),
    }
    print(
        f"shortest rejection: {len(chosen)} of {len(groups)} prompts kept, {skipped} skipped "
        f"(no correct sample); SFT set {os.path.join(sub, 'sft.jsonl')}"
    )
    r = dataclasses.replace
    cfg = setup.cfg
    rs_setup = r(
        setup,
        cfg=r(cfg, out_dir=sub, sft=r(cfg.sft, steps=_RS_STEPS.value, learning_rate=_RS_LR.value)),
        params=params,
        problems=r(setup.problems, sft_traces=traces),
    )
    return model_once(
        setup, os.path.join(sub, "model"), lambda: warmup.run_sft(rs_setup, progress_bar)[0]
    )


def dpo(setup, engine, params, out_dir: str, info: dict) -> decoder.Params:
    """DPO of `params` against itself frozen, on pairs from the same samples."""
    groups = samples(setup, engine, params, out_dir)
    pairs = long2short.preference_pairs(groups, pair_rules())
    cfg = dpo_config()
    info["dpo"] = {"pairs": len(pairs), "prompts_with_pairs": len({p.prompt_index for p in pairs})}
    print(f"DPO: {len(pairs)} pairs from {info['dpo']['prompts_with_pairs']} prompts")

    def compute():
        new, history = long2short.train_dpo(setup, params, pairs, cfg, seed=setup.cfg.seed)
        if history:
            info["dpo"]["last_step"] = history[-1]
            last = history[-1]
            print(
                f"DPO done: {len(history)} steps, loss {last['loss']:.3f}, margin "
                f"{last['margin_mean']:.3f}, accuracy {last['accuracy']:.2f}"
            )
        return new

    return model_once(setup, os.path.join(out_dir, "dpo", "model"), compute)


def long2short_rl(cfg: RunConfig, engine, params, info: dict) -> decoder.Params:
    """The RL loop from `params` with the long2short preset (`rl_config`)."""
    rl_cfg = rl_config(cfg)
    run_config.check_out_dir(rl_cfg)
    setup = loop.prepare(rl_cfg)

    def compute():
        engine.load_weights(params)
        new, history = loop.run_rl(setup, engine, params, progress_bar, print)
        keys = ("iteration", "reward", "accuracy", "response_length", "truncated")
        info["rl"] = [{k: m[k] for k in keys if k in m} for m in history]
        return new

    return model_once(setup, os.path.join(rl_cfg.out_dir, "model"), compute)


def short_model(cfg: RunConfig) -> tuple[run_setup.Setup, decoder.Params]:
    """The short model: the run's SFT phase on the built-in task's short traces only."""
    short_cfg = short_config(cfg)
    run_config.check_out_dir(short_cfg)
    setup = loop.prepare(short_cfg)
    path = os.path.join(short_cfg.out_dir, "model")
    return setup, model_once(setup, path, lambda: warmup.run_sft(setup, progress_bar)[0])


def report(cfg: RunConfig) -> dict:
    """Builds every model, evaluates each on the held-out set, writes the report files."""
    r = dataclasses.replace
    long_cfg = r(cfg, out_dir=os.path.join(cfg.out_dir, "long"))
    run_config.check_out_dir(long_cfg)
    setup = loop.prepare(long_cfg)
    long_dir = os.path.join(long_cfg.out_dir, "model")
    long_params = model_once(setup, long_dir, lambda: warmup.run_sft(setup, progress_bar)[0])
    _, short_params = short_model(cfg)
    info: dict = {}
    results = {}
    long_share = 100 * (1 - cfg.task.short_fraction)
    with contextlib.ExitStack() as stack:
        engine = start_engine(long_cfg, long_dir, stack)
        models = {
            f"long (SFT, {long_share:.0f}% long traces)": lambda: long_params,
            "short (SFT, short traces)": lambda: short_params,
            f"merge ({_MERGE_W.value:g} long)": lambda: model_once(
                setup,
                os.path.join(cfg.out_dir, "merge", "model"),
                lambda: long2short.merge_params(long_params, short_params, weight_a=_MERGE_W.value),
            ),
            "shortest rejection + SFT": lambda: shortest_rejection(
                setup, engine, long_params, cfg.out_dir, info
            ),
            "DPO": lambda: dpo(setup, engine, long_params, cfg.out_dir, info),
            "long2short RL": lambda: long2short_rl(cfg, engine, long_params, info),
        }
        for i, (name, build) in enumerate(models.items()):
            params = build()
            path = os.path.join(cfg.out_dir, f"eval_{i}.json")

            def evaluate(params=params):
                engine.load_weights(params)
                return run_setup.evaluate(setup, engine)

            results[name] = atomic.json_once(path, evaluate)
            res = results[name]
            print(
                f"{name}: pass@1 {res['pass_at_1']:.3f} [{res['ci95'][0]:.3f}, "
                f"{res['ci95'][1]:.3f}], mean tokens {res['mean_length']:.1f}"
            )
    rows = long2short.efficiency_rows(results)
    header = (
        f"## long2short on the built-in task: {setup.cfg.eval.problems} held-out problems x "
        f"{setup.cfg.eval.samples} samples, temperature {setup.cfg.eval.temperature}, "
        f"max {setup.cfg.partial.max_length} tokens"
    )
    table = long2short.markdown(rows, header=header)
    png = long2short.plot(rows, os.path.join(cfg.out_dir, "long2short.png"))
    atomic.write_json(
        os.path.join(cfg.out_dir, "results.json"),
        {"rows": rows, "info": info, "config": run_config.as_json(cfg), "flags": flag_values()},
    )
    atomic.write_text(os.path.join(cfg.out_dir, "report.md"), table)
    print(table)
    print(f"plot: {png}")
    return {"rows": rows, "info": info}


def flag_values() -> dict:
    """Returns this script's own flags (the long2short settings) for results.json."""
    return {f.name: f.value for f in flags.FLAGS.get_flags_for_module(__name__)}


def single(cfg: RunConfig, method: str) -> str:
    """Runs one method from `--model` (or, for "short", the built-in task); returns its path."""
    if method == "merge":
        if not (_LONG.value and _SHORT_MODEL.value):
            raise app.UsageError("--method=merge needs --long_model and --short_model")
        out = os.path.join(cfg.out_dir, "merge", "model")
        return long2short.merge_checkpoints(
            _LONG.value, _SHORT_MODEL.value, out, weight_a=_MERGE_W.value
        )
    if method == "short":
        short_model(cfg)
        return os.path.join(short_config(cfg).out_dir, "model")
    if cfg.model_dir is None:
        raise app.UsageError(f"--method={method} needs --model (the long model's directory)")
    run_config.check_out_dir(cfg)
    setup = loop.prepare(cfg)
    params = convert.load_hf(cfg.model_dir, dtype=setup.model_cfg.dtype)[1]
    with contextlib.ExitStack() as stack:
        engine = start_engine(cfg, cfg.model_dir, stack)
        if method == "shortest":
            shortest_rejection(setup, engine, params, cfg.out_dir, {})
        elif method == "dpo":
            dpo(setup, engine, params, cfg.out_dir, {})
        else:
            long2short_rl(cfg, engine, params, {})
    return os.path.join(cfg.out_dir, method, "model")


def main(argv):
    try:
        cfg = run_flags.config_from_argv(argv)
        dpo_config(), pair_rules(), sft.SftConfig(steps=_RS_STEPS.value)  # refuse bad flags early
        rl_config(cfg), short_config(cfg)
    except ValueError as e:
        run_flags.fail(e)
    try:
        if _METHOD.value == "report":
            report(cfg)
        else:
            print(f"model: {single(cfg, _METHOD.value)}")
    except (*run_flags.USER_ERRORS, long2short.MergeError) as e:
        run_flags.fail(e)


if __name__ == "__main__":
    app.run(main)
