"""Rollout benchmarks, each measured side by side in one run and reported as ratios.

  python -m experiments.benchmarks.rollout_bench     # all three, built-in tiny model, CPU
  python -m experiments.benchmarks.rollout_bench --which=reload --repeats=7

- reload:  time per weight update, in-place `reload_weights` vs restarting the engine.
- partial: partial rollouts vs generating every sample to completion on a long-tail length
           workload (same prompts, same lengths): wall time per iteration, tokens/s and the
           idle fraction of the engine's sequence slots.
- sampler: vLLM vs the plain JAX sampler, tokens/s at equal batch and length.

Every number is the median over --repeats runs; a table of ratios is printed at the end and
written as JSON to --out.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

from absl import app, flags, logging

_WHICH = flags.DEFINE_list("which", ["reload", "partial", "sampler"], "Benchmarks to run.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Runs per measurement (the median is reported).")
_OUT = flags.DEFINE_string("out", "runs/bench.json", "Where to write the results.")
_HIDDEN = flags.DEFINE_integer("hidden_size", 256, "Hidden size of the benchmark model.")
_LAYERS = flags.DEFINE_integer("layers", 4, "Layers of the benchmark model.")


def _model(tmp):
    import jax

    from k15jax.model import convert, decoder, tokenizer
    from k15jax.model.config import ModelConfig

    tok = tokenizer.builtin()
    h = _HIDDEN.value
    cfg = ModelConfig(
        hidden_size=h,
        intermediate_size=3 * h,
        num_hidden_layers=_LAYERS.value,
        num_attention_heads=h // 32,
        num_key_value_heads=max(1, h // 64),
        head_dim=32,
        attention_bias=True,
        eos_token_id=tok.eos_id,
        max_position_embeddings=4096,
    )
    params = decoder.init(cfg, jax.random.key(0))
    path = convert.save_hf(cfg, params, os.path.join(tmp, "model"), tokenizer=tok)
    return cfg, params, path, tok


def bench_reload(engine, cfg, params) -> dict:
    import jax

    from k15jax.model import decoder

    new = [decoder.init(cfg, jax.random.key(i + 1)) for i in range(_REPEATS.value)]
    jax.block_until_ready(new)
    inplace, restart = [], []
    for p in new:
        t0 = time.perf_counter()
        engine.load_weights(p)
        inplace.append(time.perf_counter() - t0)
    for p in new[: max(3, _REPEATS.value // 2)]:
        t0 = time.perf_counter()
        engine.restart(p)
        restart.append(time.perf_counter() - t0)
    engine.load_weights(params)
    a, b = statistics.median(inplace), statistics.median(restart)
    return {"inplace_s": a, "restart_s": b, "restart_over_inplace": b / a}


def _long_tail_lengths(n, seed, *, short=48, long=768, frac_long=0.1):
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(short // 2, short * 2, n)
    tail = rng.random(n) < frac_long
    lengths[tail] = rng.integers(long // 2, long, tail.sum())
    return lengths.tolist()


def bench_partial(engine, tok) -> dict:
    """Same prompts and target lengths; full = each iteration waits for its longest sample."""
    import numpy as np

    from k15jax.rollout import engines

    iters, per_iter, budget = 6, 64, 128
    work = [
        (tok.encode(f"Q:{i}+{i}\n"), n)
        for i, n in enumerate(_long_tail_lengths(iters * per_iter, 0))
    ]
    spec = engines.SamplingSpec(temperature=1.0, max_tokens=1, ignore_eos=True)

    def full():
        times, tokens, slots = [], 0, 0
        for it in range(iters):
            batch = work[it * per_iter : (it + 1) * per_iter]
            t0 = time.perf_counter()
            out = engine.generate([p for p, _ in batch], spec, max_tokens=[n for _, n in batch])
            times.append(time.perf_counter() - t0)
            got = sum(len(c.token_ids) for c in out)
            tokens += got
            slots += len(batch) * max(n for _, n in batch)
        return times, tokens, slots

    def partial_rollouts():
        times, tokens, slots = [], 0, 0
        pending = []  # (prompt, generated, target)
        queue = list(work)
        it = 0
        while (queue or pending) and it < 10 * iters:
            new = queue[:per_iter]
            queue = queue[per_iter:]
            reqs = pending + [(p, [], n) for p, n in new]
            caps = [min(budget, n - len(g)) for _, g, n in reqs]
            t0 = time.perf_counter()
            out = engine.generate([p + g for p, g, _ in reqs], spec, max_tokens=caps)
            times.append(time.perf_counter() - t0)
            pending = []
            for (p, g, n), c in zip(reqs, out, strict=True):
                g = g + c.token_ids
                tokens += len(c.token_ids)
                if len(g) < n:
                    pending.append((p, g, n))
            slots += len(reqs) * max(caps)
            it += 1
        return times, tokens, slots

    res = {}
    for name, fn in (("full", full), ("partial", partial_rollouts)):
        walls, rates, idles, per_iters = [], [], [], []
        for _ in range(_REPEATS.value):
            times, tokens, slots = fn()
            walls.append(sum(times))
            per_iters.append(float(np.mean(times)))
            rates.append(tokens / sum(times))
            idles.append(1 - tokens / slots)
        res[name] = {
            "wall_s": statistics.median(walls),
            "tokens_per_s": statistics.median(rates),
            "seconds_per_iteration": statistics.median(per_iters),
            "idle_slot_fraction": statistics.median(idles),
        }
    res["throughput_partial_over_full"] = (
        res["partial"]["tokens_per_s"] / res["full"]["tokens_per_s"]
    )
    res["iteration_time_full_over_partial"] = (
        res["full"]["seconds_per_iteration"] / res["partial"]["seconds_per_iteration"]
    )
    return res


def bench_sampler(engine, cfg, params, tok) -> dict:
    from k15jax.model import generation
    from k15jax.rollout import engines

    batch, new = 32, 64
    prompts = [tok.encode(f"Q:{i}+7\n") for i in range(batch)]
    spec = engines.SamplingSpec(temperature=1.0, max_tokens=new, ignore_eos=True, seed=0)
    import jax

    generation.generate(
        cfg, params, prompts, max_new_tokens=new, eos_id=-1, temperature=1.0, key=jax.random.key(0)
    )  # compile once, outside the timing
    vllm_rates, jax_rates = [], []
    for r in range(_REPEATS.value):
        t0 = time.perf_counter()
        out = engine.generate(prompts, spec)
        vllm_rates.append(sum(len(c.token_ids) for c in out) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        s = generation.generate(
            cfg,
            params,
            prompts,
            max_new_tokens=new,
            eos_id=-1,
            temperature=1.0,
            key=jax.random.key(r),
        )
        jax_rates.append(int(s.lengths.sum()) / (time.perf_counter() - t0))
    a, b = statistics.median(vllm_rates), statistics.median(jax_rates)
    return {
        "batch": batch,
        "new_tokens": new,
        "vllm_tokens_per_s": a,
        "jax_tokens_per_s": b,
        "vllm_over_jax": a / b,
    }


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from k15jax.rollout import engines

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg, params, path, tok = _model(tmp)
        engine = engines.VllmEngine(
            path,
            engines.VllmConfig(
                max_model_len=1024,
                publish_dir=os.path.join(tmp, "publish"),
                enable_prefix_caching=True,
            ),
        )
        try:
            if "reload" in _WHICH.value:
                results["reload"] = bench_reload(engine, cfg, params)
            if "partial" in _WHICH.value:
                results["partial"] = bench_partial(engine, tok)
            if "sampler" in _WHICH.value:
                results["sampler"] = bench_sampler(engine, cfg, params, tok)
        finally:
            engine.close()
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nmedians of {_REPEATS.value} runs ({_HIDDEN.value}x{_LAYERS.value} model, CPU)")
    print(f"{'benchmark':<52}{'value':>14}")
    if "reload" in results:
        r = results["reload"]
        print(f"{'weight update, in-place reload (s)':<52}{r['inplace_s']:>14.3f}")
        print(f"{'weight update, engine restart (s)':<52}{r['restart_s']:>14.3f}")
        print(f"{'  ratio restart / in-place':<52}{r['restart_over_inplace']:>14.1f}")
    if "partial" in results:
        r = results["partial"]
        for mode in ("full", "partial"):
            m = r[mode]
            print(f"{mode + ' rollouts: s per iteration':<52}{m['seconds_per_iteration']:>14.2f}")
            print(f"{mode + ' rollouts: tokens/s':<52}{m['tokens_per_s']:>14.0f}")
            print(f"{mode + ' rollouts: idle slot fraction':<52}{m['idle_slot_fraction']:>14.2f}")
        print(f"{'  ratio tokens/s partial / full':<52}{r['throughput_partial_over_full']:>14.2f}")
        print(
            f"{'  ratio s per iteration full / partial':<52}"
            f"{r['iteration_time_full_over_partial']:>14.2f}"
        )
    if "sampler" in results:
        r = results["sampler"]
        print(f"{'vLLM tokens/s (batch 32 x 64 new)':<52}{r['vllm_tokens_per_s']:>14.0f}")
        print(f"{'JAX sampler tokens/s (same)':<52}{r['jax_tokens_per_s']:>14.0f}")
        print(f"{'  ratio vLLM / JAX':<52}{r['vllm_over_jax']:>14.1f}")


if __name__ == "__main__":
    app.run(main)
