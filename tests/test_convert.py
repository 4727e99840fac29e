"""HF <-> JAX <-> orbax conversion: bit-exact round trips, loadable output, clear errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from k15jax.model import convert, decoder, tokenizer
from k15jax.model.config import ModelConfig


def _tensors(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM"])
def test_hf_jax_hf_round_trip_is_bit_exact(hf_dirs, arch, tmp_path):
    src, hf = hf_dirs[arch]
    cfg, params = convert.load_hf(src)
    out = convert.save_hf(cfg, params, str(tmp_path / "out"))
    a, b = _tensors(src), _tensors(out)
    if cfg.tie_word_embeddings:
        a.pop("lm_head.weight", None)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    # And transformers loads the written directory to the same logits.
    back = getattr(transformers, arch).from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.arange(10)[None]
    with torch.no_grad():
        np.testing.assert_array_equal(back(tokens).logits.numpy(), hf(tokens).logits.numpy())


def test_sharded_save_loads_back(hf_dirs, tmp_path):
    cfg, params = convert.load_hf(hf_dirs["Qwen2ForCausalLM"][0])
    out = convert.save_hf(cfg, params, str(tmp_path / "sharded"), max_shard_bytes=100_000)
    files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    assert len(files) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    _, back = convert.load_hf(out)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), params, back)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(out)
    assert hf.model.embed_tokens.weight.shape == (cfg.vocab_size, cfg.hidden_size)


def test_orbax_round_trip_is_bit_exact(tmp_path):
    cfg = ModelConfig(architecture="Qwen3ForCausalLM", qk_norm=True, dtype="bfloat16")
    params = decoder.init(cfg, jax.random.key(3))
    convert.save_orbax(cfg, params, str(tmp_path / "ck"))
    cfg2, back = convert.load_orbax(str(tmp_path / "ck"))
    assert cfg2 == cfg
    jax.tree.map(
        lambda x, y: (x.dtype == y.dtype) and np.testing.assert_array_equal(x, y), params, back
    )


def test_save_with_tokenizer_loads_in_transformers(tmp_path):
    cfg = ModelConfig(attention_bias=True, eos_token_id=2, pad_token_id=0)
    params = decoder.init(cfg, jax.random.key(0))
    out = convert.save_hf(cfg, params, str(tmp_path / "m"), tokenizer=tokenizer.builtin())
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token_id == 2
    assert tok("3+4=7", add_special_tokens=False).input_ids == tokenizer.builtin().encode("3+4=7")


def test_failed_save_keeps_previous_checkpoint(hf_dirs, tmp_path):
    cfg, params = convert.load_hf(hf_dirs["Qwen2ForCausalLM"][0])
    target = str(tmp_path / "keep")
    convert.save_hf(cfg, params, target)
    before = _tensors(target)

    class Boom:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        convert.save_hf(cfg, jax.tree.map(lambda x: x + 1, params), target, tokenizer=Boom())
    after = _tensors(target)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert os.listdir(tmp_path) == ["keep"]  # no temporary directory left behind


# ------------------------------------------------------------------------ bad input


@pytest.fixture
def broken(hf_dirs, tmp_path):
    path = str(tmp_path / "broken")
    shutil.copytree(hf_dirs["Qwen2ForCausalLM"][0], path)
    return path


def _edit_config(path, **changes):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        hf = json.load(f)
    hf.update(changes)
    with open(file, "w") as f:
        json.dump(hf, f)


def test_unsupported_architecture_is_named(broken):
    _edit_config(broken, architectures=["MistralForCausalLM"])
    with pytest.raises(convert.CheckpointError) as e:
        convert.load_hf(broken)
    assert "MistralForCausalLM" in str(e.value) and "Qwen3ForCausalLM" in str(e.value)
    assert "config.json" in str(e.value)


def test_missing_tensor_is_named(broken):
    file = os.path.join(broken, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file)
    with pytest.raises(
        convert.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"
    ):
        convert.load_hf(broken)


def test_wrong_shape_names_tensor_and_both_shapes(broken):
    file = os.path.join(broken, "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 128), np.float32)
    save_file(tensors, file)
    with pytest.raises(convert.CheckpointError) as e:
        convert.load_hf(broken)
    msg = str(e.value)
    assert (
        "model.layers.0.self_attn.k_proj.weight" in msg and "[8, 128]" in msg and "[64, 128]" in msg
    )


def test_unreadable_safetensors_is_named(broken):
    file = os.path.join(broken, "model.safetensors")
    with open(file, "wb") as f:
        f.write(b"\x00not a safetensors file")
    with pytest.raises(convert.CheckpointError, match="model.safetensors: unreadable"):
        convert.load_hf(broken)


def test_missing_config_field_and_directory(broken, tmp_path):
    with pytest.raises(convert.CheckpointError, match="not a directory"):
        convert.load_hf(str(tmp_path / "nope"))
    file = os.path.join(broken, "config.json")
    with open(file) as f:
        hf = json.load(f)
    del hf["hidden_size"]
    with open(file, "w") as f:
        json.dump(hf, f)
    with pytest.raises(convert.CheckpointError, match="'hidden_size' is missing"):
        convert.load_hf(broken)
