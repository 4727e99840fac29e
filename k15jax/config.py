"""Frozen configuration dataclasses shared by the model, conversion and training code."""

from __future__ import annotations

import dataclasses

ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("xla", "xla_chunked", "triton", "cudnn")  # kernels.attention.IMPLS


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and numerics of a Qwen2 / Qwen3 / Llama style decoder.

    Field names follow Hugging Face `config.json` so a config converts both ways without a table.
    """

    architecture: str = "Qwen2ForCausalLM"
    vocab_size: int = 128
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection bias (always True for Qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    dtype: str = "float32"  # parameter and activation dtype
    attention_impl: str = "xla"  # kernels.attention.IMPLS
    attention_block: int = 512  # query and key tile of the blockwise implementations
    remat: bool = False  # recompute each layer's activations in the backward pass
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture={self.architecture!r} is not supported; supported: {ARCHITECTURES}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {DTYPES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl={self.attention_impl!r} must be one of {ATTENTION_IMPLS}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "head_dim",
            "attention_block",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if (
            self.architecture == "Qwen2ForCausalLM"
            and self.head_dim * self.num_attention_heads != self.hidden_size
        ):
            # vLLM's Qwen2 derives head_dim = hidden_size // heads and ignores config.head_dim.
            raise ValueError(
                f"Qwen2ForCausalLM needs head_dim={self.head_dim} == hidden_size / "
                f"num_attention_heads = {self.hidden_size}/{self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
