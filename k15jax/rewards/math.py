"""Math answer reward: extract the final answer of a response, decide equivalence with math-verify.

Every reward kind shares the interface `reward(prompt, response, answer) -> (score, info)`;
`score` is 1.0 or 0.0 (the paper's binary r) and `info` says what was extracted and why.

Extraction, in order (the first that applies decides):
  1. boxed: every `\\boxed{...}` / `\\fbox{...}` of the response. Empty boxes are dropped; a box
     holding another box is accepted only as a pure wrapper (`\\boxed{\\boxed{3}}`). When the
     boxes hold different answers, every one must be equivalent to the reference (two different
     boxed answers are a hedge, not a self-correction); at most `MAX_BOXES` different ones.
  2. "answer is" / "answer:": the last such phrase in the response's tail.
  3. last expression: a number written in words in a final sentence without digits or math
     ("... She has twenty-one left."), else math-verify's own extraction (`parse` with LaTeX
     and plain-expression configs, its first-ranked match only) over the tail of the response,
     else the last number of the tail.

Forms math-verify does not know are rewritten on both sides (`normalize`) before its parse:
escaped dollar amounts (`\\$18`, `\\\\$18.00`), thin-space / `\\,` / `{,}` / `\\!` / U+2009 /
U+202F / U+00A0 thousands separators, a Unicode minus (U+2212), an en dash in the position of a
sign, and numbers written in words (`twelve`, `twenty-one`, `one hundred and five`). An
inequality in one variable is compared with an interval reference as a set; an open pair
`(a, b)` with finite ends reads as an interval only when the problem mentions "interval" (else
it may be a point); "x <= -1 or x >= 4" is the union of the two sets.

Attack-minded limits (the policy searches for any reward it can get without solving the task):
only the response's last `TAIL_CHARS` characters are searched for "answer is" and the last
expression (an early right number in a long response does not count), answers longer than
`MAX_ANSWER_CHARS` are refused, an answer that lists alternatives ("12 or 13", "twelve or
thirteen", `x=1 \\lor x=2`) is refused unless the reference itself contains "or", an
equation between two different numbers (`12 = 13`, read by math-verify as its right side) is
refused, math-verify's plain-expression reading of an answer is taken only when it covers the
whole answer (alone it returns the last number of any text: `12 \\top 13`, `12 | 13` -> 13),
and the whole call runs under one time limit (math-verify's SIGALRM alarms, so it is enforced
on the main thread only; elsewhere a pathological answer such as `9^{9^{9^9}}` can block).
"""

from __future__ import annotations

import math
import re
import threading
import time

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

TAIL_CHARS = 2000  # the part of a response searched for "answer is" and the last expression
MAX_ANSWER_CHARS = 400  # the longest reference answer of the shared data sets is 159 chars
MAX_BOXES = 4  # different boxed answers checked before the response is refused

_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+?)(?:\.\s*$|\.\s+|\n|$)", re.I | re.S)
# "answer is $...$" whose math may span lines and contain escaped dollars (\$).
_ANSWER_IS_MATH = re.compile(r"answer\s*(?:is|:)\s*:?\s*\$((?:\\\$|[^$])+?)\$(?!\w)", re.I | re.S)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
_LATEX, _EXPR = _CONFIG[:1], _CONFIG[1:]
# One plain expression, with at most three trailing words ("12 apples"); no commas (a list).
_PLAIN_EXPRESSION = re.compile(r"\s*[-+*/^()\u00d7\u00f7.%\d\s]+(?:\s+[A-Za-z]{3,}){0,3}\s*\.?\s*")

_OR_WORD = re.compile(r"\bor\b|\\lor\b|\\vee\b", re.I)
# A number followed by words that are no math ("18 dollars", "5 apples"): the number.
_NUMBER_THEN_WORDS = re.compile(r"\s*(-?[\d.,]*\d)((?:\s+[A-Za-z]{3,}){1,3})\s*\.?\s*")
_MATH_WORDS = frozenset(
    "and or pi sin cos tan cot sec csc log exp mod sqrt inf infty arcsin arccos arctan sinh cosh "
    "tanh max min gcd lcm det deg".split()
)

_THOUSANDS_SEP = re.compile(
    r"(?<=\d)(?:,\\!|\\!|\\,|\{,\}|\\ |~|\u2009|\u202f|\u00a0)(?=\d{3}(?!\d))"
)
_ESCAPED_DOLLAR = re.compile(r"\\+\$\s*(?=-?[\d.])")

_SMALL = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {
    w: 10 * i
    for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)
}
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
_WORD = "|".join(sorted([*_SMALL, *_TENS, "hundred", *_SCALES], key=len, reverse=True))
_NUMBER_WORDS = re.compile(
    rf"\b(?:(?:minus|negative)\s+)?(?:{_WORD})(?:(?:\s+and\s+|[\s-]+)(?:{_WORD}))*\b", re.I
)
_PRONOUN_ONE = re.compile(
    r"\s+(?:more|of|another|other|by|at|after|way|thing|time|day|hand|must|can|should|would|"
    r"could|might|may|will|is|was|has|had|does|did)\b",
    re.I,
)
# Alternatives joined by "or" between two answer-like items: "12 or 13", "$1$ or $2$",
# "x = 1 or x = 2", "3 \text{ or } 4", "twelve or thirteen", "x=1 \lor x=2".
_HEDGE = re.compile(
    rf"(?:[\d$}})\]]|\b(?:{_WORD}))\s*,?\s*"
    r"(?:\bor\b|\\[a-z]+\{[^{}]*\bor\b[^{}]*\}|\\lor\b|\\vee\b)\s*"
    rf"(?:[-$\\(\[{{\d]|[a-zA-Z]\s*=|(?:{_WORD})\b)",
    re.I,
)


def _words_value(words: list[str]) -> int | None:
    """Returns the integer that English number words spell, or None if they are no one number.

    Strict on purpose: "one two three" or "twelve thirteen" is a list, not 6 or 1213.
    """
    total, group, prev, last_scale = 0, 0, None, None
    for w in words:
        if w == "and":
            if prev != "hundred":
                return None
            prev = "and"
        elif w in _SMALL:
            v = _SMALL[w]
            after_tens = prev == "tens" and 1 <= v <= 9
            if not (prev in (None, "hundred", "and", "scale") or after_tens):
                return None
            if v == 0 and prev is not None:
                return None
            group, prev = group + v, "unit"
        elif w in _TENS:
            if prev not in (None, "hundred", "and", "scale"):
                return None
            group, prev = group + _TENS[w], "tens"
        elif w == "hundred":
            if prev != "unit" or not 1 <= group <= 9:
                return None
            group, prev = group * 100, "hundred"
        else:
            scale = _SCALES[w]
            if group == 0 or prev == "and" or (last_scale is not None and scale >= last_scale):
                return None
            total, group, prev, last_scale = total + group * scale, 0, "scale", scale
    return None if prev == "and" else total + group


def _replace_number_words(text: str, *, bare_one: bool = True) -> str:
    """Returns `text` with each phrase of English number words that spells one number as digits.

    `bare_one=False` keeps a lone "one" that prose uses as a pronoun ("one more", "one of").
    """

    def sub(m: re.Match) -> str:
        words = re.split(r"[\s-]+", m.group(0).lower())
        if words == ["one"] and not bare_one and _PRONOUN_ONE.match(m.string, m.end()):
            return m.group(0)
        sign = ""
        if words[0] in ("minus", "negative"):
            sign, words = "-", words[1:]
        value = _words_value(words)
        return m.group(0) if value is None else f"{sign}{value}"

    return _NUMBER_WORDS.sub(sub, text)


def normalize(text: str, *, words: bool = False) -> str:
    """Returns `text` with the forms math-verify does not know rewritten into ones it does.

    Unicode minus and a sign-position en dash -> "-", thousands separators dropped, escaped
    dollar signs before a number dropped. With `words` (for an answer, not for prose): number
    words -> digits (only when the text has no digit, so "the 3 of them ... one" keeps its
    numbers), and a number followed by up to three non-math words ("18 dollars") -> the number.
    """
    text = text.replace("\u2212", "-")
    text = re.sub("\u2013(?=\\s*[\\d.(])", _en_dash, text)
    text = _THOUSANDS_SEP.sub("", text)
    text = _ESCAPED_DOLLAR.sub("", text)
    text = re.sub(r"\s*\u00b0", r"^\\circ", text)
    if words and not re.search(r"\d", text):
        text = _replace_number_words(text)
    if words and (m := _NUMBER_THEN_WORDS.fullmatch(text)):
        if not _MATH_WORDS.intersection(m.group(2).lower().split()):
            text = m.group(1)
    return text


def _en_dash(m: re.Match) -> str:
    """Returns "-" for an en dash in the position of a sign, else the dash unchanged.

    A sign follows nothing, an opening bracket, "=", ",", ":" or a prose word ("is -5"); after a
    number, a closing bracket, a variable or a command (`\\pi`) it is a range or a difference.
    """
    before = m.string[max(0, m.start() - 40) : m.start()].rstrip()
    if not before or before[-1] in "([{=,:;$" or re.search(r"(?<![\\\w])[A-Za-z]{2,}$", before):
        return "-"
    return m.group(0)


def _hedged(text: str) -> bool:
    """Returns whether `text` joins two answer-like items with "or" (spacing commands ignored)."""
    return (
        _HEDGE.search(re.sub(r"\\[,;:! ]|\\q?quad\b|~", " ", normalize(text, words=True)))
        is not None
    )


def _balanced(text: str, start: int) -> int | None:
    """Returns the index of the brace closing the one at `start - 1`, or None if unclosed."""
    depth = 1
    for j in range(start, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j
    return None


def boxed_answers(text: str) -> tuple[list[str], str | None]:
    """Returns (contents of the top-level boxes in order, a reason to refuse them or None).

    A box whose content is exactly another box is unwrapped; one that holds a box among other
    content, or that is never closed, makes the boxes refused.
    """
    out, pos = [], 0
    while (m := _BOX_START.search(text, pos)) is not None:
        end = _balanced(text, m.end())
        if end is None:
            return out, "unclosed box"
        content = text[m.end() : end].strip()
        while (inner := _BOX_START.match(content)) is not None:
            inner_end = _balanced(content, inner.end())
            if inner_end != len(content) - 1:
                break
            content = content[inner.end() : inner_end].strip()
        if _BOX_START.search(content):
            return out, "nested boxes with other content"
        out.append(content)
        pos = end + 1
    return out, None


def _tail(text: str) -> str:
    """Returns the last `TAIL_CHARS` characters of `text`, starting at a line boundary if any."""
    if len(text) <= TAIL_CHARS:
        return text
    tail = text[-TAIL_CHARS:]
    newline = tail.find("\n")
    return tail[newline + 1 :] if 0 <= newline < len(tail) - 1 else tail


def _final_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def extract_answer(response: str, *, timeout_s: float = 5) -> tuple[str | None, str]:
    """Returns (final answer text, how it was found) for responses without boxes.

    `how` is "answer_is", "last_expression" (math-verify's extraction of the tail), "last_number"
    or "number_words"; (None, "none") when nothing is found. Boxes: `boxed_answers`.
    """
    text, how, _ = _extract(response, timeout_s=timeout_s)
    return text, how


def _extract(response: str, *, timeout_s: float) -> tuple[str | None, str, list | None]:
    """Returns `extract_answer`'s pair and math-verify's parse of a last expression (or None).

    The parse is kept because math-verify's text of a match is normalized and does not always
    parse again the same way (`6, 8\\text{, and }10`).
    """
    tail = _tail(response)
    matches = list(_ANSWER_IS_MATH.finditer(tail))
    if matches:
        return matches[-1].group(1).strip().strip("$").strip(), "answer_is", None
    matches = list(_ANSWER_IS.finditer(tail))
    if matches:
        return _sentence(tail, matches[-1].start(1)).strip().strip("$").strip(), "answer_is", None
    norm = normalize(tail)
    # "First 12, then 5. She has twenty-one left.": a final sentence without digits or math
    # that spells a number answers with it (a bare "one" is too often prose: "one more").
    final = re.split(r"(?<=[.!?])\s+", _final_line(norm).strip().rstrip(".!?"))[-1]
    if final and not re.search(r"[\d$\\]", final):
        spelled = _replace_number_words(final, bare_one=False)
        if spelled != final:
            if _hedged(spelled):
                return spelled, "number_words", None
            numbers = _NUMBER.findall(spelled)
            if numbers:
                return numbers[-1], "number_words", None
    found = _last_expression(norm, timeout_s=timeout_s)
    if found is not None:
        return found[-1], "last_expression", found if len(found) == 2 else None
    numbers = _NUMBER.findall(norm)
    if numbers:
        return numbers[-1].replace(",", ""), "last_number", None
    return None, "none", None


def _sentence(text: str, start: int) -> str:
    """Returns `text` from `start` to the end of its sentence: a newline, or a period followed by
    a space or the end, outside braces (`34\\text{ sq. units}.` is one sentence)."""
    depth = 0
    for j in range(start, len(text)):
        c = text[j]
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth <= 0 and (c == "\n" or (c == "." and text[j + 1 : j + 2] in ("", " ", "\n"))):
            return text[start:j]
    return text[start:]


def _last_expression(text: str, *, timeout_s: float) -> list | None:
    """Returns math-verify's parse of the last LaTeX or plain expression of `text`, or None.

    The list is math-verify's: [parsed, text of the match], or [text] when the match did not
    parse. Only the match math-verify ranks first is tried (`extraction_mode="first_match"`): an
    earlier expression or number is not taken in place of one that does not parse.
    """
    found = parse(
        text,
        extraction_config=_CONFIG,
        extraction_mode="first_match",
        parsing_timeout=_timeout(timeout_s),
    )
    if not found or not isinstance(found[-1], str) or not found[-1].strip():
        return None
    if len(found) == 2 and isinstance(found[0], (sympy.Basic, sympy.MatrixBase)):
        return [found[0], found[1].strip()]
    return [found[-1].strip()]


def _timeout(seconds: float | None) -> int | None:
    # math-verify enforces time limits with SIGALRM, which only the main thread may use.
    if threading.current_thread() is not threading.main_thread():
        return None
    return max(1, math.ceil(seconds)) if seconds is not None else None


def parse_answer(text: str, *, timeout_s: float | None = 5):
    """Returns math-verify's parse of an answer string (LaTeX or plain), [] if unparseable.

    The LaTeX reading is tried first. The plain-expression reading is taken only for an answer
    that is one plain expression as a whole: math-verify's plain extraction otherwise returns the
    last number of any text, so `12 \\top 13`, `12 | 13` or `1, 2, ..., 100` would read as 13
    or 100.
    """
    # Surrounding whitespace is not content, but math-verify parses "$\n...\n$" differently;
    # inside, a newline is a space to LaTeX but ends math-verify's inline math.
    text = normalize(re.sub(r"\s*\n\s*", " ", text.strip()), words=True)
    found = parse(f"${text}$", extraction_config=_LATEX, parsing_timeout=_timeout(timeout_s))
    if found and isinstance(found[0], (sympy.Basic, sympy.MatrixBase)):
        return found
    plain = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    if not _PLAIN_EXPRESSION.fullmatch(plain) or not re.search(r"\d", plain):
        return found
    depth = 0
    for c in plain:
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth < 0:
            return found
    if depth:
        return found
    expr = parse(text, extraction_config=_EXPR, parsing_timeout=_timeout(timeout_s))
    # The expression math-verify took must be the whole answer, not its last number.
    whole = re.sub(r"(?:\s+[A-Za-z]{3,}){1,3}\s*\.?\s*$|%|\.\s*$", "", plain)
    if len(expr) == 2 and _bare(expr[1]) == _bare(whole):
        return expr
    return found


def _false_equation(expr, *, timeout_s: float) -> bool:
    """Returns whether `expr` states that two different numbers are equal (`12 = 13`).

    math-verify compares only the last right-hand side of an equation with a number, so
    `12 = 13` (or `x = 12 = 13`) would otherwise count as 13.
    """
    eqs = [expr] if isinstance(expr, sympy.Eq) else []
    if isinstance(expr, sympy.And):
        eqs = [a for a in expr.args if isinstance(a, sympy.Eq)]
    for eq in eqs:
        if not eq.lhs.free_symbols and not eq.rhs.free_symbols:
            if not verify(eq.lhs, eq.rhs, timeout_seconds=_timeout(timeout_s)):
                return True
    return False


def _union_of_relations(expr):
    """Returns "x <= -1 or x >= 4" (parsed as a set of relations) as the union of their sets.

    Anything else, or relations in other than one common variable, is returned unchanged.
    """
    if not isinstance(expr, sympy.FiniteSet) or not expr.args:
        return expr
    if not all(isinstance(a, sympy.core.relational.Relational) for a in expr.args):
        return expr
    symbols = set().union(*(a.free_symbols for a in expr.args))
    if len(symbols) != 1:
        return expr
    try:
        return sympy.Union(*(a.as_set() for a in expr.args))
    except Exception:  # sympy raises many kinds for relations it cannot solve
        return expr


def _bare(expr: str) -> str:
    """Returns `expr` without whitespace and leading zeros, for comparing two spellings."""
    return re.sub(r"(?<![\d.])0+(?=[\d.])", "", re.sub(r"\s+", "", expr))


def _interval_reference(gold: list, answer: str, prompt: str) -> bool:
    """Returns whether the reference is a set of reals that an inequality may stand for.

    An open pair with finite ends, `(a, b)`, is also how a point is written: it counts as an
    interval only when the problem mentions one.
    """
    expr = next((g for g in gold if isinstance(g, sympy.Basic)), None)
    if not isinstance(expr, (sympy.Interval, sympy.Union)):
        return False
    if (
        isinstance(expr, sympy.Interval)
        and expr.is_open
        and expr.start.is_finite
        and expr.end.is_finite
    ):
        return "interval" in prompt.lower() or "\\cup" in answer
    return True


def _equivalent(
    gold: list, extracted: str, *, sets: bool, deadline: float, parsed: list | None = None
) -> tuple[bool, str]:
    """Returns (whether `extracted` is equivalent to the parsed reference by `deadline`, reason).

    `parsed`, math-verify's own parse of the same match, is a second reading of it (its text
    does not always parse back the same way); either may match.
    """
    if not extracted.strip():
        return False, "empty answer"
    if len(extracted) > MAX_ANSWER_CHARS:
        return False, f"answer longer than {MAX_ANSWER_CHARS} characters"
    readings = [parse_answer(extracted, timeout_s=deadline - time.monotonic()), parsed or []]
    readings = [r for r in readings if r]
    if not readings:
        return False, "answer unparseable"
    for pred in readings:
        if _false_equation(pred[0], timeout_s=deadline - time.monotonic()):
            return False, "an equation between two different numbers"
    for pred in readings:
        if sets:
            pred = [_union_of_relations(pred[0])] + pred[1:]
        left = _timeout(deadline - time.monotonic())
        if verify(gold, pred, allow_set_relation_comp=sets, timeout_seconds=left):
            return True, "equivalent"
    return False, "not equivalent"


def reward(prompt: str, response: str, answer: str, *, timeout_s: float = 5) -> tuple[float, dict]:
    """Returns (1.0 if the response's final answer equals `answer`, else 0.0; info).

    Args:
      prompt: the problem (read only to tell an interval `(a, b)` from a point).
      response: the model's full response.
      answer: the gold final answer (LaTeX or a number).
      timeout_s: time limit of the whole call: each math-verify call gets what is left (at least
        1 s, its alarm's resolution), and answers not checked in time count as not equivalent.
    """
    deadline = time.monotonic() + timeout_s
    gold = parse_answer(answer, timeout_s=timeout_s)
    boxes, refused = boxed_answers(response)
    if refused is not None:
        return 0.0, {"extracted": None, "extraction": "boxed", "reason": refused}
    parsed = None  # math-verify's parse of a last expression, when that is the answer
    if boxes:
        answers = list(dict.fromkeys(b for b in boxes if b))
        info = {"extracted": answers[-1] if answers else "", "extraction": "boxed"}
        if not answers:
            return 0.0, dict(info, reason="empty box")
        if len(answers) > MAX_BOXES:
            return 0.0, dict(info, reason=f"more than {MAX_BOXES} different boxed answers")
        last = max(response.rfind("\\boxed"), response.rfind("\\fbox"))
        line = response[response.rfind("\n", 0, last) + 1 :].split("\n", 1)[0]
        region = [*answers, line[-1000:]]  # the line of the last box: "12 or \\boxed{13}"
    else:
        extracted, how, parsed = _extract(response, timeout_s=deadline - time.monotonic())
        info = {"extracted": extracted, "extraction": how}
        if extracted is None:
            return 0.0, dict(info, reason="no answer found")
        answers = [extracted]
        region = [extracted, _final_line(_tail(response))]
    if not gold:
        return 0.0, dict(info, reason="gold answer unparseable")
    if not _OR_WORD.search(answer) and any(map(_hedged, region)):
        return 0.0, dict(info, reason="alternatives joined by 'or'")
    sets = _interval_reference(gold, answer, prompt)
    for extracted in answers:
        if time.monotonic() >= deadline:
            return 0.0, dict(info, reason=f"time limit of {timeout_s}s spent")
        ok, reason = _equivalent(gold, extracted, sets=sets, deadline=deadline, parsed=parsed)
        if not ok:
            if len(answers) > 1:
                reason = f"boxed answers differ: {extracted!r} {reason}"
            return 0.0, dict(info, reason=reason)
    return 1.0, dict(info, reason="equivalent")
