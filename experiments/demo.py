"""The built-in demo that `make run` executes: model, conversion and the real vLLM engine.

  python -m experiments.demo [--out=runs/demo]

It builds the built-in tokenizer and a tiny Qwen2-shaped model, converts it to a Hugging Face
directory and to orbax and back (checking both round trips bit for bit), starts vLLM on the
converted directory, checks that vLLM's greedy continuations equal the JAX sampler's token for
token, reloads new weights into vLLM in place and checks again. Expected: every check "ok".
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging

_OUT = flags.DEFINE_string("out", "runs/demo", "Directory for the converted checkpoints.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random model.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    import numpy as np

    from k15jax import convert, generation, model, rollout, tokenizer
    from k15jax.config import ModelConfig

    t_start = time.perf_counter()
    out = os.path.abspath(_OUT.value)
    tok = tokenizer.builtin()
    cfg = ModelConfig(attention_bias=True, bos_token_id=1, eos_token_id=tok.eos_id, pad_token_id=0)

    def sharp(key):  # scaled matrices give a random model clear greedy winners
        return jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, model.init(cfg, key))

    params = sharp(jax.random.key(_SEED.value))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"model: {cfg.architecture}, {n_params:,} parameters, vocab {tok.vocab_size}")

    hf_dir = convert.save_hf(cfg, params, os.path.join(out, "hf"), tokenizer=tok)
    _, back = convert.load_hf(hf_dir)
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)))
    print(f"HF round trip bit-exact: {'ok' if same else 'FAILED'}  ({hf_dir})")
    orbax_dir = convert.save_orbax(cfg, params, os.path.join(out, "orbax"))
    _, back = convert.load_orbax(orbax_dir)
    same_o = all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back))
    )
    print(f"orbax round trip bit-exact: {'ok' if same_o else 'FAILED'}  ({orbax_dir})")

    prompts = [tok.encode(s) for s in ("12+34=", "7*8=", "(3+4)*5=", "hello")]
    spec = rollout.SamplingSpec(temperature=0.0, max_tokens=24)
    engine = rollout.VllmEngine(
        hf_dir, rollout.VllmConfig(max_model_len=256, publish_dir=os.path.join(out, "publish"))
    )
    checks = [same, same_o]
    for label, p in (
        ("initial weights", params),
        ("after in-place reload", sharp(jax.random.key(1))),
    ):
        if p is not params:
            t0 = time.perf_counter()
            engine.load_weights(p)
            print(f"in-place reload took {time.perf_counter() - t0:.3f}s")
        got = [c.token_ids for c in engine.generate(prompts, spec)]
        want = generation.generate(
            cfg, p, prompts, max_new_tokens=24, eos_id=tok.eos_id
        ).sequences()
        ok = got == want
        checks.append(ok)
        print(f"vLLM greedy == JAX greedy ({label}): {'ok' if ok else 'FAILED'}")
        print(f"  e.g. {tok.decode(prompts[0])!r} -> {tok.decode(got[0])!r}")
    engine.close()
    print(
        f"demo finished in {time.perf_counter() - t_start:.1f}s: "
        f"{sum(checks)}/{len(checks)} checks ok"
    )
    if not all(checks):
        raise SystemExit(1)


if __name__ == "__main__":
    app.run(main)
