"""Weight hand-off cost: publish + reload time against model size, in-process engine vs server.

  python -m experiments.benchmarks.handoff_bench     # tiny, 0.5B and 1.5B shapes (CPU)
  python -m experiments.benchmarks.handoff_bench --sizes=tiny --repeats=5

For each model shape (random weights: nothing is downloaded) and each engine — the in-process
`rollout.VllmEngine` and a `servers.ServerPool` over one `vllm serve` process on loopback — it
times what one RL iteration pays to hand the trainer's weights to the engine: `publish` (params
to a Hugging Face directory in host shared memory, `--publish_dir`) and `reload` (the engine
loading them in place; for the server also the version report and prefix-cache reset). Medians
over --repeats; a table on stdout and JSON in --out. Each measurement runs in its own process,
one after the other, so host memory holds one engine's copy of the weights at a time.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time

from absl import app, flags

from k15jax.infra import atomic
from k15jax.model import config, tokenizer
from k15jax.run import run_config

_OUT = flags.DEFINE_string("out", "runs/handoff_bench.json", "Where to write the results.")
_SIZES = flags.DEFINE_list("sizes", ["tiny", "0.5b", "1.5b"], "Model shapes: tiny, 0.5b, 1.5b.")
_ENGINES = flags.DEFINE_list("engines", ["in_process", "server"], "in_process, server.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed hand-offs per engine (after one warm-up).")
_PUBLISH = flags.DEFINE_string("publish_dir", "/dev/shm/k15jax-handoff", "Published weights.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", config.DTYPES, "Weights and engine dtype.")


def model_config(size: str) -> config.ModelConfig:
    """Returns the model shape `size` names, in --dtype."""
    vocab = tokenizer.builtin().vocab_size
    if size == "tiny":
        return dataclasses.replace(
            run_config.RunConfig().model, vocab_size=vocab, dtype=_DTYPE.value
        )
    shape = {"0.5b": config.qwen25_05b, "1.5b": config.qwen25_15b}[size]
    return shape(dtype=_DTYPE.value, max_position_embeddings=4096)


def _engine(kind: str, model_dir: str, publish_dir: str):
    from k15jax.rollout import engines, servers

    vcfg = engines.VllmConfig(
        dtype=_DTYPE.value,
        max_model_len=256,
        kv_cache_memory_bytes=64 << 20,
        publish_dir=publish_dir,
    )
    if kind == "in_process":
        return engines.VllmEngine(model_dir, vcfg)
    return servers.ServerPool(model_dir, vcfg, servers.ServerPoolConfig(launch=1))


def measure(size: str, kind: str, repeats: int) -> dict:
    """Returns median publish and reload seconds of one engine kind at one model size."""
    import jax

    from k15jax.model import convert, decoder

    cfg = model_config(size)
    params = decoder.init(cfg, jax.random.key(0))
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    with tempfile.TemporaryDirectory(dir=_PUBLISH.value) as tmp:
        start = convert.save_hf(cfg, params, f"{tmp}/start", tokenizer=tokenizer.builtin())
        engine = _engine(kind, start, f"{tmp}/publish")
        try:
            publish, total = [], []
            for i in range(repeats + 1):
                params = jax.tree.map(lambda x: x * 0.999, params)  # a new version each time
                t0 = time.perf_counter()
                engine.publish(params)
                t1 = time.perf_counter()
                engine.load_weights(params)  # publishes again, then reloads
                t2 = time.perf_counter()
                if i:  # the first hand-off warms caches up
                    publish.append(t1 - t0)
                    total.append(t2 - t1)
        finally:
            engine.close()
    p = statistics.median(publish)
    return {
        "size": size,
        "engine": kind,
        "parameters": sum(x.size for x in jax.tree.leaves(params)),
        "bytes": n_bytes,
        "publish_s": p,
        "reload_s": statistics.median(total) - p,
        "handoff_s": statistics.median(total),
    }


def main(argv):
    del argv
    import os
    import subprocess
    import sys

    os.makedirs(_PUBLISH.value, exist_ok=True)
    pairs = [(size, kind) for size in _SIZES.value for kind in _ENGINES.value]
    if len(pairs) == 1:
        atomic.write_json(_OUT.value, {"rows": [measure(*pairs[0], _REPEATS.value)]})
        return
    rows = []
    print(
        f"| shape | parameters | MB ({_DTYPE.value}) | engine | publish s | reload s | hand-off s |"
    )
    print("|---|---|---|---|---|---|---|")
    for size, kind in pairs:
        # One process per measurement: an engine's memory is only surely freed with its process.
        out = os.path.join(_PUBLISH.value, f"{size}-{kind}.json")
        subprocess.run(
            [sys.executable, "-m", "experiments.benchmarks.handoff_bench", f"--sizes={size}",
             f"--engines={kind}", f"--repeats={_REPEATS.value}", f"--out={out}",
             f"--publish_dir={_PUBLISH.value}", f"--dtype={_DTYPE.value}"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        with open(out) as f:
            (r,) = json.load(f)["rows"]
        rows.append(r)
        print(
            f"| {size} | {r['parameters'] / 1e6:.1f}M | {r['bytes'] / 1e6:.0f} | {kind} | "
            f"{r['publish_s']:.2f} | {r['reload_s']:.2f} | {r['handoff_s']:.2f} |",
            flush=True,
        )
    atomic.write_json(_OUT.value, {"rows": rows, "time": time.time()})


if __name__ == "__main__":
    app.run(main)
