"""Converts a checkpoint between a Hugging Face directory and an orbax checkpoint.

  python -m experiments.convert --src=/path/hf_model --dst=/path/orbax_ckpt
  python -m experiments.convert --src=/path/orbax_ckpt --dst=/path/hf_out --tokenizer=/path/hf

The direction follows from --src: a directory with config.json is Hugging Face, one with
model_config.json is an orbax checkpoint written by k15jax. The output directory is written
beside its final place and renamed, so an interrupted run leaves no half-written checkpoint.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from k15jax.model import convert, tokenizer

_SRC = flags.DEFINE_string("src", None, "Hugging Face directory or k15jax orbax checkpoint.")
_DST = flags.DEFINE_string("dst", None, "Output directory.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Cast parameters (HF -> orbax).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer",
    None,
    "Directory with tokenizer.json to copy into a Hugging Face output; "
    "'builtin' for the built-in tokenizer.",
)


def main(argv):
    del argv
    src, dst = _SRC.value, _DST.value
    if not src or not dst:
        raise app.UsageError("--src and --dst are required")
    if os.path.exists(os.path.join(src, "config.json")):
        cfg, params = convert.load_hf(src, dtype=_DTYPE.value)
        convert.save_orbax(cfg, params, dst)
        logging.info("wrote orbax checkpoint %s (%s)", dst, cfg.architecture)
    elif os.path.exists(os.path.join(src, "model_config.json")):
        cfg, params = convert.load_orbax(src)
        tok = None
        if _TOKENIZER.value == "builtin":
            tok = tokenizer.builtin()
        elif _TOKENIZER.value:
            tok = tokenizer.load(_TOKENIZER.value)
        convert.save_hf(cfg, params, dst, tokenizer=tok)
        logging.info("wrote Hugging Face directory %s (%s)", dst, cfg.architecture)
    else:
        raise app.UsageError(f"--src={src}: neither config.json (HF) nor model_config.json (orbax)")
    print(f"converted {src} -> {dst}")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
