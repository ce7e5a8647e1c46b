"""Checks that keep one bad row from stopping a run: text, control tokens, image shape.

Every loader path (local files, saved Hugging Face folders, parquet, JSON/JSONL, ShareGPT
conversations, in-memory records, the built-in data sets) passes its samples through
:func:`clean_text`; :func:`check_image_shape` runs when images are validated at load time; and
:func:`vispo.data.filter_by_prompt_length` (which knows the model) neutralises the tokenizer's
own special tokens and skips a sample the processor refuses.

* **Text that is not valid Unicode** (a lone surrogate: what ``json`` makes of ``"\\ud800"``,
  and what invalid UTF-8 bytes in a JSON/JSONL file become, as they are read with
  ``surrogateescape``) cannot be encoded for the tokenizer: the sample is skipped
  (``bad_text``).
* **Chat-control and image tokens** written in a sample's text (``<|im_start|>``,
  ``<|image_pad|>``, ``<start_of_turn>``, ``<end_of_utterance>``, ``[INST]``, ...) would be
  tokenized as the real control tokens: a row could forge a chat turn, or make the processor
  count more image slots than images and fail. They are *neutralised*: a zero-width space
  (U+200B) is inserted after their first character, so the text reads the same and is
  tokenized as plain text. vispo's own placeholder (``<image>`` by default) is not touched: it
  marks where the sample's images go and is checked against their number.
* **Images with an extreme aspect ratio** (above :data:`MAX_ASPECT_RATIO`, e.g. 600x2 pixels)
  are refused by processors such as Qwen-VL's: the sample is skipped (``bad_image``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "MAX_ASPECT_RATIO",
    "ZWSP",
    "check_image_shape",
    "clean_text",
    "neutralise",
    "unicode_problem",
]

#: Longest side / shortest side above which an image is refused (Qwen-VL's processor limit).
MAX_ASPECT_RATIO = 200.0
#: Inserted after a control token's first character.
ZWSP = "\u200b"

#: Control and image tokens of the supported chat templates, whatever the model.
_CONTROL = re.compile(
    r"<\|[^\s|<>]{1,48}\|>"  # ChatML / Qwen / Phi / Llama 3: <|im_start|>, <|image_pad|>, ...
    r"|<(?:start|end)_of_(?:turn|image)>|<image_soft_token>"  # Gemma 3
    r"|<end_of_utterance>|<fake_token_around_image>|<global-img>|<row_\d+_col_\d+>"  # Idefics3
    r"|\[/?INST\]|</?s>|<(?:bos|eos|pad)>"  # Llama 2 / Mistral / LLaVA, Gemma
)


def unicode_problem(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8 (a lone surrogate), or None if it can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"invalid Unicode at character {e.start} ({text[e.start]!r})"
    return None


def neutralise(text: str, tokens: Iterable[str] = (), *, keep: str = "<image>") -> tuple[str, int]:
    """``text`` with every control token made plain text; returns ``(text, n_neutralised)``.

    ``tokens`` adds exact strings (a tokenizer's own special tokens) to the built-in patterns;
    ``keep`` (the image placeholder) is never changed.
    """
    extra = sorted({t for t in tokens if t and t != keep and len(t) > 1}, key=len, reverse=True)
    pattern = _CONTROL
    if extra:
        pattern = re.compile("|".join([*map(re.escape, extra), _CONTROL.pattern]))
    count = 0

    def fix(m: re.Match) -> str:
        nonlocal count
        if m.group() == keep:
            return m.group()
        count += 1
        return m.group()[0] + ZWSP + m.group()[1:]

    return pattern.sub(fix, text), count


def clean_text(
    sample_id: str, fields: dict[str, object], tokens: Iterable[str] = (), *, keep: str = "<image>"
) -> tuple[dict[str, object], int, str | None]:
    """Check and neutralise the text ``fields`` of one sample.

    Returns ``(fields, n_neutralised, problem)``: the fields with control tokens neutralised
    (non-strings untouched), how many were, and a message when a field is not valid Unicode
    (the sample must then be skipped with reason ``bad_text``).
    """
    out: dict[str, object] = {}
    total = 0
    for name, value in fields.items():
        if isinstance(value, str):
            problem = unicode_problem(value)
            if problem:
                return fields, 0, f"sample {sample_id!r}: the {name} has {problem}"
            value, n = neutralise(value, tokens, keep=keep)
            total += n
        out[name] = value
    return out, total, None


def check_image_shape(size: tuple[int, int], sample_id: str) -> str | None:
    """A message if an image of ``size`` (width, height) is too elongated, else None."""
    w, h = size
    ratio = max(w, h) / max(1, min(w, h))
    if ratio > MAX_ASPECT_RATIO:
        return (
            f"sample {sample_id!r}: image of {w}x{h} pixels has an aspect ratio of {ratio:.0f}:1, "
            f"above {MAX_ASPECT_RATIO:.0f}:1 (processors such as Qwen-VL's refuse it)"
        )
    return None
