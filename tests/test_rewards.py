"""Verifiers, answer extraction, format reward, composition, registry and reward-file loading.

Expected values are written by hand (one row per case, with the reason where it is a
decision); the format reward is also checked against the spec's own regex on random strings.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vispo.rewards import (
    REWARDS,
    CompositeReward,
    FileReward,
    RewardResult,
    answers_match,
    choice_accuracy,
    choice_letter,
    combine_outputs,
    exact_match,
    extract_answer,
    extract_boxed,
    format_reward,
    load_reward_fn,
    math_accuracy,
    normalize_answer,
    reference_reward,
    resolve_reward,
    yes_no_accuracy,
)
from vispo.rewards._guard import SymbolicTimeout, deadline, looks_safe_for_sympy

# --------------------------------------------------------------------------------------------
# math_accuracy: (completion, gold, expected)
# --------------------------------------------------------------------------------------------

MATH_CASES = [
    # fractions and decimals
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{1/2}", "\\dfrac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "1/2", 1.0),
    ("\\boxed{\\tfrac{3}{4}}", "0.75", 1.0),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac12}", "0.5", 1.0),
    ("\\boxed{0.33}", "\\frac{1}{3}", 0.0),  # no approximate answers
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", 1.0),
    ("\\boxed{\\frac{-1}{2}}", "-\\frac{1}{2}", 1.0),
    ("\\boxed{-0.25}", "-\\frac{1}{4}", 1.0),
    ("\\boxed{3.0}", "3", 1.0),
    ("\\boxed{3.01}", "3", 0.0),
    ("\\boxed{1e3}", "1000", 1.0),
    # negative numbers
    ("\\boxed{-3}", "-3", 1.0),
    ("\\boxed{3}", "-3", 0.0),
    ("\\boxed{-3}", "3", 0.0),
    ("\\boxed{−3}", "-3", 1.0),  # unicode minus
    # percentages: 50% equals 50 and 0.5, but 50 does not equal 0.5
    ("\\boxed{50\\%}", "50\\%", 1.0),
    ("\\boxed{50\\%}", "0.5", 1.0),
    ("\\boxed{0.5}", "50\\%", 1.0),
    ("\\boxed{50}", "50\\%", 1.0),
    ("\\boxed{50}", "0.5", 0.0),
    ("\\boxed{25\\%}", "50\\%", 0.0),
    # roots
    ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("\\boxed{3\\sqrt{2}}", "\\sqrt{18}", 1.0),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{3}", 0.0),
    # pi
    ("\\boxed{2\\pi}", "2\\pi", 1.0),
    ("\\boxed{\\pi \\cdot 2}", "2\\pi", 1.0),
    ("\\boxed{\\frac{\\pi}{2}}", "\\pi/2", 1.0),
    ("\\boxed{3.14}", "\\pi", 0.0),
    # intervals
    ("\\boxed{(1, 2]}", "(1,2]", 1.0),
    ("\\boxed{[1, 2]}", "(1,2]", 0.0),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3)", 1.0),
    ("\\boxed{[0,\\infty)}", "[0, \\infty)", 1.0),
    ("\\boxed{(-\\infty, 2]}", "(-\\infty, 2)", 0.0),
    ("\\boxed{[1,2]\\cup[3,4]}", "[1,2] \\cup [3,4]", 1.0),
    # sets
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3,2,1\\}", 1.0),
    ("\\boxed{\\{1,2\\}}", "\\{1,2,3\\}", 0.0),
    # thousands separators
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{1000}", "1,000", 1.0),
    ("\\boxed{1{,}234{,}567}", "1234567", 1.0),
    ("\\boxed{12,345.5}", "12345.5", 1.0),
    ("\\boxed{1,001}", "1000", 0.0),
    # units
    ("\\boxed{5 \\text{ cm}}", "5", 1.0),
    ("\\boxed{5}", "5\\text{ cm}", 1.0),
    ("\\boxed{12 \\mathrm{cm}^2}", "12", 1.0),
    ("\\boxed{7 \\text{ units}}", "7", 1.0),
    ("\\boxed{5 cm}", "6 cm", 0.0),
    # degrees
    ("\\boxed{30^\\circ}", "30", 1.0),
    ("\\boxed{30}", "30^{\\circ}", 1.0),
    ("\\boxed{30°}", "30", 1.0),
    ("\\boxed{30 \\text{ degrees}}", "30", 1.0),
    ("\\boxed{45^\\circ}", "30^\\circ", 0.0),
    # short text answers: case- and markup-insensitive
    ("\\boxed{circle}", "circle", 1.0),
    ("\\boxed{\\text{Circle}}", "circle", 1.0),
    ("\\boxed{CIRCLE}", "\\text{circle}", 1.0),
    ("\\boxed{\\textbf{Dark Blue}}", "dark blue", 1.0),
    ("\\boxed{a circle.}", "circle", 1.0),
    ("\\boxed{Yes}", "yes", 1.0),
    ("\\boxed{no}", "yes", 0.0),
    ("\\boxed{triangle}", "circle", 0.0),
    ("\\boxed{cilcre}", "circle", 0.0),  # math-verify alone says 1: c*i*r*c*l*e is commutative
    # choice letters
    ("\\boxed{B}", "B", 1.0),
    ("\\boxed{(B)}", "B", 1.0),
    ("\\boxed{B.}", "B", 1.0),
    ("\\boxed{\\text{B}}", "(B)", 1.0),
    ("\\boxed{(B) 45^\\circ}", "B", 1.0),
    ("\\boxed{B: yes}", "B", 1.0),
    ("\\boxed{b}", "B", 1.0),
    ("\\boxed{option B}", "B", 1.0),
    ("\\boxed{B}", "(B) 45", 1.0),
    ("\\boxed{A}", "\\text{(A)}", 1.0),
    ("\\boxed{C}", "B", 0.0),
    ("\\boxed{(C) 45}", "B", 0.0),
    # algebra
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    ("\\boxed{x^2+1}", "x^2+2x+1", 0.0),
    ("\\boxed{x=2}", "2", 1.0),
    ("\\boxed{2x}", "2", 0.0),
    ("\\boxed{5x}", "5", 0.0),  # a variable is not a unit
    ("\\boxed{10^{3}}", "1000", 1.0),
    ("\\boxed{2^{10}}", "1024", 1.0),
    # extraction: which text is the answer
    ("$\\boxed{\\frac{\\sqrt{3}}{2}}$", "\\frac{\\sqrt3}{2}", 1.0),
    ("\\fbox{7}", "7", 1.0),
    ("\\boxed{7}", "\\boxed{7}", 1.0),  # a boxed gold answer is unwrapped
    ("\\boxed 5", "5", 1.0),
    ("first \\boxed{3}, finally \\boxed{5}", "5", 1.0),
    ("first \\boxed{5}, finally \\boxed{3}", "5", 0.0),  # the last box counts
    ("\\boxed{5} and then \\boxed{5", "5", 0.0),  # last box unclosed: no answer
    ("\\boxed{}", "5", 0.0),
    ("\\boxed{4}. So the answer is 5.", "5", 0.0),  # a box beats "answer is"
    ("The answer is 42.", "42", 1.0),
    ("<think>hmm</think> Answer: (C)", "C", 1.0),
    ("**Answer:** 12", "12", 1.0),
    ("42", "42", 1.0),
    ("<think>3 or 4?</think>\n4", "4", 1.0),
    ("After a long and careful look at the figure I would estimate something like 42", "42", 0.0),
]


def test_there_are_at_least_60_math_cases():
    assert len(MATH_CASES) >= 60
    assert {e for _, _, e in MATH_CASES} == {0.0, 1.0}


@pytest.mark.parametrize(("completion", "gold", "expected"), MATH_CASES)
def test_math_accuracy_cases(completion, gold, expected):
    assert math_accuracy(completion, gold) == expected


def test_math_accuracy_numeric_gold_and_require_boxed():
    assert math_accuracy("\\boxed{7}", 7) == 1.0
    assert math_accuracy("\\boxed{0.5}", 0.5) == 1.0
    assert math_accuracy("42", "42") == 1.0
    assert math_accuracy("42", "42", require_boxed=True) == 0.0
    assert math_accuracy("The answer is 42.", "42", require_boxed=True) == 0.0
    assert math_accuracy("\\boxed{42}", "42", require_boxed=True) == 1.0


def test_math_accuracy_rejects_bad_input_types():
    with pytest.raises(TypeError, match="completion"):
        math_accuracy(None, "1")
    with pytest.raises(TypeError, match="gold answer"):
        math_accuracy("\\boxed{1}", ["1"])
    with pytest.raises(TypeError, match="gold answer"):
        math_accuracy("\\boxed{1}", True)


def test_answers_match_is_the_comparison_used():
    assert answers_match("\\frac{1}{2}", "0.5")
    assert not answers_match("", "0.5")
    assert not answers_match("1", "")
    assert not answers_match("1" * 1001, "1" * 1001)  # longer than MAX_ANSWER_CHARS


# --------------------------------------------------------------------------------------------
# Extraction and normalisation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{5}", "5"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("a \\boxed{1} b \\boxed{2} c", "2"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not count
        ("\\boxed{a\\\\}b}", "a\\\\"),  # \\ is a line break, the } after it closes
        ("\\boxed{}", ""),
        ("\\boxed 5", "5"),
        ("\\boxed 52 apples", "52"),
        ("\\boxed  {7}", "7"),
        ("\\fbox{x}", "x"),
        ("\\boxed{1} \\fbox{2}", "2"),
        ("\\boxed{\\boxed{5}}", "5"),  # the last command is the inner one
        ("\\boxed{2}\\boxedfoo{3}", "2"),  # \boxedfoo is another command
        ("no box here", None),
        ("\\boxed{5", None),
        ("\\boxed{1} then \\boxed{", None),
        ("\\boxed", None),
        ("\\boxed ", None),
        ("\\boxedfoo{3}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_deep_nesting_and_type_error():
    depth = 10_000
    inner = "{" * depth + "1" + "}" * depth
    t0 = time.perf_counter()
    assert extract_boxed("x \\boxed{" + inner + "} y") == inner
    assert extract_boxed("\\boxed{" + "{" * depth + "1") is None
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(TypeError):
        extract_boxed(b"\\boxed{1}")


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("\\boxed{7}", "7"),
        ("<think>long</think> the answer is 12.", "12"),
        ("so the final Answer: **B**", "B"),
        ("Answer: 1\nanswer is 2\nok", "2"),
        ("<think>answer is 3</think>4", "4"),  # only the part after </think> is searched
        ("  circle  ", "circle"),
        ("x" * 65, None),  # longer than SHORT_ANSWER_CHARS
        ("two\nlines", None),
        ("", None),
        ("<think>only thinking</think>", None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_extract_answer_strict_mode():
    assert extract_answer("the answer is 12", allow_fallback=False) is None
    assert extract_answer("\\boxed{12}", allow_fallback=False) == "12"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\\text{Circle}", "circle"),
        ("30^\\circ", "30"),
        ("30^{\\circ}", "30"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("1,234,567", "1234567"),
        ("1{,}000", "1000"),
        ("$x + 1$.", "x+1"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("\\textbf{\\text{Big}} Dog", "bigdog"),
        ("50\\%", "50%"),
        ("1,2", "1,2"),  # not a thousands separator
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("text", "gold", "expected"),
    [
        ("B", False, "B"),
        ("(b)", False, "B"),
        ("b", True, None),  # a lower-case gold letter is a variable
        ("\\text{(C)}", True, "C"),
        ("D.", True, "D"),
        ("(E) 7 cm", True, "E"),
        ("Choice (a)", False, "A"),
        ("A circle", False, None),  # needs punctuation after the letter
        ("K", False, None),  # only A-J
        ("12", False, None),
    ],
)
def test_choice_letter(text, gold, expected):
    assert choice_letter(text, gold=gold) == expected


# --------------------------------------------------------------------------------------------
# Other verifiers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("\\boxed{B}", "B", 1.0),
        ("\\boxed{(B) 3}", "(B)", 1.0),
        ("The answer is (D).", "D", 1.0),
        ("\\boxed{C}", "B", 0.0),
        ("no letter given at all, just prose that goes on for a while", "B", 0.0),
    ],
)
def test_choice_accuracy(completion, gold, expected):
    assert choice_accuracy(completion, gold) == expected


def test_choice_accuracy_rejects_non_letter_gold():
    with pytest.raises(ValueError, match="not an option letter"):
        choice_accuracy("\\boxed{B}", "42")


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("\\boxed{Yes}", "yes", 1.0),
        ("\\boxed{\\text{YES}}", "Yes", 1.0),
        ("Yes, it is.", "yes", 1.0),
        ("no", "No", 1.0),
        ("\\boxed{no}", "yes", 0.0),
        ("\\boxed{maybe}", "yes", 0.0),
        ("\\boxed{Nope}", "no", 0.0),
    ],
)
def test_yes_no_accuracy(completion, gold, expected):
    assert yes_no_accuracy(completion, gold) == expected


def test_yes_no_accuracy_rejects_other_gold():
    with pytest.raises(ValueError, match="not yes/no"):
        yes_no_accuracy("yes", "circle")


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("\\boxed{Circle}", "Circle", 1.0),
        ("\\boxed{ Circle }", "Circle", 1.0),
        ("\\boxed{circle}", "Circle", 0.0),  # case matters
        ("\\boxed{0.5}", "\\frac{1}{2}", 0.0),  # no math
        ("blue", "blue", 1.0),
    ],
)
def test_exact_match(completion, gold, expected):
    assert exact_match(completion, gold) == expected


# --------------------------------------------------------------------------------------------
# format_reward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>reasoning</think> so \\boxed{5}", 1.0),
        ("<think>\nmulti\nline\n</think>\n\\boxed{x}\ndone", 1.0),
        ("<think></think>\\boxed{}", 1.0),
        ("< think >a< / think >\\boxed{5}", 1.0),  # whitespace around < > / is normalised
        ("  <think>a</think>\\boxed{5}", 1.0),
        ("<think>a</think> 5", 0.0),  # no box
        ("<think>a \\boxed{5}</think>", 0.0),  # box inside the thinking only
        ("<think>a</think>\\boxed{5", 0.0),  # box never closed
        ("a<think>b</think>\\boxed{5}", 0.0),  # must start with <think>
        ("<think>a\\boxed{5}", 0.0),  # thinking never closed
        ("\\boxed{5}", 0.0),
        ("<think>a</think>\\boxed {5}", 0.0),  # the spec wants "\boxed{"
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


_SPEC_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)


def _format_by_spec_regex(text: str) -> float:
    """algorithms.md section 9, literally: normalise, then full-match the regex."""
    text = re.sub(r"\s*([<>/])\s*", r"\1", text)
    return 1.0 if _SPEC_FORMAT.fullmatch(text) else 0.0


_TOKENS = [
    "<think>",
    "</think>",
    "\\boxed{",
    "}",
    "{",
    "a",
    " ",
    "\n",
    "<",
    ">",
    "/",
    "< think >",
    "</ think>",
]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(_TOKENS), max_size=12))
def test_format_reward_equals_spec_regex(tokens):
    text = "".join(tokens)
    assert format_reward(text) == _format_by_spec_regex(text)


# --------------------------------------------------------------------------------------------
# Adversarial inputs: each call returns quickly
# --------------------------------------------------------------------------------------------

ADVERSARIAL = {
    "nested_braces_10k": "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "one_megabyte": "word " * 200_000 + "\\boxed{5}",
    "one_megabyte_unclosed": "\\boxed{" + "7" * 1_000_000,
    "many_unclosed_boxes": "\\boxed{" * 100_000,
    "many_think_tags": "<think>" + "</think>" * 100_000,
    "whitespace_run": "<think>" + " " * 1_000_000 + "x",
    "power_tower": "\\boxed{9^{9^{9^{9}}}}",
    "huge_exponent": "\\boxed{10^{10^{10}}}",
    "big_factorial": "\\boxed{(10^{6})!}",
    "binomial_expansion": "\\boxed{(x+1)^{2023}}",
    "deep_fracs": "\\boxed{" + "\\frac{1}{" * 50 + "2" + "}" * 50 + "}",
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_inputs_return_quickly(name):
    text = ADVERSARIAL[name]
    t0 = time.perf_counter()
    assert math_accuracy(text, "5") in (0.0, 1.0)
    assert format_reward(text) in (0.0, 1.0)
    assert exact_match(text, "5") in (0.0, 1.0)
    assert choice_accuracy(text, "B") == 0.0
    assert time.perf_counter() - t0 < 5.0


def test_adversarial_values_are_correct():
    assert math_accuracy(ADVERSARIAL["one_megabyte"], "5") == 1.0
    assert math_accuracy(ADVERSARIAL["power_tower"], "5") == 0.0
    assert format_reward(ADVERSARIAL["many_think_tags"]) == 0.0


@pytest.mark.parametrize(
    "name", ["power_tower", "huge_exponent", "big_factorial", "binomial_expansion"]
)
def test_pathological_latex_returns_quickly_outside_the_main_thread(name):
    """No signals in a worker thread: the pre-screen alone must keep sympy away from these."""
    results: list[float] = []
    worker = threading.Thread(target=lambda: results.append(math_accuracy(ADVERSARIAL[name], "5")))
    worker.daemon = True
    t0 = time.perf_counter()
    worker.start()
    worker.join(5.0)
    assert not worker.is_alive()
    assert results == [0.0]
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize(
    ("latex", "safe"),
    [
        ("\\frac{\\sqrt{3}}{2}", True),
        ("2^{2023}-1", True),  # big numeric power: fast in Python
        ("(x+1)^{40}", True),  # 41 terms
        ("(x+y+z)^{20}", False),  # 1,771 terms
        ("(x+1)^{2023}", False),
        ("9^{9^{9}}", False),
        ("10^{100000}", False),
        ("120!", True),
        ("(10^{6})!", False),
        ("123456!", False),
        ("\\binom{10}{3}", True),
        ("{" * 9 + "1" + "}" * 9, False),
        (",".join(["[1]"] * 31), False),  # 31 brackets
        ("1+" * 150 + "1", False),  # over MAX_SYMBOLIC_CHARS
    ],
)
def test_looks_safe_for_sympy(latex, safe):
    assert looks_safe_for_sympy(latex) is safe


def test_deadline_interrupts_python_code_and_restores_the_handler():
    marker = signal.getsignal(signal.SIGALRM)
    t0 = time.perf_counter()
    with pytest.raises(SymbolicTimeout), deadline(0.2) as enforced:
        assert enforced
        while True:
            pass
    assert 0.15 < time.perf_counter() - t0 < 2.0
    assert signal.getsignal(signal.SIGALRM) is marker
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_deadline_is_inert_outside_the_main_thread():
    seen: list[bool] = []

    def body():
        with deadline(0.05) as enforced:
            seen.append(enforced)
            time.sleep(0.1)  # would raise if a timer were armed

    worker = threading.Thread(target=body)
    worker.start()
    worker.join(2.0)
    assert seen == [False]


def test_symbolic_budget_cuts_math_verify_short():
    """A pair that needs sympy is equal with a normal budget and cut off with a 1 ms one."""
    assert answers_match("(y+7)^{2}", "y^2+14y+49")
    t0 = time.perf_counter()
    assert not answers_match("(w+5)^{2}", "w^2+10w+25", timeout_s=0.001)
    assert time.perf_counter() - t0 < 1.0


# --------------------------------------------------------------------------------------------
# Composition and registry
# --------------------------------------------------------------------------------------------


def test_reference_reward_weights_and_components():
    reward = reference_reward()
    assert reward.weights == {"accuracy": 0.9, "format": 0.1}
    completions = [
        "<think>ok</think> \\boxed{5}",  # right and formatted: 0.9 + 0.1
        "\\boxed{5}",  # right, no thinking: 0.9
        "<think>ok</think> \\boxed{4}",  # wrong, formatted: 0.1
        "nothing useful here, a long rambling answer without any final result at all",  # 0
    ]
    result = reward.score(completions, ["5"] * 4, question=["q"] * 4)
    assert result.total == pytest.approx([1.0, 0.9, 0.1, 0.0])
    assert result.components == {"accuracy": [1.0, 1.0, 0.0, 0.0], "format": [1.0, 0.0, 1.0, 0.0]}
    assert result.n_errors == 0
    metrics = result.metrics()
    assert metrics["reward/mean"] == pytest.approx(0.5)
    # population std of [1, 0.9, 0.1, 0]: deviations 0.5, 0.4, -0.4, -0.5
    assert metrics["reward/std"] == pytest.approx((0.82 / 4) ** 0.5)
    assert metrics["reward/accuracy/mean"] == 0.5
    assert metrics["reward/format/mean"] == 0.5
    assert reward(completions[:1], ["5"]) == [{"accuracy": 1.0, "format": 1.0}]


def test_composite_reward_validation():
    with pytest.raises(ValueError, match="at least one"):
        CompositeReward({})
    with pytest.raises(ValueError, match="component name"):
        CompositeReward({"a/b": (math_accuracy, 1.0)})
    with pytest.raises(TypeError, match="not callable"):
        CompositeReward({"a": ("math", 1.0)})
    with pytest.raises(TypeError, match="weight"):
        CompositeReward({"a": (math_accuracy, "1")})
    with pytest.raises(ValueError, match="finite"):
        CompositeReward({"a": (math_accuracy, float("nan"))})
    with pytest.raises(TypeError, match=r"\(fn, weight\)"):
        CompositeReward({"a": math_accuracy})
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        reference_reward()(["a", "b"], ["a"])


def test_combine_outputs_weights_missing_components_and_failures():
    result = combine_outputs(
        [{"acc": 1.0, "fmt": 0.5}, 0.25, None, {"fmt": 1.0}], {"acc": 2.0}
    )  # fmt has the default weight 1
    assert result.total == [2.5, 0.25, 0.0, 1.0]
    assert result.components == {"acc": [1.0, 0.0, 0.0, 0.0], "fmt": [0.5, 0.0, 0.0, 1.0]}
    assert result.n_errors == 1
    assert RewardResult(total=[]).metrics() == {}


def test_registry():
    assert set(REWARDS) == {"reference", "math", "format", "choice", "yesno", "exact"}
    completions = ["<think>t</think>\\boxed{B}"]
    expected = {
        "reference": 1.0,
        "math": 1.0,
        "format": 1.0,
        "choice": 1.0,
        "yesno": None,  # "B" is not a yes/no gold answer
        "exact": 1.0,
    }
    for name, value in expected.items():
        reward = REWARDS[name]()
        assert isinstance(reward, CompositeReward)
        if value is None:
            with pytest.raises(ValueError):
                reward.score(completions, ["B"])
        else:
            assert reward.score(completions, ["B"]).total == [value]
    assert REWARDS["math"]().weights == {"accuracy": 1.0}
    assert REWARDS["format"]().weights == {"format": 1.0}
    assert REWARDS["reference"](accuracy_weight=1.0, format_weight=0.5).weights == {
        "accuracy": 1.0,
        "format": 0.5,
    }


def test_resolve_reward(tmp_path):
    assert resolve_reward("math").weights == {"accuracy": 1.0}
    assert resolve_reward(len) is len
    path = tmp_path / "r.py"
    path.write_text("def f(completions, answers, **kw):\n    return [1.0] * len(completions)\n")
    assert resolve_reward(f"{path}:f")(["a", "b"], ["x", "y"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        resolve_reward("nope")
    with pytest.raises(TypeError):
        resolve_reward(3)


# --------------------------------------------------------------------------------------------
# load_reward_fn
# --------------------------------------------------------------------------------------------


def test_load_reward_fn_loads_exactly_that_file(tmp_path):
    # Two files with the same name in different folders, one named like a stdlib module.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    code = "def reward(completions, answers, **kw):\n    return [{v}] * len(completions)\n"
    (tmp_path / "a" / "json.py").write_text(code.format(v=1.0))
    (tmp_path / "b" / "json.py").write_text(code.format(v=2.0))
    fa = load_reward_fn(f"{tmp_path / 'a' / 'json.py'}:reward")
    fb = load_reward_fn(f"{tmp_path / 'b' / 'json.py'}:reward")
    assert fa(["x"], ["y"]) == [1.0]
    assert fb(["x", "x"], ["y", "y"]) == [2.0, 2.0]
    assert isinstance(fa, FileReward) and fa.__name__ == "reward"
    assert sys.modules["json"] is json  # the stdlib module is untouched
    assert str(tmp_path / "a") not in sys.path


def test_load_reward_fn_pickles_by_path(tmp_path):
    import pickle

    path = tmp_path / "r.py"
    path.write_text("WEIGHTS = 3\ndef f(c, a, **kw):\n    return [float(WEIGHTS)] * len(c)\n")
    fn = load_reward_fn(f"{path}:f")
    clone = pickle.loads(pickle.dumps(fn))
    assert clone is not fn and clone(["x"], ["y"]) == [3.0]
    assert fn.weights is None


def test_load_reward_fn_errors(tmp_path):
    good = tmp_path / "good.py"
    good.write_text("X = 1\ndef helper(c, a):\n    return []\n")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('bad import-time code')\n")
    with pytest.raises(FileNotFoundError, match="missing.py"):
        load_reward_fn(f"{tmp_path / 'missing.py'}:f")
    with pytest.raises(AttributeError, match="defines no 'nope'; callables there: helper"):
        load_reward_fn(f"{good}:nope")
    with pytest.raises(TypeError, match="not a callable"):
        load_reward_fn(f"{good}:X")
    with pytest.raises(ValueError, match="path/to/file.py:function"):
        load_reward_fn(str(good))
    with pytest.raises(ValueError, match="not a .py file"):
        load_reward_fn(f"{tmp_path / 'r.txt'}:f")
    with pytest.raises(ImportError, match="bad import-time code"):
        load_reward_fn(f"{broken}:f")
    with pytest.raises(TypeError):
        load_reward_fn(None)
