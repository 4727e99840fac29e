"""The built-in character tokenizer for the synthetic tasks, and loading of any local HF tokenizer.

Both are a thin `Tokenizer` around a `tokenizers.Tokenizer` (no torch, no hub). `save_pretrained`
writes the standard Hugging Face files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) that `transformers.AutoTokenizer` and vLLM load offline.

What transformers (5.19) makes of them depends on the model type in config.json: for "qwen2" it
always builds `Qwen2Tokenizer`, which keeps tokenizer.json's vocabulary, merges and
post-processor but replaces its normalizer, pre-tokenizer and decoder with Qwen2's own (NFC,
Qwen2's split regex, byte-level), whatever tokenizer_class says; for "qwen3" and "llama" it
loads tokenizer.json as written. So the built-in tokenizer is written in exactly Qwen2's form
(a byte-level BPE without merges: one token per character), and
`auto_tokenizer_mismatch` names what another tokenizer would lose under a model type.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import string

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
# Every printable ASCII character except the rarely useful vertical whitespace variants.
CHARS = "".join(c for c in string.printable if c not in "\r\x0b\x0c")
BUILTIN_VOCAB_SIZE = 128  # padded above len(SPECIALS) + len(CHARS) = 102 for aligned matmuls
# transformers' Qwen2Tokenizer pre-tokenizer regex (models/qwen2/tokenization_qwen2.py).
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Model types whose AutoTokenizer rebuilds the pipeline as Qwen2's (transformers 5.19).
QWEN2_REBUILT = ("qwen2",)


def _qwen2_pipeline() -> tuple:
    """Returns (normalizer, pre-tokenizer, decoder) exactly as transformers' Qwen2Tokenizer."""
    split = pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated", invert=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return (
        normalizers.NFC(),
        pre_tokenizers.Sequence([split, byte_level]),
        decoders.ByteLevel(),
    )


def _byte_chars() -> dict[int, str]:
    """Returns GPT-2's byte -> printable character map that byte-level BPE vocabularies use."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """Encodes text to ids and back; `hf` is the underlying `tokenizers.Tokenizer`."""

    hf: tokenizers.Tokenizer
    eos_token: str
    pad_token: str
    bos_token: str | None = None
    unk_token: str | None = None
    # The model's chat template (Jinja, as in tokenizer_config.json); None: the model has none.
    chat_template: str | None = None

    @property
    def eos_id(self) -> int:
        return self.hf.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.hf.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Returns the ids of `text`, without special tokens."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Returns the text of `ids`, dropping special tokens."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def apply_chat_template(self, text: str) -> str:
        """Returns `text` as the user turn of the model's chat template, ready for its answer.

        Rendered as transformers renders it (a sandboxed Jinja environment with trim_blocks and
        lstrip_blocks, `messages`, `add_generation_prompt=True` and the special tokens), so
        the ids of the result are those of `apply_chat_template(..., tokenize=True)`.
        """
        if self.chat_template is None:
            raise ValueError("the tokenizer has no chat template")
        return _render_chat(
            self.chat_template,
            messages=[{"role": "user", "content": text}],
            add_generation_prompt=True,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token,
            pad_token=self.pad_token,
            unk_token=self.unk_token or "",
        )

    def save_pretrained(self, path: str) -> None:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into `path`.

        tokenizer_config.json names `PreTrainedTokenizerFast` (tokenizer.json as written, no
        model-specific class) and lists every added token, so a class that rebuilds the
        pipeline (transformers' Qwen2Tokenizer) still reads each as one special token.
        """
        os.makedirs(path, exist_ok=True)
        self.hf.save(os.path.join(path, "tokenizer.json"))
        specials = {"eos_token": self.eos_token, "pad_token": self.pad_token}
        if self.bos_token:
            specials["bos_token"] = self.bos_token
        if self.unk_token:
            specials["unk_token"] = self.unk_token
        added = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self.hf.get_added_tokens_decoder().items())
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 20,
            "added_tokens_decoder": added,
            **specials,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
            json.dump(specials, f, indent=2)


def builtin() -> Tokenizer:
    """Returns the character-level tokenizer of the built-in tasks (ids 0-3 are special).

    One token per printable ASCII character (`CHARS`), stored as a byte-level BPE without
    merges in Qwen2's pipeline (module docstring), so transformers and vLLM load it exactly.
    Any other character (non-ASCII, \\r) has no token and is dropped, by every loader alike.
    """
    byte_char = _byte_chars()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({byte_char[ord(c)]: len(SPECIALS) + i for i, c in enumerate(CHARS)})
    unused = [f"<unused{i}>" for i in range(len(vocab), BUILTIN_VOCAB_SIZE)]
    vocab.update({tok: i for i, tok in enumerate(unused, start=len(vocab))})
    hf = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[],
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    hf.normalizer, hf.pre_tokenizer, hf.decoder = _qwen2_pipeline()
    hf.add_special_tokens(list(SPECIALS) + unused)
    return Tokenizer(hf=hf, eos_token=EOS, pad_token=PAD, bos_token=BOS, unk_token=UNK)


def _ids_relevant(part):
    """Returns a tokenizer.json part without the options that change no id and no text.

    A ByteLevel step's `trim_offsets` moves only offsets, and a ByteLevel decoder maps
    characters back to bytes whatever its options (Qwen2.5's own files differ from the
    `tokenizers` defaults in both).
    """
    if isinstance(part, list):
        return [_ids_relevant(p) for p in part]
    if not isinstance(part, dict):
        return part
    if part.get("type") == "ByteLevel":
        part = {k: v for k, v in part.items() if k != "trim_offsets"}
    return {k: _ids_relevant(v) for k, v in part.items()}


def auto_tokenizer_mismatch(tok: Tokenizer, model_type: str) -> str | None:
    """Returns what `AutoTokenizer` would load differently for `model_type`, or None if nothing.

    For `QWEN2_REBUILT` types transformers keeps only tokenizer.json's BPE vocabulary, merges
    and post-processor (module docstring): a tokenizer with another model, normalizer,
    pre-tokenizer or decoder would encode and decode differently there, and in vLLM.
    """
    if model_type not in QWEN2_REBUILT:
        return None
    saved = json.loads(tok.hf.to_str())
    ref = tokenizers.Tokenizer(
        models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="")
    )
    ref.normalizer, ref.pre_tokenizer, ref.decoder = _qwen2_pipeline()
    want = json.loads(ref.to_str())
    for key in ("type", "dropout", "unk_token", "fuse_unk", "byte_fallback"):
        if saved["model"].get(key) != want["model"][key]:
            return (
                f"model_type={model_type!r}: transformers builds Qwen2Tokenizer, a BPE with "
                f"{key}={want['model'][key]!r}; this tokenizer has {saved['model'].get(key)!r}"
            )
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if saved["model"].get(key) not in ("", None):
            return (
                f"model_type={model_type!r}: transformers builds Qwen2Tokenizer, a BPE without "
                f"{key}; this tokenizer has {saved['model'][key]!r}"
            )
    for part in ("normalizer", "pre_tokenizer", "decoder"):
        if part == "decoder" and (saved[part] or {}).get("type") == "ByteLevel":
            continue
        if _ids_relevant(saved[part]) != _ids_relevant(want[part]):
            return (
                f"model_type={model_type!r}: transformers builds Qwen2Tokenizer, which replaces "
                f"the {part} {json.dumps(saved[part])} with Qwen2's {json.dumps(want[part])}"
            )
    return None


def load(path: str) -> Tokenizer:
    """Returns the tokenizer saved in the Hugging Face directory `path` (needs tokenizer.json)."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: no tokenizer.json (only fast tokenizers are supported)")
    config = {}
    config_file = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(config_file):
        with open(config_file) as f:
            config = json.load(f)

    def token(name):
        value = config.get(name)
        return value.get("content") if isinstance(value, dict) else value

    eos = token("eos_token")
    if eos is None:
        raise ValueError(f"{config_file}: eos_token is not set")
    pad = token("pad_token") or eos
    return Tokenizer(
        hf=tokenizers.Tokenizer.from_file(file),
        eos_token=eos,
        pad_token=pad,
        bos_token=token("bos_token"),
        unk_token=token("unk_token"),
        chat_template=_chat_template(path, config),
    )


def _chat_template(path: str, config: dict) -> str | None:
    """Returns the chat template of a Hugging Face directory, or None.

    Where transformers looks: chat_template.jinja (what it writes now), else tokenizer_config.json's
    `chat_template`, a string or a list of named templates of which "default" is the one used.
    """
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja) as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(
            f"{os.path.join(path, 'tokenizer_config.json')}: chat_template must be a string or "
            f"a list of named templates, got {type(template).__name__}"
        )
    return template


def _render_chat(template: str, **context) -> str:
    """Renders a chat template in a sandbox (a model directory's template is not trusted)."""
    from jinja2 import TemplateError

    try:
        return _compiled_chat(template).render(**context)
    except TemplateError as e:
        raise ValueError(f"the chat template failed: {e}") from None


@functools.lru_cache(maxsize=8)
def _compiled_chat(template: str):
    """Returns `template` compiled once (every prompt of a run is rendered with it)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ValueError(f"the chat template failed: {e}") from None
