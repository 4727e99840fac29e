"""The trainer alone: one k1.5 optimizer step of k15jax's JAX step against a plain torch step.

  python -m experiments.benchmarks.step_bench                # the default run's step shape
  python -m experiments.benchmarks.step_bench --out=step.json --repeats=15

Both sides take the same Hugging Face model (the default run's 0.43M-parameter Qwen2 shape,
random weights saved by `convert.save_hf` and loaded by `transformers`), the same samples (the
default step: 16 groups x 8 samples in rows of 216 columns; prompt 12-24 tokens, response
lengths drawn around the default run's mean of ~130, fixed seed) and the same loss (the
mirror-descent loss of `losses.mirror_descent_loss`, τ = 0.1, group size 8, written again in
torch below), with AdamW behind global-norm clipping. Timed, medians over `--repeats` calls
after two warm-up calls, in one process:
  forward   the loss only (JAX: jitted loss; torch: under `no_grad`);
  fwd+bwd   the loss and its gradients (JAX: `value_and_grad`; torch: `backward`);
  step      a whole optimizer step (JAX: the run's `train_step.make_train_step`; torch: zero
            the grads, forward, backward, clip, `AdamW.step`);
  backward  fwd+bwd - forward.
The rows are the run's packed rows (`train.update.packed_batch`, first-fit by length) and the
same samples padded one a row; torch runs padded (its users' usual batch, as in TRL). The table
gives milliseconds and real (non-padding) tokens per second, and k15jax's time per real token
over torch's; the first line checks that both sides compute the same loss.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from k15jax.model import convert, decoder, sharding
from k15jax.run.run_config import RunConfig
from k15jax.train import losses, train_step, update

_REPEATS = flags.DEFINE_integer("repeats", 9, "Timed calls per measurement (after 2 warm-ups).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights, lengths and tokens.")
_OUT = flags.DEFINE_string("out", None, "Also write the results here as JSON.")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch threads; 0: torch's default.")

TAU, GROUP = 0.1, 8


def samples(cfg: RunConfig, seed: int) -> update.Samples:
    """Returns one default-sized step of samples: prompt + response tokens, masks, rewards."""
    rng = np.random.default_rng(seed)
    n = cfg.rl.groups_per_step * cfg.rl.samples_per_prompt
    cols = cfg.task.max_prompt_tokens + cfg.partial.max_length
    prompt = rng.integers(12, cfg.task.max_prompt_tokens + 1, n)
    response = np.clip(rng.normal(130, 35, n).astype(int), 8, cfg.partial.max_length)
    tokens = np.zeros((n, cols), np.int32)
    mask = np.zeros((n, cols), np.float32)
    for i, (p, q) in enumerate(zip(prompt, response)):
        tokens[i, : p + q] = rng.integers(3, cfg.model.vocab_size, p + q)
        mask[i, p : p + q] = 1.0
    seg = (tokens > 0).astype(np.int32)
    return update.Samples(
        tokens_bt=tokens,
        mask_bt=mask,
        segment_ids_bt=seg,
        engine_logp_bt=np.zeros_like(mask),
        current_mask_bt=mask,
        reward_b=rng.integers(0, 2, n).astype(np.float32),
    )


def padded_batch(s: update.Samples, ref: np.ndarray) -> train_step.Batch:
    """Returns the samples one a row (no packing), π_θi from `ref`."""
    return train_step.Batch(
        tokens_bt=s.tokens_bt,
        mask_bt=s.mask_bt,
        ref_logp_bt=ref,
        reward_b=s.reward_b,
        segment_ids_bt=s.segment_ids_bt,
        valid_b=np.ones(len(s.reward_b), np.float32),
    )


def _median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def jax_side(cfg: RunConfig, params, batch: train_step.Batch, repeats: int) -> dict:
    """Times k15jax's forward, fwd+bwd and whole step on `batch`; returns ms and the loss."""
    mcfg = cfg.model
    mesh = sharding.make_mesh()
    opt = train_step.make_optimizer(cfg.rl.learning_rate, max_grad_norm=cfg.rl.max_grad_norm)
    step_cfg = train_step.StepConfig(tau=TAU, group_size=GROUP)
    trainer = train_step.make_trainer(mcfg, opt, step_cfg, mesh)

    def loss(p, b):
        logp = train_step.sequence_logprobs(mcfg, p, b.tokens_bt, b.segment_ids_bt)
        return losses.mirror_descent_loss(
            logp, b.ref_logp_bt, b.mask_bt, b.reward_b, group_size=GROUP, tau=TAU,
            valid_b=b.valid_b, sample_bt=b.sample_bt,
        )[0]  # fmt: skip

    fwd, fwd_bwd = jax.jit(loss), jax.jit(jax.value_and_grad(loss))
    dev = trainer.put(batch)
    state = [train_step.init_state(params, mcfg, opt, mesh)]

    def one_step():
        state[0], m = trainer.step(state[0], dev)
        jax.block_until_ready(m)

    return {
        "loss": float(fwd(params, dev)),
        "forward_ms": _median_ms(lambda: jax.block_until_ready(fwd(params, dev)), repeats),
        "fwd_bwd_ms": _median_ms(lambda: jax.block_until_ready(fwd_bwd(params, dev)), repeats),
        "step_ms": _median_ms(one_step, repeats),
    }


def torch_side(cfg: RunConfig, model_dir: str, s: update.Samples, ref, repeats: int) -> dict:
    """Times the same model and loss in plain torch on the padded samples."""
    import torch
    import transformers

    if _THREADS.value:
        torch.set_num_threads(_THREADS.value)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.rl.learning_rate, betas=(0.9, 0.95), weight_decay=0.0
    )
    tokens = torch.from_numpy(s.tokens_bt.astype(np.int64))
    attn = torch.from_numpy(s.segment_ids_bt.astype(np.int64))
    mask = torch.from_numpy(s.mask_bt[:, 1:])
    ref_t = torch.from_numpy(ref[:, 1:])
    reward = torch.from_numpy(s.reward_b)

    def loss():
        logits = model(input_ids=tokens, attention_mask=attn).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]
        delta = (mask * (logp - ref_t)).sum(1)
        adv = reward - reward.view(-1, GROUP).mean(1).repeat_interleave(GROUP)
        return ((adv - TAU * delta) ** 2 / (2 * TAU)).mean()

    def fwd():
        with torch.no_grad():
            loss()

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        loss().backward()

    def step():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.rl.max_grad_norm)
        opt.step()

    with torch.no_grad():
        value = float(loss())
    return {
        "loss": value,
        "forward_ms": _median_ms(fwd, repeats),
        "fwd_bwd_ms": _median_ms(fwd_bwd, repeats),
        "step_ms": _median_ms(step, repeats),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = RunConfig()
    params = decoder.init(cfg.model, jax.random.key(_SEED.value))
    s = samples(cfg, _SEED.value)
    # π_θi: the model's own log-probs slightly moved, so δ is not 0 and the loss is not trivial
    logp = np.asarray(
        train_step.sequence_logprobs(cfg.model, params, s.tokens_bt, s.segment_ids_bt)
    )
    ref = (logp + 0.01 * np.random.default_rng(_SEED.value).standard_normal(logp.shape)).astype(
        np.float32
    )
    ref = np.where(s.mask_bt > 0, ref, 0.0).astype(np.float32)
    n = len(s.reward_b)
    packed, rows = update.packed_batch(s, ref, np.arange(n), n, 1, shards=1, self_ref=False)
    real = int(s.segment_ids_bt.sum())
    results = {
        "real_tokens": real,
        "jax_packed": {"rows": rows, **jax_side(cfg, params, packed, _REPEATS.value)},
        "jax_padded": {"rows": n, **jax_side(cfg, params, padded_batch(s, ref), _REPEATS.value)},
        "jax": jax.__version__,
    }
    with tempfile.TemporaryDirectory() as d:
        model_dir = convert.save_hf(cfg.model, params, os.path.join(d, "model"))
        results["torch_padded"] = {"rows": n, **torch_side(cfg, model_dir, s, ref, _REPEATS.value)}
    cols = s.tokens_bt.shape[1]
    t = results["torch_padded"]
    print(
        f"loss: jax packed {results['jax_packed']['loss']:.6f}, padded "
        f"{results['jax_padded']['loss']:.6f}, torch {t['loss']:.6f}"
    )
    print(
        f"{n} samples, {real} real tokens, {cols} columns; jax {jax.__version__}, torch "
        f"{t['torch']} ({t['threads']} threads), transformers {t['transformers']}; "
        f"medians of {_REPEATS.value}"
    )
    print("| side | rows | forward ms | backward ms | step ms | step real tok/s | vs torch |")
    print("|---|---|---|---|---|---|---|")
    for name in ("jax_packed", "jax_padded", "torch_padded"):
        m = results[name]
        m["backward_ms"] = m["fwd_bwd_ms"] - m["forward_ms"]
        m["step_tokens_per_s"] = real / (m["step_ms"] / 1e3)
        m["step_vs_torch"] = m["step_ms"] / t["step_ms"]
        print(
            f"| {name} | {m['rows']} x {cols} | {m['forward_ms']:.1f} | {m['backward_ms']:.1f} | "
            f"{m['step_ms']:.1f} | {m['step_tokens_per_s']:.0f} | {m['step_vs_torch']:.2f}x |"
        )
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
