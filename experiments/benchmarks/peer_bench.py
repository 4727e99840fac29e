"""k15jax's RL iteration next to TRL's GRPOTrainer on the same work, in one command.

  python -m experiments.benchmarks.peer_bench --model=runs/default/sft_model  # both, 6 iterations
  python -m experiments.benchmarks.peer_bench --model=... --which=k15jax --iterations=8

The same start model (a Hugging Face directory, e.g. the default run's `sft_model`), the same
RL prompts (the run's pool, drawn `--prompts_per_iteration` at a time), `--samples_per_prompt`
samples of at most `--max_length` new tokens at temperature 1, AdamW at `--learning_rate`, and
the same scorer (`scoring.Scorer`: the task's checker, penalties as in the run). k15jax runs
`loop.rl_iteration` with vLLM rollouts, its optimizer steps of `--groups_per_step` groups;
TRL 1.16 runs `GRPOTrainer` with transformers generation on CPU, `dr_grpo` loss, β = 0 and the
same rows per optimizer step (`pip install '.[peer]'`). Each prints s/iteration, generation
tokens/s and end-to-end tokens/s (generated tokens / iteration time), medians over the
iterations after the first (compilation, warm-up); then the ratio k15jax / TRL. k15jax's budget
defaults to `--max_length`, so that every sample ends in its iteration, as in TRL.

Timings on a shared machine are inflated by its load: compare only numbers from one run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time

from absl import app, flags, logging

_MODEL = flags.DEFINE_string("model", None, "Start model: a Hugging Face directory.", required=True)
_WHICH = flags.DEFINE_list("which", ["k15jax", "trl"], "Frameworks to run, in this order.")
_ITERS = flags.DEFINE_integer("iterations", 6, "RL iterations each (the first is a warm-up).")
_PROMPTS = flags.DEFINE_integer("prompts_per_iteration", 32, "Prompts per iteration.")
_K = flags.DEFINE_integer("samples_per_prompt", 8, "Samples per prompt.")
_GROUPS = flags.DEFINE_integer("groups_per_step", 16, "Prompts per optimizer step.")
_MAXLEN = flags.DEFINE_integer("max_length", 256, "Most new tokens per sample.")
_BUDGET = flags.DEFINE_integer(
    "budget", None, "k15jax partial-rollout budget (default: max_length)."
)
_LR = flags.DEFINE_float("learning_rate", 1e-4, "AdamW learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of both runs.")
_OUT = flags.DEFINE_string("out", "runs/peer_bench.json", "Where to write the results as JSON.")


def _config(out_dir: str):
    from k15jax.rollout import partial
    from k15jax.run import run_config

    d = run_config.RunConfig()
    r = dataclasses.replace
    return r(
        d,
        out_dir=out_dir,
        seed=_SEED.value,
        model_dir=_MODEL.value,
        sft=r(d.sft, steps=0),
        rl=r(
            d.rl,
            prompts_per_iteration=_PROMPTS.value,
            samples_per_prompt=_K.value,
            groups_per_step=_GROUPS.value,
            learning_rate=_LR.value,
            iterations=_ITERS.value,
        ),
        partial=partial.PartialConfig(
            budget=_BUDGET.value or _MAXLEN.value, max_length=_MAXLEN.value
        ),
    )


class _Counting:
    """An engine that counts the tokens it generates and the seconds it takes."""

    def __init__(self, engine):
        self.engine, self.tokens, self.seconds = engine, 0, 0.0

    def generate(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.engine.generate(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.tokens += sum(len(c.token_ids) for c in out)
        return out

    def load_weights(self, params):
        self.engine.load_weights(params)

    def sleep(self):
        self.engine.sleep()

    def take_metrics(self):
        return self.engine.take_metrics()


def run_k15jax(tmp: str) -> list[dict]:
    """Returns per-iteration {seconds, tokens, generate_seconds} of k15jax's RL loop."""
    import numpy as np

    from k15jax.data import sampler
    from k15jax.rollout import engines, partial
    from k15jax.run import loop, run_config, run_setup, run_state
    from k15jax.train import train_step

    cfg = _config(tmp)
    setup = run_setup.prepare(cfg)
    rl = cfg.rl
    vcfg = dataclasses.replace(run_config.engine_config(cfg), publish_dir=tmp)
    engine = _Counting(engines.VllmEngine(cfg.model_dir, vcfg))
    optimizer = train_step.make_optimizer(rl.learning_rate, max_grad_norm=rl.max_grad_norm)
    step_cfg = train_step.StepConfig(
        tau=rl.tau, group_size=rl.samples_per_prompt, micro_batches=rl.micro_batches
    )
    trainer = train_step.make_trainer(setup.model_cfg, optimizer, step_cfg, setup.mesh)
    pool = setup.problems.train
    state = run_state.RlState(
        train=train_step.init_state(setup.params, setup.model_cfg, optimizer, setup.mesh),
        sampler=sampler.init_state(np.full(len(pool), 0.5), seed=cfg.seed),
        buffer=partial.ReplayBuffer(),
        history=(),
        train_ids=tuple(p.id for p in pool),
    )
    out = []
    try:
        for it in range(rl.iterations):
            tokens, gen = engine.tokens, engine.seconds
            t0 = time.perf_counter()
            state, m = loop.rl_iteration(setup, engine, trainer, state, pool, it)
            seconds = time.perf_counter() - t0
            state = dataclasses.replace(state, history=(*state.history, m))
            out.append(
                {
                    "seconds": seconds,
                    "tokens": engine.tokens - tokens,
                    "generate_seconds": engine.seconds - gen,
                    "accuracy": m.get("accuracy"),
                    **{k: v for k, v in m.items() if k.startswith("seconds_")},
                }
            )
            print(f"k15jax it {it}: {seconds:.1f}s {out[-1]}", flush=True)
    finally:
        engine.engine.close()
    return out


def run_trl(tmp: str) -> list[dict]:
    """Returns per-iteration {seconds, tokens, generate_seconds} of TRL's GRPOTrainer."""
    import torch
    import transformers
    import trl
    from datasets import Dataset

    from k15jax.run import run_setup

    cfg = _config(tmp)
    setup = run_setup.prepare(cfg)
    pool = setup.problems.train
    template = cfg.task.prompt_template
    data = Dataset.from_dict(
        {
            "prompt": [template.format(prompt=p.prompt) for p in pool],
            "index": list(range(len(pool))),
        }
    )
    tok = transformers.AutoTokenizer.from_pretrained(cfg.model_dir)
    eos = setup.tok.eos_id

    def reward(prompts, completions, completion_ids, index, **_):
        out = []
        for ids, i in zip(completion_ids, index, strict=True):
            ended = bool(ids) and ids[-1] == eos
            r, _, _ = setup.scorer(
                pool[i], ids[:-1] if ended else ids, "stop" if ended else "length"
            )
            out.append(r)
        return out

    rows = _GROUPS.value * _K.value
    per_iteration = _PROMPTS.value * _K.value
    args = trl.GRPOConfig(
        output_dir=tmp,
        use_cpu=True,
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=1,
        num_generations=_K.value,
        generation_batch_size=per_iteration,
        max_completion_length=_MAXLEN.value,
        temperature=1.0,
        learning_rate=_LR.value,
        lr_scheduler_type="constant",
        adam_beta2=0.95,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="dr_grpo",
        num_iterations=1,
        max_steps=_ITERS.value * per_iteration // rows,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=_SEED.value,
        bf16=False,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype=torch.float32)
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok
    )
    counts = {"tokens": 0, "seconds": 0.0}
    generate = trainer._generate_single_turn  # timed where TRL calls transformers' generate

    def timed(*a, **kw):
        t0 = time.perf_counter()
        ids, logprobs = generate(*a, **kw)
        counts["seconds"] += time.perf_counter() - t0
        counts["tokens"] += sum(len(c) for c in ids)
        return ids, logprobs

    trainer._generate_single_turn = timed
    marks = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *_, **__):
            marks.append((time.perf_counter(), counts["tokens"], counts["seconds"]))

    trainer.add_callback(Clock())
    start = (time.perf_counter(), 0, 0.0)
    trainer.train()
    steps = per_iteration // rows  # optimizer steps per generation round: one iteration
    ends = [start] + marks[steps - 1 :: steps]
    out = []
    for it, (a, b) in enumerate(zip(ends, ends[1:])):
        out.append({"seconds": b[0] - a[0], "tokens": b[1] - a[1], "generate_seconds": b[2] - a[2]})
        print(f"trl it {it}: {out[-1]}", flush=True)
    return out


def summary(iterations: list[dict]) -> dict:
    """Returns medians over the iterations after the first (the warm-up)."""
    its = iterations[1:] or iterations
    med = lambda f: statistics.median(f(m) for m in its)
    return {
        "s_per_iteration": med(lambda m: m["seconds"]),
        "generation_tokens_per_s": med(lambda m: m["tokens"] / m["generate_seconds"]),
        "end_to_end_tokens_per_s": med(lambda m: m["tokens"] / m["seconds"]),
        "iterations": len(its),
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    runners = {"k15jax": run_k15jax, "trl": run_trl}
    if unknown := [w for w in _WHICH.value if w not in runners]:
        raise app.UsageError(f"--which: {unknown} not in {sorted(runners)}")
    if _ITERS.value < 2:
        raise app.UsageError(f"--iterations={_ITERS.value} must be >= 2 (one is a warm-up)")
    results = {}
    for name in _WHICH.value:
        with tempfile.TemporaryDirectory(prefix=f"peer-{name}-") as tmp:
            per_it = runners[name](tmp)
        results[name] = {"summary": summary(per_it), "iterations": per_it}
    print("| framework | s/iteration | generation tok/s | end-to-end tok/s |")
    print("|---|---|---|---|")
    for name, r in results.items():
        s = r["summary"]
        print(
            f"| {name} | {s['s_per_iteration']:.2f} | {s['generation_tokens_per_s']:.0f} | "
            f"{s['end_to_end_tokens_per_s']:.0f} |"
        )
    if {"k15jax", "trl"} <= results.keys():
        ratio = (
            results["k15jax"]["summary"]["s_per_iteration"]
            / results["trl"]["summary"]["s_per_iteration"]
        )
        results["ratio_s_per_iteration_k15jax_over_trl"] = ratio
        print(f"k15jax / TRL time per iteration: {ratio:.2f}x")
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
