"""The small judges of `experiments.judge`: their prompt, bounds and targets (k1.5 §2.3.3).

Kept out of the script so that tests and other scripts can build the same prompts without the
script's command-line flags.
"""

from __future__ import annotations

from k15jax.data import answer_forms
from k15jax.rewards import judge as judge_lib

# The trained judges' prompt: the built-in model is character-level, so it is short. The
# response's end sits in the field <r>...</r>, which it cannot close (`judge.prompt_parts`).
DELIMITERS = ("<r>", "</r>")
TEMPLATE = "{problem}reference: {reference}\nresponse: ...<r>{response}</r>\njudge:\n"
TARGETS = {"classic": answer_forms.classic_target, "cot": answer_forms.cot_target}
MAX_TOKENS = {"classic": 24, "cot": 80}
MAX_PROMPT_TOKENS = 128


def judge_config(kind: str, max_response_chars: int) -> judge_lib.JudgeConfig:
    """Returns judge `kind`'s prompt and bounds (saved with the model)."""
    return judge_lib.JudgeConfig(
        template=TEMPLATE,
        max_tokens=MAX_TOKENS[kind],
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        max_response_chars=max_response_chars,
        delimiters=DELIMITERS,
    )


def prompt_text(cfg: judge_lib.JudgeConfig, item: answer_forms.Item) -> str:
    """Returns the judge prompt of `item` as `Judge.prompt_ids` builds it (a character-level
    tokenizer: the ids of the text are the ids of its parts)."""
    item = judge_lib.JudgeItem(item.problem, item.reference, item.response)
    return "".join(judge_lib.prompt_parts(cfg, item))
