"""Hugging Face safetensors <-> JAX parameters, and orbax save/restore of parameters.

`load_hf(path) -> (config, params)` reads a Hugging Face model directory (config.json and one or
many *.safetensors files); `save_hf(config, params, path)` writes one that `transformers` and vLLM
load unchanged. Writers build the directory beside the target and rename it into place, so a
reader never sees half a checkpoint and a failed write leaves the previous one intact.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import safetensors
from safetensors.numpy import save_file

from k15jax.infra import atomic
from k15jax.model import decoder
from k15jax.model import tokenizer as tokenizer_lib
from k15jax.model.config import ARCHITECTURES, KernelConfig, ModelConfig

MODEL_TYPES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
}
DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float": "float32"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be read as the model it claims to be."""


# ---------------------------------------------------------------------------- config.json


def config_from_hf(
    hf: dict, *, source: str = "config.json", dtype: str | None = None
) -> ModelConfig:
    """Returns the ModelConfig described by a parsed Hugging Face config.json.

    Args:
      hf: the parsed JSON object.
      source: the file it came from, named in errors.
      dtype: overrides the checkpoint's dtype ("float32" or "bfloat16") when given.
    """
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise CheckpointError(
            f"{source}: architectures={archs} is not supported; supported: {list(ARCHITECTURES)}"
        )
    arch = archs[0]
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ("default", None):
        raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported (only default)")
    if hf.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
    heads = hf["num_attention_heads"]
    if dtype is None:
        name = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
        if name not in DTYPE_NAMES:
            raise CheckpointError(
                f"{source}: dtype {name!r} is not supported; use float32 or bfloat16"
            )
        dtype = DTYPE_NAMES[name]
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            dtype=dtype,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_first(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: required field {e.args[0]!r} is missing") from None
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _first(x):
    return x[0] if isinstance(x, list) and x else x


def config_to_hf(cfg: ModelConfig) -> dict:
    """Returns the Hugging Face config.json object for `cfg`."""
    hf = {
        "architectures": [cfg.architecture],
        "model_type": MODEL_TYPES[cfg.architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "torch_dtype": cfg.dtype,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if cfg.architecture == "LlamaForCausalLM":
        hf["mlp_bias"] = cfg.mlp_bias
    if cfg.architecture == "Qwen2ForCausalLM":
        hf["use_sliding_window"] = False
        if cfg.attention_bias is False:
            raise ValueError("Qwen2ForCausalLM always has q/k/v bias; set attention_bias=True")
    if cfg.mlp_bias and cfg.architecture != "LlamaForCausalLM":
        raise ValueError(
            f"mlp_bias is only expressible for LlamaForCausalLM, not {cfg.architecture}"
        )
    return hf


# --------------------------------------------------------------------------- tensor names


def hf_names(cfg: ModelConfig) -> dict[str, tuple[tuple, bool]]:
    """Returns {HF tensor name: (path into params, transposed)} for every parameter of `cfg`."""
    names = {
        "model.embed_tokens.weight": (("embed",), False),
        "model.norm.weight": (("final_norm", "scale"), False),
    }
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head",), True)
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        names[pre + "input_layernorm.weight"] = (("layers", i, "input_norm", "scale"), False)
        names[pre + "post_attention_layernorm.weight"] = (
            ("layers", i, "post_attn_norm", "scale"),
            False,
        )
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{pre}self_attn.{proj}.weight"] = (("layers", i, "attn", proj, "kernel"), True)
            if cfg.attention_bias and proj != "o_proj":
                names[f"{pre}self_attn.{proj}.bias"] = (("layers", i, "attn", proj, "bias"), False)
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                names[f"{pre}self_attn.{norm}.weight"] = (
                    ("layers", i, "attn", norm, "scale"),
                    False,
                )
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{pre}mlp.{proj}.weight"] = (("layers", i, "mlp", proj, "kernel"), True)
            if cfg.mlp_bias:
                names[f"{pre}mlp.{proj}.bias"] = (("layers", i, "mlp", proj, "bias"), False)
    return names


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------- load / save


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        return sorted({os.path.join(path, v) for v in weight_map.values()})
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors file")
    return files


def read_config(path: str, *, dtype: str | None = None) -> ModelConfig:
    """Returns the ModelConfig of the Hugging Face directory `path`."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            hf = json.load(f)
    except OSError as e:
        raise CheckpointError(f"{config_path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    return config_from_hf(hf, source=config_path, dtype=dtype)


def load_hf(path: str, *, dtype: str | None = None) -> tuple[ModelConfig, decoder.Params]:
    """Returns (config, params) read from a Hugging Face model directory.

    Args:
      path: directory holding config.json and model.safetensors (or shards plus index).
      dtype: cast parameters to this dtype; default: the checkpoint's own.

    Raises:
      CheckpointError: naming the file and the tensor or field that is wrong.
    """
    cfg = read_config(path, dtype=dtype)
    wanted = hf_names(cfg)
    expected = jax.tree.map(lambda s: s.shape, decoder.abstract_params(cfg))
    tensors = {}
    for file in _safetensors_files(path):
        try:
            with safetensors.safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    tensors[name] = (file, f.get_tensor(name))
        except Exception as e:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
    params: dict = {}
    for name, (ppath, transposed) in wanted.items():
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name!r} is missing")
        file, value = tensors.pop(name)
        if transposed:
            value = value.T
        want = tuple(_get(expected, ppath))
        if value.shape != want:
            got = value.shape[::-1] if transposed else value.shape
            need = want[::-1] if transposed else want
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {list(got)}, expected {list(need)}"
            )
        _set(params, ppath, np.ascontiguousarray(value).astype(cfg.dtype))
    for name in list(tensors):
        if name.endswith(_IGNORED_SUFFIXES) or (
            cfg.tie_word_embeddings and name == "lm_head.weight"
        ):
            tensors.pop(name)
    if tensors:
        extra = sorted(tensors)[:5]
        raise CheckpointError(f"{path}: unexpected tensors for {cfg.architecture}: {extra}")
    return cfg, jax.tree.map(jax.numpy.asarray, params)


def to_hf_tensors(cfg: ModelConfig, params: decoder.Params) -> dict[str, np.ndarray]:
    """Returns {HF tensor name: numpy array} for `params`, gathered to host memory."""
    out = {}
    for name, (ppath, transposed) in hf_names(cfg).items():
        value = np.asarray(jax.device_get(_get(params, ppath)))
        out[name] = np.ascontiguousarray(value.T if transposed else value)
    return out


def save_hf(
    cfg: ModelConfig,
    params: decoder.Params,
    path: str,
    *,
    tokenizer=None,
    max_shard_bytes: int = 4 << 30,
) -> str:
    """Writes a Hugging Face model directory at `path` and returns `path`.

    Args:
      cfg: the model configuration.
      params: the parameters (any sharding; gathered to the host here).
      path: target directory; replaced atomically if it exists.
      tokenizer: optional object with `save_pretrained(dir)` (a `tokenizer.Tokenizer` or a
        `transformers` tokenizer).
      max_shard_bytes: split into model-0000i-of-0000n.safetensors plus an index above this.

    Raises:
      ValueError: for a `tokenizer.Tokenizer` that `AutoTokenizer` would load differently
        under this model type (`tokenizer.auto_tokenizer_mismatch`), before anything is written.
    """
    path = os.path.abspath(path)
    hf_config = config_to_hf(cfg)
    if isinstance(tokenizer, tokenizer_lib.Tokenizer):
        problem = tokenizer_lib.auto_tokenizer_mismatch(tokenizer, hf_config["model_type"])
        if problem:
            raise ValueError(
                f"{path}: AutoTokenizer (and vLLM) would load this tokenizer differently: {problem}"
            )
    with atomic.directory(path) as tmp:
        tensors = to_hf_tensors(cfg, params)
        shards, current, size = [], {}, 0
        for name, value in tensors.items():
            if current and size + value.nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = value
            size += value.nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
            total = sum(v.nbytes for v in tensors.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(
                    {"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2
                )
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        generation = {
            k: v
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if (v := hf_config[k]) is not None
        }
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


# ---------------------------------------------------------------------------------- orbax


def save_orbax(cfg: ModelConfig, params: decoder.Params, path: str) -> str:
    """Writes params (orbax, under `params/`) and the config (`model_config.json`) at `path`."""
    path = os.path.abspath(path)
    with atomic.directory(path) as tmp:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(tmp, "params"), params)
        with open(os.path.join(tmp, "model_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    return path


def load_orbax(path: str, *, shardings=None) -> tuple[ModelConfig, decoder.Params]:
    """Returns (config, params) written by `save_orbax`, placed with `shardings` if given."""
    config_path = os.path.join(path, "model_config.json")
    try:
        with open(config_path) as f:
            obj = json.load(f)
        cfg = ModelConfig(**dict(obj, kernels=KernelConfig(**obj.get("kernels", {}))))
    except OSError as e:
        raise CheckpointError(f"{config_path}: cannot read ({e.strerror})") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: invalid model config ({e})") from None
    target = decoder.abstract_params(cfg)
    if shardings is not None:
        target = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target, shardings
        )
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(os.path.join(os.path.abspath(path), "params"), target)
    return cfg, params
