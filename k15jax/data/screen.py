"""The pool screen: problems whose answer a guess earns or no checker can verify (k1.5 §2.1).

`screen` removes multiple-choice, true/false and proof problems from the RL prompt set before
any rollout; `screen_line` is its one-line log. The rules are in `screen`'s docstring.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from k15jax.data import prompt_sets

SCREEN_REASONS = ("multiple_choice", "true_false", "proof")

_ASY = re.compile(r"\[asy\].*?\[/asy\]", re.S | re.I)
# A wrapper around a whole answer: $...$, \boxed{...}, \text{...} and its relatives.
_WRAPPER = re.compile(r"^\\(?:boxed|fbox|text|textbf|mathrm|mbox|textrm)\s*\{(.*)\}$", re.S)
_OPTION_LETTER = re.compile(r"^\(\s*([A-Za-z])\s*\)$|^([A-H])$")
_OPTION_LETTERS = re.compile(r"^[A-H](?:\s*,?\s*(?:and\s+)?[A-H])+$")
_TRUE_FALSE = {"true", "false", "yes", "no"}
# An inline option label: "(A)" (also inside \textbf{...}) or "\text A.".
_INLINE_LABEL = r"\(\s*{0}\s*\)|\\text\s*\{{?\s*{0}\s*\}}?\s*\."
# What makes "(A)" an argument, not a label: a letter right before it (f(A)), a one-letter name
# and a space (P (A)), or a function command (\sin (A)). A word and a space ("is (A)") or a
# spacing command ("\qquad (B)") does not.
_CALL_BEFORE = re.compile(
    r"(?:[A-Za-z]|(?<![A-Za-z\\])[A-Za-z] |\\(?:sin|cos|tan|cot|sec|csc|log|ln|exp|angle|"
    r"det|gcd|lcm|max|min|arcsin|arccos|arctan|sinh|cosh|tanh)\s*)$"
)
# A label at the start of a line (after an optional bullet): "A." "A)" "A:" "(A)", then a blank.
_LINE_LABEL = r"(?m)^[ \t$]*(?:\\bullet[ \t$]*)?\(?{0}[.):][ \t]"
_OPTION_CUE = re.compile(
    r"which of the following|correct (?:option|letter|answer choice)|letters? of the|"
    r"answer choices?|\bthe options\b|\"[A-Z]\" for |"
    r"(?-i:\$?A\$?,\s*\$?B\$?,?\s*(?:\$?[C-H]\$?,?\s*)*or\s+\$?[B-H]\b)",  # "A, B, or C"
    re.I,
)
_PROOF_CUE = re.compile(
    r"\b(?:prove|proves|proved|proving|proof|show that|demonstrate that)\b", re.I
)
_PROOF_PLACEHOLDERS = {
    "", "proof", "qed", "q.e.d", "none", "n/a", "na", "null", "see proof", "see solution",
    "see above", "see explanation", "shown", "proved", "proven", "done", "-",
}  # fmt: skip
_RELATION = re.compile(
    r"\\(?:le|ge|leq|geq|leqslant|geqslant|neq|ne|equiv|mid|implies|iff|Rightarrow|"
    r"Leftrightarrow|subset|subseteq|cong|parallel|perp|sim)(?![A-Za-z])|[<>≤≥≠]"
)


def _bare_answer(answer: str) -> str:
    """Returns `answer` without surrounding $, \\boxed{}-style wrappers and a final period."""
    text = answer.strip()
    while True:
        before = text
        text = text.strip().strip("$").strip().rstrip(".").strip()
        if m := _WRAPPER.match(text):
            text = m.group(1)
        if text == before:
            return text


def _labels_in_order(text: str, label: str, letters: str) -> bool:
    """Returns whether every label of `letters` occurs, each after the previous one."""
    pos = 0
    for letter in letters:
        for m in re.finditer(label.format(letter), text[pos:]):
            if not _CALL_BEFORE.search(text[: pos + m.start()]):
                pos += m.end()
                break
        else:
            return False
    return True


def _option_list(text: str, letters: str) -> bool:
    """Returns whether `text` labels options `letters` inline or at the starts of lines."""
    return _labels_in_order(text, _INLINE_LABEL, letters) or _labels_in_order(
        text, _LINE_LABEL, letters
    )


def _is_checkable_value(answer: str) -> bool:
    """Returns whether an answer states a value (not a proof placeholder, relation or prose)."""
    bare = _bare_answer(answer)
    if bare.lower() in _PROOF_PLACEHOLDERS or _RELATION.search(bare):
        return False
    words = re.findall(r"(?<!\\)\b[A-Za-z]{2,}\b", bare)
    return not (len(words) >= 4 and not re.search(r"\d", bare))


def screen_reason(problem: prompt_sets.Problem) -> str | None:
    """Returns why `problem` is excluded from RL (one of `SCREEN_REASONS`), or None to keep it.

    The rules (`screen`'s docstring) are checked in the order of `SCREEN_REASONS`.
    """
    bare = _bare_answer(problem.answer)
    text = _ASY.sub(" ", problem.prompt)
    letter = _OPTION_LETTER.match(bare)
    letters = letter is not None or _OPTION_LETTERS.match(bare) is not None
    if (
        _option_list(text, "ABCD")
        or (letter is not None and letter.group(1) is not None)
        or (
            letters
            and (
                _OPTION_CUE.search(text) or _option_list(text, "ABC") or _option_list(text, "abcd")
            )
        )
    ):
        return "multiple_choice"
    if bare.lower() in _TRUE_FALSE:
        return "true_false"
    if _PROOF_CUE.search(problem.prompt) and not _is_checkable_value(problem.answer):
        return "proof"
    return None


def screen(
    problems: Sequence[prompt_sets.Problem],
) -> tuple[tuple[prompt_sets.Problem, ...], dict[str, tuple[str, ...]]]:
    """Returns (kept problems, {reason: ids removed}) without the easy-to-guess kinds (k1.5 §2.1).

    The paper leaves multiple-choice, true/false and proof problems out of the RL prompt set: a
    guess earns reward without reasoning, or no answer can be checked. Rules, on the answer
    after removing $...$, \\boxed{}, \\text{}, \\textbf{}, \\mathrm{} and a final period:

    - "multiple_choice" when any of:
      - the prompt (outside [asy] drawings) labels four options A-D, whatever the answer (AMC
        problems whose answer is the option's value): inline, "(A) ... (B) ... (C) ... (D)"
        (also inside \\textbf{}/\\mathrm{}, or "\\text A."), or at the starts of lines,
        "A." "A)" "A:" (after an optional \\bullet). "(A)" right after a letter, a one-letter
        name and a space, or a LaTeX command is an argument, not a label: f(A), P (A), \\sin (A);
      - the answer is one parenthesised letter, "(C)" or "\\text{(p)}";
      - the answer is one capital letter A-H, or several ("A, C", "ACF"), and the prompt offers
        options: three labels A-C or four lowercase a-d as above, "which of the following",
        "correct option", "letter of the", "answer choice", "the options", a code ('"C" for
        circle') or an enumeration "A, B, C, or D".
      Fewer labels with any other answer are the conditions or parts of one problem ("(a) find
      x, (b) find y" with answer 8), and a bare letter without options is a computed answer
      ("the 100th letter of ABCABC..."): both are kept.
    - "true_false": the answer is True, False, Yes or No (any case). "True-false quiz"
      problems whose answer is a number are kept.
    - "proof": the prompt says "prove", "proof", "show that" or "demonstrate that" (whole words)
      and the answer states no value: it is empty or a placeholder ("proof", "QED", "N/A",
      "see solution", ...), a relation (\\le, \\geq, \\neq, \\equiv, <, >, \\implies, ...: the
      statement that was to be proved), or prose (four or more words, no digit). "Show that
      ..., then find x" with a numeric answer, "the letters of the word PROOF" and "dough must
      proof" are computations and kept; so is an answer "1" or "Alice".

    Each removed id appears under exactly one reason, the first rule that matches; every
    reason is a key of the returned dict. Order of the kept problems is preserved.
    """
    kept, dropped = [], {reason: [] for reason in SCREEN_REASONS}
    for problem in problems:
        reason = screen_reason(problem)
        if reason is None:
            kept.append(problem)
        else:
            dropped[reason].append(problem.id)
    return tuple(kept), {reason: tuple(ids) for reason, ids in dropped.items()}


def screen_line(dropped: dict[str, Sequence[str]], total: int) -> str:
    """Returns the one-line log of a `screen` result over `total` problems."""
    counts = ", ".join(f"{reason} {len(dropped.get(reason, ()))}" for reason in SCREEN_REASONS)
    removed = sum(len(ids) for ids in dropped.values())
    return f"screen removed {removed} of {total} problems ({counts})"
