"""Prompt templates: a sample in, chat messages with image content items out.

A template is a small Jinja2 text rendered with the sample's fields (``question``, ``meta``,
``n_images``, ``id``; never the answer). The rendered text is then split at the ``<image>``
placeholders, each of which becomes a ``{"type": "image"}`` content item at that position, so a
question such as ``"<image>Find x."`` or ``"Compare <image> and <image>."`` keeps its images where
the data set put them. A text without placeholders gets all its images first, which is what the
Qwen-VL, LLaVA and Idefics chat templates expect. The processor's own chat template then turns the
items into its image tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

import jinja2
import jinja2.sandbox

from vispo.data.sample import DataError, Sample

#: The instruction of the reference recipe (algorithms.md section 9), in vispo's own words.
REASONING_INSTRUCTION = (
    "Reason about the question step by step inside <think> </think> tags first, "
    "then write your final answer inside \\boxed{}."
)

_ENV = jinja2.sandbox.SandboxedEnvironment(
    undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False
)


class PromptTemplate:
    """Render samples into chat messages.

    Args:
        text: a Jinja2 template; variables ``question``, ``meta``, ``n_images`` and ``id``.
        system: optional system prompt (plain text, also rendered with Jinja2).
        placeholder: the marker in the rendered text that stands for one image.
        name: a label used in messages and logs.
    """

    def __init__(
        self,
        text: str,
        system: str | None = None,
        *,
        placeholder: str = "<image>",
        name: str = "custom",
    ) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("PromptTemplate: text must be a non-empty string")
        if not placeholder:
            raise ValueError("PromptTemplate: placeholder must be a non-empty string")
        try:
            self._template = _ENV.from_string(text)
            self._system = _ENV.from_string(system) if system else None
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"PromptTemplate {name!r}: invalid Jinja2 syntax: {exc}") from None
        self.text = text
        self.system = system
        self.placeholder = placeholder
        self.name = name

    def __repr__(self) -> str:
        return f"PromptTemplate(name={self.name!r}, text={self.text!r}, system={self.system!r})"

    def render_text(self, sample: Sample) -> str:
        """The rendered user text, placeholders still in it."""
        context = {
            "question": sample.question,
            "meta": sample.meta,
            "n_images": len(sample.images),
            "id": sample.id,
        }
        try:
            return self._template.render(**context).strip()
        except jinja2.UndefinedError as exc:
            raise DataError(
                f"template {self.name!r} on sample {sample.id!r}: {exc} "
                "(available: question, meta, n_images, id)"
            ) from None

    def render(self, sample: Sample) -> list[dict]:
        """Chat messages (HF format) for ``sample``: optional system turn, then the user turn."""
        text = self.render_text(sample)
        content = split_placeholders(text, len(sample.images), self.placeholder, sample.id)
        messages: list[dict] = []
        if self._system is not None:
            system_text = self._system.render(meta=sample.meta, id=sample.id).strip()
            messages.append({"role": "system", "content": [{"type": "text", "text": system_text}]})
        messages.append({"role": "user", "content": content})
        return messages


def split_placeholders(
    text: str, n_images: int, placeholder: str = "<image>", sample_id: str = "?"
) -> list[dict]:
    """Content items for ``text``: each placeholder becomes an image item in place.

    With no placeholder in ``text`` the ``n_images`` image items come first. Text between
    placeholders is kept verbatim (spaces included); whitespace-only pieces are dropped and the
    text is stripped at its two ends.
    """
    pieces = text.split(placeholder)
    n_placeholders = len(pieces) - 1
    if n_placeholders == 0:
        items: list[dict] = [{"type": "image"} for _ in range(n_images)]
        if text.strip():
            items.append({"type": "text", "text": text.strip()})
        return items
    if n_placeholders != n_images:
        raise DataError(
            f"sample {sample_id!r}: the prompt has {n_placeholders} {placeholder} placeholder(s) "
            f"but the sample has {n_images} image(s)"
        )
    pieces[0] = pieces[0].lstrip()
    pieces[-1] = pieces[-1].rstrip()
    items = []
    for i, piece in enumerate(pieces):
        if i > 0:
            items.append({"type": "image"})
        if piece.strip():
            items.append({"type": "text", "text": piece})
    return items


#: Built-in templates by name; ``"reasoning"`` is the default.
TEMPLATES: dict[str, PromptTemplate] = {
    "reasoning": PromptTemplate(
        "{{ question }}\n" + REASONING_INSTRUCTION,  # '{}' alone is not a Jinja delimiter
        name="reasoning",
    ),
    "short": PromptTemplate("{{ question }} Answer in one word.", name="short"),
    "plain": PromptTemplate("{{ question }}", name="plain"),
}

DEFAULT_TEMPLATE = "reasoning"


def get_template(spec: str | os.PathLike | PromptTemplate | None = None) -> PromptTemplate:
    """Resolve a template given as a built-in name, a ``.jinja`` file, inline Jinja or an object.

    An inline string must contain ``{{`` (so that a mistyped built-in name is an error, not a
    literal prompt); a path must exist and end in ``.jinja``, ``.j2`` or ``.txt``.
    """
    if spec is None:
        return TEMPLATES[DEFAULT_TEMPLATE]
    if isinstance(spec, PromptTemplate):
        return spec
    if isinstance(spec, os.PathLike) or (
        isinstance(spec, str) and spec.endswith((".jinja", ".jinja2", ".j2", ".txt"))
    ):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"template: file {str(path)!r} not found")
        return PromptTemplate(path.read_text(encoding="utf-8"), name=path.name)
    if not isinstance(spec, str):
        raise TypeError(f"template: expected a name, path or PromptTemplate, got {type(spec)}")
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if "{{" in spec:
        return PromptTemplate(spec, name="inline")
    raise ValueError(
        f"template: unknown name {spec!r}; built-ins are {sorted(TEMPLATES)}, or pass a "
        "Jinja2 string containing {{ question }} or a .jinja file path"
    )
