"""Math answer reward: extract the final answer of a response, decide equivalence with math-verify.

Every reward kind shares the interface `reward(prompt, response, answer) -> (score, info)`;
`score` is 1.0 or 0.0 (the paper's binary r) and `info` says what was extracted and why.
"""

from __future__ import annotations

import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+?)(?:\.\s*$|\.\s+|\n|$)", re.I | re.S)
# "answer is $...$" whose math may span lines and contain escaped dollars (\$).
_ANSWER_IS_MATH = re.compile(r"answer\s*(?:is|:)\s*:?\s*\$((?:\\\$|[^$])+?)\$(?!\w)", re.I | re.S)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())


def last_boxed(text: str) -> str | None:
    """Returns the content of the last \\boxed{...} or \\fbox{...} (braces balanced), or None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(response: str) -> tuple[str | None, str]:
    """Returns (final answer text, how it was found): boxed, "answer is", or the last number."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed, "boxed"
    matches = list(_ANSWER_IS_MATH.finditer(response)) or list(_ANSWER_IS.finditer(response))
    if matches:
        return matches[-1].group(1).strip().strip("$").strip(), "answer_is"
    numbers = _NUMBER.findall(response)
    if numbers:
        return numbers[-1].replace(",", ""), "last_number"
    return None, "none"


def _timeout(seconds: float | None) -> int | None:
    # math-verify enforces time limits with SIGALRM, which only the main thread may use.
    if threading.current_thread() is not threading.main_thread():
        return None
    return max(1, int(seconds)) if seconds else None


def parse_answer(text: str, *, timeout_s: float | None = 5):
    """Returns math-verify's parse of an answer string (LaTeX or plain), [] if unparseable."""
    # Surrounding whitespace is not content, but math-verify parses "$\n...\n$" differently.
    return parse(
        f"${text.strip()}$", extraction_config=_CONFIG, parsing_timeout=_timeout(timeout_s)
    )


def reward(prompt: str, response: str, answer: str, *, timeout_s: float = 5) -> tuple[float, dict]:
    """Returns (1.0 if the response's final answer equals `answer`, else 0.0; info).

    Args:
      prompt: the problem (unused by this reward; part of the shared interface).
      response: the model's full response.
      answer: the gold final answer (LaTeX or a number).
      timeout_s: time limit of each parse and of the equivalence check.
    """
    del prompt
    extracted, how = extract_answer(response)
    info = {"extracted": extracted, "extraction": how}
    if extracted is None:
        return 0.0, dict(info, reason="no answer found")
    gold = parse_answer(answer, timeout_s=timeout_s)
    if not gold:
        return 0.0, dict(info, reason="gold answer unparseable")
    pred = parse_answer(extracted, timeout_s=timeout_s)
    if not pred:
        return 0.0, dict(info, reason="answer unparseable")
    ok = verify(gold, pred, timeout_seconds=_timeout(timeout_s))
    return float(ok), dict(info, reason="equivalent" if ok else "not equivalent")
