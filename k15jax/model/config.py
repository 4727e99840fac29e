"""Frozen configuration dataclasses shared by the model, conversion and training code."""

from __future__ import annotations

import dataclasses

from kernels import attention as kernel_attention
from kernels import logprobs as kernel_logprobs

ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """How the trainer computes attention and log-probs (kernels/); the one home of these choices.

    None of it changes the function computed, only its memory and speed: `xla` forms whole
    [t, t] scores and [t, v] logits; `xla_chunked` (and `triton` on GPUs) are O(t) in memory.
    """

    attention_impl: str = "xla"  # kernels.attention.IMPLS
    attention_block: int = 512  # query and key tile of the blockwise implementations
    logprob_impl: str = "xla"  # kernels.logprobs.IMPLS; "xla": all logits at once
    logprob_chunk: int = 1024  # rows of logits per step of "xla_chunked"
    remat: bool = False  # recompute each layer's activations in the backward pass

    def __post_init__(self):
        if self.attention_impl not in kernel_attention.IMPLS:
            raise ValueError(
                f"attention_impl={self.attention_impl!r} must be one of {kernel_attention.IMPLS}"
            )
        if self.logprob_impl not in kernel_logprobs.IMPLS:
            raise ValueError(
                f"logprob_impl={self.logprob_impl!r} must be one of {kernel_logprobs.IMPLS}"
            )
        if self.attention_block < 1 or self.logprob_chunk < 1:
            raise ValueError(
                f"attention_block={self.attention_block}, logprob_chunk={self.logprob_chunk} "
                "must be >= 1"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and numerics of a Qwen2 / Qwen3 / Llama style decoder.

    Field names follow Hugging Face `config.json` so a config converts both ways without a table;
    `dtype` is the trainer's parameter dtype and `kernels` how it computes (neither is part of
    the architecture: `convert` writes `dtype` as `torch_dtype` and never writes `kernels`).
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
    kernels: KernelConfig = KernelConfig()
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


def qwen25_05b(**overrides) -> ModelConfig:
    """Returns the ModelConfig of Qwen2.5-0.5B's shape (for memory plans and benchmarks with
    random weights: nothing is downloaded); `overrides` replace fields."""
    shape = dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
        rope_theta=1e6, max_position_embeddings=131072, tie_word_embeddings=True,
        attention_bias=True, dtype="bfloat16",
    )  # fmt: skip
    return ModelConfig(**{**shape, **overrides})


def qwen25_15b(**overrides) -> ModelConfig:
    """Returns the ModelConfig of Qwen2.5-1.5B's shape (random weights, as `qwen25_05b`)."""
    return qwen25_05b(
        **{
            **dict(
                hidden_size=1536,
                intermediate_size=8960,
                num_hidden_layers=28,
                num_attention_heads=12,
                head_dim=128,
            ),  # fmt: skip
            **overrides,
        }
    )
