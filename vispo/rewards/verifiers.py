"""Per-sample verifiers: ``fn(completion: str, answer: str) -> float``.

Every verifier returns 1.0 or 0.0, never raises on odd *responses* (any string is a valid
response, including a megabyte of braces), and raises a clear ``TypeError``/``ValueError`` on
bad *inputs* (a non-string completion, a gold answer that does not fit the verifier).

:func:`math_accuracy` is the reference accuracy reward (PAPO/CPPO recipes, algorithms.md
section 9). Its comparison, :func:`answers_match`, runs these steps on the extracted answer
and the gold answer, stopping at the first that decides:

1. Normalised strings equal (markup, spaces, case, thousands separators, degree marks
   removed; see :func:`vispo.rewards.extract.normalize_answer`) -> correct.
2. Gold is a choice letter (``B``, ``(B)``, ``\\text{B}``, ``(B) 45``) -> correct iff the
   prediction names the same letter (``(B)``, ``B.``, ``B: ...``, ``option B``). math-verify
   is not consulted: it reads letters as symbols.
3. Gold is a word answer (``circle``, ``dark blue``, ``\\text{Yes}``) -> correct iff the
   prediction is the same words, ignoring case, markup, spacing, a trailing period and a
   leading article. math-verify is not consulted: it reads ``circle`` as the product
   ``c*i*r*c*l*e``, which equals any anagram.
4. Both sides read as plain numbers -> compared numerically (relative tolerance 1e-9).
   Fractions (``3/4``, ``\\frac{3}{4}``), signs, decimals, scientific notation, thousands
   separators, a leading ``x =``, and common unit words (``cm``, ``degrees``, ``units``...)
   are understood. **Percentages**: ``50\\%`` equals both ``50`` and ``0.5`` (the percent sign
   may be kept or applied; math-verify does the same), but ``50`` does not equal ``0.5``.
5. math-verify ``parse`` + ``verify`` (sympy equality, intervals, sets, equations, units),
   after the screen in :mod:`vispo.rewards._guard`, under one wall-clock budget of
   :data:`SYMBOLIC_TIMEOUT_S` seconds where a signal timer can be used (main thread).

Decisions worth knowing: ``\\pi`` does not equal ``3.14`` (no approximate answers); a
candidate answer longer than :data:`MAX_ANSWER_CHARS` is wrong; without a box, the
"answer is ..." line or a short bare response is used (see :mod:`vispo.rewards.extract`;
``require_boxed=True`` disables that).
"""

from __future__ import annotations

import logging
import math
import re

from vispo.rewards._guard import SymbolicTimeout, deadline, looks_safe_for_sympy
from vispo.rewards.extract import extract_answer, extract_boxed, normalize_answer, strip_markup

__all__ = [
    "MAX_ANSWER_CHARS",
    "SYMBOLIC_TIMEOUT_S",
    "answers_match",
    "choice_accuracy",
    "choice_letter",
    "exact_match",
    "format_reward",
    "math_accuracy",
    "yes_no_accuracy",
]

#: Extracted answers longer than this are scored 0 (real final answers are far shorter).
MAX_ANSWER_CHARS = 1000
#: Wall-clock budget for math-verify's parse + verify of one pair (main thread only).
SYMBOLIC_TIMEOUT_S = 3.0


def _as_completion(completion: object) -> str:
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    return completion


def _as_answer(answer: object) -> str:
    """Gold answers may come from a dataset as numbers; anything else is a data error."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise TypeError(f"gold answer must be a str (or a number), got {type(answer).__name__}")
    text = str(answer).strip()
    boxed = extract_boxed(text) if "\\boxed" in text or "\\fbox" in text else None
    return (boxed if boxed is not None else text).strip()


# --------------------------------------------------------------------------------------------
# Choice letters and word answers
# --------------------------------------------------------------------------------------------

_LETTER_ONLY = re.compile(r"\(?\s*([A-Ja-j])\s*\)?\s*[.:]?")
_LETTER_WITH_TEXT = re.compile(r"(?:\(([A-J])\)|([A-J])[.:)])\s*\S.*", re.DOTALL)
_OPTION_LETTER = re.compile(r"(?:option|choice)\s*\(?([A-Ja-j])\)?\s*[.:]?", re.IGNORECASE)


def choice_letter(text: str, *, gold: bool = False) -> str | None:
    """The multiple-choice letter (A-J, upper case) that ``text`` names, or None.

    Understands ``B``, ``(B)``, ``B.``, ``B:``, ``\\text{B}``, ``option B`` and, when followed by
    the option's text, ``(B) 45``, ``B. 45``, ``B) 45``. With ``gold=True`` a bare letter must
    be upper case (a gold answer ``x`` is a variable, not option X).
    """
    s = strip_markup(text).strip()
    if len(s) > 200:
        return None
    m = _LETTER_ONLY.fullmatch(s)
    if m:
        letter = m.group(1)
        if gold and not letter.isupper():
            return None
        return letter.upper()
    m = _LETTER_WITH_TEXT.fullmatch(s)
    if m:
        return m.group(1) or m.group(2)
    m = _OPTION_LETTER.fullmatch(s)
    if m:
        return m.group(1).upper()
    return None


_WORDS = re.compile(r"[a-z][a-z' -]*[a-z]")
_NOT_WORDS = frozenset(
    {"pi", "inf", "infty", "oo", "sqrt", "frac", "sin", "cos", "tan", "log", "ln"}
)
_ARTICLE = re.compile(r"^(?:a|an|the)\s+")


def _words(text: str) -> str:
    """Lower-cased words of ``text`` with markup, extra spaces, a final period, an article removed."""
    s = strip_markup(text).strip().lower()
    while s.endswith("."):
        s = s[:-1].rstrip()
    s = " ".join(s.split())
    return _ARTICLE.sub("", s)


def _is_word_answer(gold: str) -> bool:
    w = _words(gold)
    return bool(_WORDS.fullmatch(w)) and w not in _NOT_WORDS


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------

_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?"
_PLAIN = re.compile(_NUM)
_SLASH = re.compile(rf"({_NUM})/({_NUM})")
_FRAC = re.compile(rf"([+-]?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}")
_ASSIGN = re.compile(r"[a-z][a-z0-9_]*=(.+)")
_UNITS = (
    "cm|mm|km|dm|in|inch|inches|ft|feet|foot|yd|yard|yards|mi|mile|miles|meter|meters|metre|"
    "metres|centimeter|centimeters|kg|mg|gram|grams|lb|lbs|pound|pounds|sec|secs|second|seconds|"
    "min|mins|minute|minutes|hr|hrs|hour|hours|day|days|week|weeks|year|years|deg|degree|degrees|"
    "rad|radian|radians|unit|units|squareunits|squareunit|sq.units|ml|liter|liters|litre|litres|"
    "dollar|dollars|cent|cents|mph|km/h|m/s"
)
_UNIT_SUFFIX = re.compile(rf"(.*?\d)(?:{_UNITS})(?:\^\{{?[23]\}}?|²|³)?")


def _number_values(norm: str) -> set[float]:
    """Values a normalised answer can stand for (two for a percentage); empty if not a number."""
    s = norm.replace("−", "-")
    m = _ASSIGN.fullmatch(s)
    if m:
        s = m.group(1)
    m = _UNIT_SUFFIX.fullmatch(s)
    if m:
        s = m.group(1)
    percent = s.endswith("%")
    if percent:
        s = s[:-1]
    value: float | None = None
    try:
        if _PLAIN.fullmatch(s):
            value = float(s)
        elif m := _SLASH.fullmatch(s):
            value = float(m.group(1)) / float(m.group(2))
        elif m := _FRAC.fullmatch(s):
            value = float(m.group(2)) / float(m.group(3))
            value = -value if m.group(1) == "-" else value
    except (ZeroDivisionError, OverflowError, ValueError):
        return set()
    if value is None or not math.isfinite(value):
        return set()
    return {value, value / 100.0} if percent else {value}


def _numbers_match(gold_norm: str, pred_norm: str) -> bool:
    golds, preds = _number_values(gold_norm), _number_values(pred_norm)
    return any(math.isclose(g, p, rel_tol=1e-9, abs_tol=1e-12) for g in golds for p in preds)


# --------------------------------------------------------------------------------------------
# math-verify
# --------------------------------------------------------------------------------------------


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its timeout is off; vispo enforces its own (see _guard)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


_math_verify = None


def _load_math_verify():
    """Import math-verify on first use (it pulls in sympy; reward workers start faster without)."""
    global _math_verify
    if _math_verify is None:
        import math_verify
        import math_verify.errors

        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
        _math_verify = math_verify
    return _math_verify


def _symbolic_match(gold: str, pred: str, timeout_s: float) -> bool:
    """math-verify equality of two answer strings, bounded in time; False on any failure."""
    if not (looks_safe_for_sympy(gold) and looks_safe_for_sympy(pred)):
        return False
    mv = _load_math_verify()
    try:
        with deadline(timeout_s):
            # Timeouts off inside math-verify: its signal.alarm would cancel our timer, and it
            # cannot work outside the main thread anyway.
            g = mv.parse("\\boxed{" + gold + "}", parsing_timeout=None)
            p = mv.parse("\\boxed{" + pred + "}", parsing_timeout=None)
            return bool(g) and bool(p) and bool(mv.verify(g, p, timeout_seconds=None))
    except (SymbolicTimeout, mv.errors.TimeoutException):
        return False
    except (Exception, RecursionError):  # sympy/antlr errors on odd input mean "not equal"
        return False


# --------------------------------------------------------------------------------------------
# Public verifiers
# --------------------------------------------------------------------------------------------


def answers_match(pred: str, gold: str, *, timeout_s: float = SYMBOLIC_TIMEOUT_S) -> bool:
    """True if the extracted answer ``pred`` equals the gold answer (steps in the module doc)."""
    pred, gold = pred.strip(), _as_answer(gold)
    if not pred or not gold or len(pred) > MAX_ANSWER_CHARS:
        return False
    pred_norm, gold_norm = normalize_answer(pred), normalize_answer(gold)
    if gold_norm and pred_norm == gold_norm:
        return True
    letter = choice_letter(gold, gold=True)
    if letter is not None:
        return choice_letter(pred) == letter
    if _is_word_answer(gold):
        return _words(pred) == _words(gold)
    if _numbers_match(gold_norm, pred_norm):
        return True
    return _symbolic_match(gold, pred, timeout_s)


def math_accuracy(completion: str, answer: str, *, require_boxed: bool = False) -> float:
    """1.0 if the response's final answer equals ``answer`` by a math-aware comparison, else 0.0.

    The final answer is the last ``\\boxed{}`` (with fallbacks unless ``require_boxed``; see
    :mod:`vispo.rewards.extract`). Returns within a few seconds on any input, in any thread.
    """
    answer_text = _as_answer(answer)
    pred = extract_answer(_as_completion(completion), allow_fallback=not require_boxed)
    if pred is None:
        return 0.0
    return 1.0 if answers_match(pred, answer_text) else 0.0


def _normalise_tag_spacing(text: str) -> str:
    """Remove whitespace next to ``<``, ``>`` and ``/`` (linear time, unlike ``\\s*[<>/]\\s*``)."""

    def keep_or_drop(m: re.Match) -> str:
        before = text[m.start() - 1] if m.start() > 0 else ""
        after = text[m.end()] if m.end() < len(text) else ""
        return "" if before in ("<", ">", "/") or after in ("<", ">", "/") else m.group()

    return re.sub(r"\s+", keep_or_drop, text)


def format_reward(completion: str, answer: object = None) -> float:
    """1.0 iff the whole response matches ``<think>.*</think>.*\\boxed{.*}.*`` (dot matches newline).

    ``answer`` is accepted and ignored, so that every verifier has the same
    ``(completion, answer)`` signature inside a :class:`vispo.rewards.CompositeReward`.

    Whitespace next to ``<``, ``>`` and ``/`` is removed first, so ``< think >`` and
    ``</ think>`` count. Implemented as the equivalent left-to-right search (the earliest
    ``</think>``, then the earliest ``\\boxed{`` after it, then any ``}``), which is linear in
    the response length where the regex can backtrack quadratically.
    """
    text = _normalise_tag_spacing(_as_completion(completion))
    if not text.startswith("<think>"):
        return 0.0
    close = text.find("</think>", len("<think>"))
    if close < 0:
        return 0.0
    box = text.find("\\boxed{", close + len("</think>"))
    if box < 0:
        return 0.0
    return 1.0 if text.find("}", box + len("\\boxed{")) >= 0 else 0.0


def choice_accuracy(completion: str, answer: str) -> float:
    """1.0 if the response's final answer names the gold option letter (A-J).

    ``answer`` may be ``B``, ``(B)``, ``\\text{B}`` or ``(B) 45``; anything else is a
    ``ValueError`` (use :func:`math_accuracy` or :func:`exact_match` for other answers).
    """
    gold_text = _as_answer(answer)
    gold = choice_letter(gold_text, gold=True)
    if gold is None:
        raise ValueError(
            f"choice_accuracy: gold answer {gold_text[:50]!r} is not an option letter A-J"
        )
    pred = extract_answer(_as_completion(completion))
    return 1.0 if pred is not None and choice_letter(pred) == gold else 0.0


_YES_NO = {"yes": "yes", "no": "no", "y": "yes", "n": "no"}


def _yes_no(text: str) -> str | None:
    words = re.findall(r"[a-z]+", _words(text)[:40])
    return _YES_NO.get(words[0]) if words else None


def yes_no_accuracy(completion: str, answer: str) -> float:
    """1.0 if the response's final answer starts with the gold yes/no (case and markup ignored).

    ``"Yes, it is."``, ``"\\text{YES}"`` and ``"yes"`` all read as yes. A gold answer other than
    yes/no is a ``ValueError``.
    """
    gold_text = _as_answer(answer)
    gold = _YES_NO.get(_words(gold_text))
    if gold is None:
        raise ValueError(f"yes_no_accuracy: gold answer {gold_text[:50]!r} is not yes/no")
    pred = extract_answer(_as_completion(completion))
    return 1.0 if pred is not None and _yes_no(pred) == gold else 0.0


def exact_match(completion: str, answer: str) -> float:
    """1.0 if the response's final answer equals ``answer`` exactly (surrounding spaces aside).

    Case-sensitive and markup-sensitive by design: the strict check for short-answer sets.
    """
    gold = _as_answer(answer)
    pred = extract_answer(_as_completion(completion))
    return 1.0 if pred is not None and pred.strip() == gold else 0.0
