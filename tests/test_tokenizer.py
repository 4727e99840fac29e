"""Model directories the project writes load with transformers' AutoTokenizer (and vLLM's loader)
to the same ids and text as the project's tokenizer: the built-in one and BPEs built here."""

import os

import jax
import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from k15jax.model import convert, decoder, tokenizer
from k15jax.model.config import ModelConfig

TEXTS = [
    "Q: 3 + 4 = ?\n",  # a prompt's trailing newline
    "answer: 12\n\nplan:  add 7, then 5.",
    "  leading spaces, tabs\tand\ttrailing   ",
    "x*(y-2)/3 >= 4; a[i] != b{j} | c & d ~ e^f_g",
    "It's 9:05 -- don't stop! (ok?) \"quoted\" 'single' `tick` @#$%",
    "digits 0123456789 and 1,000,000.25",
    "\n\n\nlines\n  indented\n\ttabbed\n",
    "naïve café €5 — ok\r\n",  # non-ASCII and \r
    "<eos> and <pad> inside text",
]
CORPUS = [t for t in TEXTS for _ in range(3)] + [
    "the quick brown fox jumps over the lazy dog " * 3,
    "def f(x):\n    return x + 1\n" * 3,
    "1 + 2 = 3\n12 + 34 = 46\n" * 3,
]


def _save(tok, arch, path):
    cfg = ModelConfig(
        architecture=arch,
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=32,
        attention_bias=arch == "Qwen2ForCausalLM",
        qk_norm=arch == "Qwen3ForCausalLM",
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    return convert.save_hf(cfg, decoder.init(cfg, jax.random.key(0)), str(path), tokenizer=tok)


def _assert_same(tok, loaded):
    """`loaded` (a transformers or vLLM tokenizer) encodes and decodes every text as `tok`."""
    for text in TEXTS:
        ids = tok.encode(text)
        assert loaded.encode(text, add_special_tokens=False) == ids, text
        assert loaded.decode(ids, skip_special_tokens=True) == tok.decode(ids), text
    assert loaded.eos_token_id == tok.eos_id and loaded.pad_token_id == tok.pad_id


def _qwen_like_bpe() -> tokenizer.Tokenizer:
    """A byte-level BPE trained here, in the form of Qwen2.5's own tokenizer.json."""
    hf = tokenizers.Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=""))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                tokenizers.Regex(tokenizer.QWEN2_SPLIT), behavior="isolated", invert=False
            ),
            # Qwen2.5's file says trim_offsets=false; the tokenizers default is true.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ]
    )
    hf.decoder = decoders.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(CORPUS, trainer)
    return tokenizer.Tokenizer(hf=hf, eos_token="<|endoftext|>", pad_token="<|pad|>")


def _metaspace_bpe() -> tokenizer.Tokenizer:
    """A BPE trained here with a pipeline Qwen2Tokenizer does not have (Metaspace, NFKC)."""
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.normalizer = normalizers.NFKC()
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "</s>", "<pad>"], show_progress=False
    )
    hf.train_from_iterator(CORPUS, trainer)
    return tokenizer.Tokenizer(hf=hf, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def test_builtin_ids_are_one_per_character():
    # Independent of the tokenizer's internals: ids follow SPECIALS + CHARS order.
    tok = tokenizer.builtin()
    text = "Q: 3 + 4 = ?\n\tz~"
    assert tok.encode(text) == [len(tokenizer.SPECIALS) + tokenizer.CHARS.index(c) for c in text]
    assert tok.decode(tok.encode(text)) == text
    k_id = len(tokenizer.SPECIALS) + tokenizer.CHARS.index("k")
    assert tok.encode("<eos>") == [tok.eos_id] and tok.decode([tok.eos_id, k_id]) == "k"
    assert tok.vocab_size == tokenizer.BUILTIN_VOCAB_SIZE


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM"])
def test_builtin_directory_loads_with_auto_tokenizer(arch, tmp_path):
    import transformers

    tok = tokenizer.builtin()
    out = _save(tok, arch, tmp_path / "m")
    _assert_same(tok, transformers.AutoTokenizer.from_pretrained(out))
    _assert_same(tok, transformers.PreTrainedTokenizerFast.from_pretrained(out))
    _assert_same(tok, _Project(tokenizer.load(out)))


class _Project:
    """The project's own loader behind the transformers call signature used above."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id, self.pad_token_id = tok.eos_id, tok.pad_id

    def encode(self, text, add_special_tokens=False):
        return self.tok.encode(text)

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(ids)


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM"])
def test_trained_byte_level_bpe_loads_with_auto_tokenizer(arch, tmp_path):
    import transformers

    tok = _qwen_like_bpe()
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges used
    out = _save(tok, arch, tmp_path / "m")
    _assert_same(tok, transformers.AutoTokenizer.from_pretrained(out))


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "LlamaForCausalLM"])
def test_other_bpe_loads_as_written_outside_qwen2(arch, tmp_path):
    import transformers

    tok = _metaspace_bpe()
    out = _save(tok, arch, tmp_path / "m")
    _assert_same(tok, transformers.AutoTokenizer.from_pretrained(out))


def test_qwen2_directory_refuses_a_tokenizer_auto_tokenizer_would_change(tmp_path):
    tok = _metaspace_bpe()
    problem = tokenizer.auto_tokenizer_mismatch(tok, "qwen2")
    assert "unk_token" in problem and "'<unk>'" in problem
    with pytest.raises(ValueError, match="would load this tokenizer differently.*qwen2"):
        _save(tok, "Qwen2ForCausalLM", tmp_path / "m")
    assert not os.path.exists(tmp_path / "m") and os.listdir(tmp_path) == []
    # The character tokenizer of earlier versions (WordLevel): named by its model type.
    old = tokenizers.Tokenizer(models.WordLevel({"<eos>": 0, "a": 1}, unk_token="<eos>"))
    problem = tokenizer.auto_tokenizer_mismatch(tokenizer.Tokenizer(old, "<eos>", "<eos>"), "qwen2")
    assert "type='BPE'" in problem and "'WordLevel'" in problem
    # A BPE in every respect but the pre-tokenizer: that part is named.
    bpe = _qwen_like_bpe()
    bpe.hf.pre_tokenizer = pre_tokenizers.Whitespace()
    assert "pre_tokenizer" in tokenizer.auto_tokenizer_mismatch(bpe, "qwen2")
    assert tokenizer.auto_tokenizer_mismatch(bpe, "llama") is None


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_tokenizer_loading_gives_the_same_ids(tmp_path):
    from vllm.tokenizers.registry import get_tokenizer

    for name, tok in (("builtin", tokenizer.builtin()), ("bpe", _qwen_like_bpe())):
        out = _save(tok, "Qwen2ForCausalLM", tmp_path / name)
        _assert_same(tok, get_tokenizer(out))


# A ChatML template in the shape of Qwen2.5's (default system turn, role checks, generation prompt).
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a careful solver.<|im_end|>\n{% endif %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _chat_bpe(template=CHATML) -> tokenizer.Tokenizer:
    tok = _qwen_like_bpe()
    tok.hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return tokenizer.Tokenizer(
        hf=tok.hf, eos_token="<|im_end|>", pad_token="<|pad|>", chat_template=template
    )


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_chat_template_renders_and_encodes_as_transformers(where, tmp_path):
    import json

    import transformers

    out = _save(_chat_bpe(), "Qwen2ForCausalLM", tmp_path / "m")
    if where == "chat_template.jinja":  # the file transformers writes now takes precedence
        config_file = os.path.join(out, "tokenizer_config.json")
        config = json.load(open(config_file))
        config["chat_template"] = "{{ raise_exception('not this one') }}"
        json.dump(config, open(config_file, "w"))
        open(os.path.join(out, "chat_template.jinja"), "w").write(CHATML)
    tok = tokenizer.load(out)
    reference = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS[:5]:
        messages = [{"role": "user", "content": text}]
        want = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        got = tok.apply_chat_template(text)
        assert got == want and got.startswith("<|im_start|>system\n") and text in got
        ids = tok.encode(got)
        assert ids[0] == tok.hf.token_to_id("<|im_start|>")  # special tokens are one id each
        assert ids == reference.encode(want, add_special_tokens=False)


def test_chat_template_runs_sandboxed():
    with pytest.raises(ValueError, match="the chat template failed: unknown role tool"):
        tokenizer.Tokenizer(
            hf=_chat_bpe().hf, eos_token="<|im_end|>", pad_token="<|pad|>",
            chat_template="{{ raise_exception('unknown role tool') }}",
        ).apply_chat_template("x")  # fmt: skip
    # A model directory's template cannot reach Python internals.
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ValueError, match="the chat template failed"):
        _chat_bpe(escape).apply_chat_template("x")
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.builtin().apply_chat_template("x")
