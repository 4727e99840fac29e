"""The built-in character tokenizer for the synthetic tasks, and loading of any local HF tokenizer.

Both are a thin `Tokenizer` around a `tokenizers.Tokenizer` (no torch, no hub). `save_pretrained`
writes the standard Hugging Face files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) that `transformers.AutoTokenizer` and vLLM load offline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import string

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
# Every printable ASCII character except the rarely useful vertical whitespace variants.
CHARS = "".join(c for c in string.printable if c not in "\r\x0b\x0c")
BUILTIN_VOCAB_SIZE = 128  # padded above len(SPECIALS) + len(CHARS) = 102 for aligned matmuls


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """Encodes text to ids and back; `hf` is the underlying `tokenizers.Tokenizer`."""

    hf: tokenizers.Tokenizer
    eos_token: str
    pad_token: str
    bos_token: str | None = None
    unk_token: str | None = None

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

    def save_pretrained(self, path: str) -> None:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into `path`."""
        os.makedirs(path, exist_ok=True)
        self.hf.save(os.path.join(path, "tokenizer.json"))
        specials = {"eos_token": self.eos_token, "pad_token": self.pad_token}
        if self.bos_token:
            specials["bos_token"] = self.bos_token
        if self.unk_token:
            specials["unk_token"] = self.unk_token
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 20,
            **specials,
        }
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
            json.dump(specials, f, indent=2)


def builtin() -> Tokenizer:
    """Returns the character-level tokenizer of the built-in tasks (ids 0-3 are special)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
    for i in range(len(vocab), BUILTIN_VOCAB_SIZE):
        vocab[f"<unused{i}>"] = i
    hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    hf.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens(list(SPECIALS) + [t for t in vocab if t.startswith("<unused")])
    return Tokenizer(hf=hf, eos_token=EOS, pad_token=PAD, bos_token=BOS, unk_token=UNK)


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
    )
