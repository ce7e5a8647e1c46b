"""Pulling the final answer out of a model response, and normalising answers for comparison.

Everything here is plain string work with linear-time scans (no regex that can backtrack
catastrophically), so it stays fast on adversarial responses: megabyte strings, ten thousand
levels of nested braces, unclosed boxes.

Answer extraction policy (used by every verifier in :mod:`vispo.rewards.verifiers`):

1. If the response contains a ``\\boxed`` or ``\\fbox`` command, the answer is the content of
   the **last** one (brace-matched, so nested braces are fine). If that last box is unclosed,
   the response has no answer (we do not fall back to an earlier box: the model's final
   answer is malformed).
2. Otherwise (no box command at all), and only when fallbacks are allowed, the text after the
   last ``answer is`` / ``answer:`` in the final part of the response (after ``</think>``), up
   to the end of that line, is the answer.
3. Otherwise, if what remains after ``</think>`` is short (at most
   :data:`SHORT_ANSWER_CHARS` characters on one line), that whole text is the answer. This
   serves plain short-answer prompts ("circle", "yes", "3").
"""

from __future__ import annotations

import re

__all__ = [
    "SHORT_ANSWER_CHARS",
    "extract_answer",
    "extract_boxed",
    "normalize_answer",
    "strip_markup",
]

#: A response without a box counts as a bare answer only if it is at most this long.
SHORT_ANSWER_CHARS = 64
#: How far from the end of the response the "answer is" fallback looks.
_FALLBACK_WINDOW_CHARS = 2000
#: The longest answer text that the "answer is" fallback returns.
_FALLBACK_ANSWER_CHARS = 200

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BRACE_OR_ESCAPE = re.compile(r"[{}\\]")


def _find_last_box(text: str) -> tuple[int, int] | None:
    """Return ``(start, end)`` of the last real ``\\boxed``/``\\fbox`` command name, or None.

    A command counts only if the next character is not a letter (``\\boxedfoo`` is another
    command). Each candidate is visited once, so this is linear in ``len(text)``.
    """
    limit = len(text)
    while True:
        best = -1
        best_cmd = ""
        for cmd in _BOX_COMMANDS:
            pos = text.rfind(cmd, 0, limit)
            if pos > best:
                best, best_cmd = pos, cmd
        if best < 0:
            return None
        end = best + len(best_cmd)
        if end >= len(text) or not text[end].isalpha():
            return best, end
        limit = best + len(best_cmd) - 1  # search strictly before this occurrence


def _match_braces(text: str, open_pos: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_pos``; None if it is never closed.

    Backslash escapes (``\\{``, ``\\}``, ``\\\\``) are skipped, so ``\\boxed{\\{1,2\\}}`` works.
    Iterative (no recursion), so any nesting depth is fine.
    """
    depth = 0
    skip_until = -1
    for m in _BRACE_OR_ESCAPE.finditer(text, open_pos):
        i = m.start()
        if i < skip_until:
            continue
        ch = m.group()
        if ch == "\\":
            skip_until = i + 2  # the escaped character is not a brace
        elif ch == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return i
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Braces are matched, so nested groups such as ``\\boxed{\\frac{1}{2}}`` come back whole.
    ``\\boxed 5`` (no braces, as LaTeX allows) returns the token after the space, up to the
    next whitespace or ``$``. Returns None if there is no box, or if the last box is unclosed
    or has nothing after it; an empty box ``\\boxed{}`` returns ``""``.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_boxed expects a str, got {type(text).__name__}")
    found = _find_last_box(text)
    if found is None:
        return None
    _, pos = found
    n = len(text)
    # Skip spaces between the command and its argument.
    while pos < n and text[pos] in " \t":
        pos += 1
    if pos >= n:
        return None
    if text[pos] == "{":
        close = _match_braces(text, pos)
        return None if close is None else text[pos + 1 : close]
    # Unbraced argument: take the following token.
    end = pos
    while end < n and not text[end].isspace() and text[end] != "$":
        end += 1
    token = text[pos:end]
    return token or None


def _after_think(text: str) -> str:
    """The part of a response after its last ``</think>`` (the whole text if there is none)."""
    pos = text.rfind("</think>")
    return text if pos < 0 else text[pos + len("</think>") :]


_ANSWER_IS = re.compile(r"answer\s{0,3}(?:is\b|:)\s{0,3}:?", re.IGNORECASE)


def _answer_is_fallback(text: str) -> str | None:
    """Text after the last "answer is"/"answer:" near the end of ``text``, up to end of line."""
    window = text[-_FALLBACK_WINDOW_CHARS:]
    matches = list(_ANSWER_IS.finditer(window))
    if not matches:
        return None
    last = matches[-1]
    rest = window[last.end() :].lstrip()
    line = rest.split("\n", 1)[0].strip()
    line = line.strip("*").strip()  # markdown bold: **Answer:** B
    if line.endswith("."):
        line = line[:-1].rstrip()
    if not line or len(line) > _FALLBACK_ANSWER_CHARS:
        return None
    return line


def extract_answer(completion: str, *, allow_fallback: bool = True) -> str | None:
    """The final answer of a response, by the policy in this module's docstring.

    ``allow_fallback=False`` accepts only a boxed answer (the strict reference behaviour).
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    if _find_last_box(completion) is not None:
        return extract_boxed(completion)
    if not allow_fallback:
        return None
    tail = _after_think(completion)
    found = _answer_is_fallback(tail)
    if found is not None:
        return found
    short = tail.strip()
    if short and len(short) <= SHORT_ANSWER_CHARS and "\n" not in short:
        return short
    return None


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

_TEXT_COMMANDS = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mathsf|mathtt|mbox|"
    r"operatorname|boxed|fbox)\s*\{([^{}]*)\}"
)
_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree")
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:(?:,|\{,\})\d{3})+(?![\d])")
_WS = re.compile(r"\s+")


def strip_markup(s: str) -> str:
    """Remove LaTeX presentation markup, keeping the content.

    Unwraps ``\\text{..}``, ``\\mathrm{..}``, ``\\textbf{..}`` (and similar) from the inside
    out, drops ``$``, ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\left``, ``\\right``, spacing
    commands and degree marks, and maps ``\\dfrac``/``\\tfrac`` to ``\\frac``. Inputs are
    short answers (callers bound them), so the repeated substitution is cheap.
    """
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    s = s.replace("$", "")
    s = s.replace("\\%", "%")
    s = _DEGREES.sub("", s)
    s = _SPACING.sub(" ", s)
    for _ in range(10):  # nested \text{\textbf{x}}: unwrap level by level
        new = _TEXT_COMMANDS.sub(r"\1", s)
        if new == s:
            break
        s = new
    return s


def normalize_answer(s: str) -> str:
    """Canonical form of a short answer for string comparison.

    Markup stripped (:func:`strip_markup`), thousands separators removed (``1,000`` and
    ``1{,}000`` become ``1000``), lower-cased, a trailing period dropped, all whitespace
    removed. Examples: ``"\\text{Circle}"`` -> ``"circle"``, ``"30^\\circ"`` -> ``"30"``,
    ``"\\dfrac{1}{2}"`` -> ``"\\frac{1}{2}"``.
    """
    s = strip_markup(s).strip()
    s = _THOUSANDS.sub(lambda m: m.group().replace("{,}", "").replace(",", ""), s)
    s = s.lower().strip()
    while s.endswith("."):
        s = s[:-1].rstrip()
    return _WS.sub("", s)
