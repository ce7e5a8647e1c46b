"""Keeping symbolic answer checking bounded in time.

Two layers, because math-verify's own timeouts use ``signal.alarm``, which only works in the
main thread (and its timeout exception derives from ``BaseException``, so a bare
``except Exception`` does not catch it):

1. :func:`looks_safe_for_sympy` screens an answer string *before* any symbolic work: sympy can
   spend minutes (often inside C code that no signal interrupts) on inputs such as
   ``9^{9^{9^{9}}}``, ``(10^{6})!`` or two hundred nested braces. Strings that fail the screen
   are compared by the cheap string and numeric routes only. This layer works in any thread.
2. :func:`deadline` puts one wall-clock budget on the whole symbolic comparison with
   ``signal.setitimer`` when that is possible (main thread, no interval timer already
   running), raising :class:`SymbolicTimeout` (a ``BaseException``, so sympy's and
   math-verify's ``except Exception`` blocks cannot swallow it). Elsewhere it does nothing
   and the caller relies on layer 1 (and on :class:`vispo.rewards.RewardRunner`, which kills
   a worker that exceeds its timeout).
"""

from __future__ import annotations

import math
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["MAX_SYMBOLIC_CHARS", "SymbolicTimeout", "deadline", "looks_safe_for_sympy"]

#: Answers longer than this are never handed to sympy.
MAX_SYMBOLIC_CHARS = 300
#: Deepest bracket nesting ({, (, [) handed to sympy: the LaTeX parser's cost grows quickly.
MAX_NESTING = 8
#: Most opening brackets handed to sympy (comma lists of brackets parse in ~20 ms each).
MAX_GROUPS = 30
#: Largest integer literal allowed inside an exponent of a purely numeric answer.
MAX_EXPONENT = 10_000
#: With variables, an exponent ``e`` over ``v`` variables may expand to ``C(e + v, v)`` terms;
#: sympy's simplification of (x+y+z)^20 (1,771 terms) already takes about a second.
MAX_EXPANSION_TERMS = 500
#: Longest digit run allowed next to a factorial or binomial (big factorials are slow).
MAX_COMBINATORIAL_DIGITS = 4

_DIGIT_RUN = re.compile(r"\d+")
_COMMAND = re.compile(r"\\[A-Za-z]+")


class SymbolicTimeout(BaseException):  # noqa: N818 (mirrors math-verify's TimeoutException)
    """Raised by :func:`deadline` when the symbolic comparison runs out of time."""


def _max_nesting(s: str) -> int:
    depth = best = 0
    for ch in s:
        if ch in "{([":
            depth += 1
            best = max(best, depth)
        elif ch in "})]":
            depth = max(0, depth - 1)
    return best


def _n_variables(s: str) -> int:
    """Distinct letters outside LaTeX command names (``\\frac``, ``\\sin`` do not count)."""
    return len({ch for ch in _COMMAND.sub(" ", s) if ch.isalpha() and ch.isascii()})


def _exponents(s: str) -> Iterator[str]:
    """Yield the text of every exponent in ``s``: the brace group or the token after ``^``."""
    i = s.find("^")
    while i >= 0:
        j = i + 1
        while j < len(s) and s[j] == " ":
            j += 1
        if j < len(s) and s[j] == "{":
            depth, k = 0, j
            while k < len(s):
                if s[k] == "{":
                    depth += 1
                elif s[k] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                k += 1
            yield s[j + 1 : k]
        elif j < len(s) and s[j] == "\\":
            k = j + 1
            while k < len(s) and s[k].isalpha():
                k += 1
            yield s[j:k]
        else:
            m = _DIGIT_RUN.match(s, j)
            yield m.group() if m else s[j : j + 1]
        i = s.find("^", i + 1)


def looks_safe_for_sympy(s: str) -> bool:
    """True if ``s`` is small and tame enough to parse and compare symbolically.

    Rejects: more than :data:`MAX_SYMBOLIC_CHARS` characters; bracket nesting deeper than
    :data:`MAX_NESTING` or more than :data:`MAX_GROUPS` brackets; power towers (an exponent
    that itself contains ``^``, ``!`` or a binomial); exponents with an integer above
    :data:`MAX_EXPONENT`, or, when the answer has variables, one whose multinomial expansion
    could exceed :data:`MAX_EXPANSION_TERMS` terms; factorials, binomials or products
    together with a power or with a number of more than :data:`MAX_COMBINATORIAL_DIGITS`
    digits. These bounds are far above what real final answers need and far below what makes
    sympy hang (each was measured: the rejected cases take seconds to forever).
    """
    if len(s) > MAX_SYMBOLIC_CHARS or _max_nesting(s) > MAX_NESTING:
        return False
    if sum(s.count(ch) for ch in "{([") > MAX_GROUPS:
        return False
    runs = _DIGIT_RUN.findall(s)
    n_vars = _n_variables(s)
    for exp in _exponents(s):
        if "^" in exp or "!" in exp or "binom" in exp or "choose" in exp:
            return False
        for run in _DIGIT_RUN.findall(exp):
            if len(run) > 5 or int(run) > MAX_EXPONENT:
                return False
            if n_vars and math.comb(int(run) + n_vars, n_vars) > MAX_EXPANSION_TERMS:
                return False
    combinatorial = "!" in s or "binom" in s or "choose" in s or "\\prod" in s
    if combinatorial and ("^" in s or any(len(r) > MAX_COMBINATORIAL_DIGITS for r in runs)):
        return False
    return True


def _can_use_alarm() -> bool:
    """SIGALRM is usable: main thread, POSIX, and nobody else's interval timer is running."""
    if (
        not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        return False
    return signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@contextmanager
def deadline(seconds: float) -> Iterator[bool]:
    """Raise :class:`SymbolicTimeout` inside the block once ``seconds`` have passed.

    Yields whether the deadline is actually enforced (see the module docstring). The previous
    SIGALRM handler is restored on exit, and the timer is always cancelled, also when the
    block raises.
    """
    if seconds <= 0 or not _can_use_alarm():
        yield False
        return

    fired = False

    def _on_alarm(signum, frame):  # noqa: ARG001 (signal handler signature)
        nonlocal fired
        if not fired:
            fired = True
            raise SymbolicTimeout(f"symbolic comparison exceeded {seconds:.1f} s")

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield True
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)
