"""vispo.data.templates: placeholders -> image items, built-ins, custom templates."""

from __future__ import annotations

import re

import pytest

from vispo.data import TEMPLATES, DataError, PromptTemplate, Sample, get_template

IMG = {"type": "image"}


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


def _sample(question: str, n_images: int = 1, **meta) -> Sample:
    return Sample(id="s1", images=[object()] * n_images, question=question, answer="4", meta=meta)


def test_placeholders_become_image_items_in_place():
    plain = TEMPLATES["plain"]
    assert plain.render(_sample("<image>Find x.")) == [
        {"role": "user", "content": [IMG, _text("Find x.")]}
    ]
    two = plain.render(_sample("Compare <image> and <image>, which is larger?", 2))
    assert two[0]["content"] == [
        _text("Compare "),
        IMG,
        _text(" and "),
        IMG,
        _text(", which is larger?"),
    ]
    # Trailing placeholder; surrounding whitespace at the ends is dropped.
    assert plain.render(_sample("  Look: <image>\n"))[0]["content"] == [_text("Look: "), IMG]


def test_without_placeholder_the_images_come_first():
    assert TEMPLATES["plain"].render(_sample("What colour?", 2))[0]["content"] == [
        IMG,
        IMG,
        _text("What colour?"),
    ]
    assert TEMPLATES["plain"].render(_sample("Text only.", 0))[0]["content"] == [
        _text("Text only.")
    ]


def test_placeholder_count_must_match_the_images():
    with pytest.raises(DataError, match=r"sample 's1'.*2 <image> placeholder\(s\).*1 image"):
        TEMPLATES["plain"].render(_sample("<image> vs <image>", 1))
    with pytest.raises(DataError, match=r"sample 's1'.*1 <image> placeholder\(s\).*0 image"):
        TEMPLATES["plain"].render(_sample("<image>?", 0))


def test_builtin_wordings():
    q = _sample("<image>What is the area?")
    reasoning = TEMPLATES["reasoning"].render(q)[0]["content"]
    assert reasoning[0] == IMG and len(reasoning) == 2
    text = reasoning[1]["text"]
    assert text.startswith("What is the area?\n")
    # The reference recipe: think inside <think> </think>, then the answer in \boxed{}.
    assert "<think> </think>" in text and "\\boxed{}" in text
    assert text.index("<think>") < text.index("\\boxed{}")
    assert get_template(None) is TEMPLATES["reasoning"]
    short = TEMPLATES["short"].render(_sample("what shape is it?"))[0]["content"]
    assert short == [IMG, _text("what shape is it? Answer in one word.")]


def test_system_prompt_and_meta_variables():
    tmpl = PromptTemplate(
        "[{{ meta.subject }}] {{ question }} ({{ n_images }} image{{ 's' if n_images != 1 }})",
        system="You are a careful {{ meta.subject }} tutor.",
    )
    msgs = tmpl.render(_sample("<image>Solve.", subject="geometry"))
    assert msgs[0] == {
        "role": "system",
        "content": [_text("You are a careful geometry tutor.")],
    }
    assert msgs[1] == {
        "role": "user",
        "content": [_text("[geometry] "), IMG, _text("Solve. (1 image)")],
    }


def test_template_sources_and_errors(tmp_path):
    inline = get_template("Q: {{ question }}")
    assert inline.render(_sample("hi"))[0]["content"] == [IMG, _text("Q: hi")]
    path = tmp_path / "mine.jinja"
    path.write_text("{{ question }}\nAnswer with a number.\n")
    from_file = get_template(str(path))
    assert from_file.render(_sample("How many?"))[0]["content"][1] == _text(
        "How many?\nAnswer with a number."
    )
    assert get_template(path).text == from_file.text  # PathLike too
    with pytest.raises(
        ValueError, match=r"unknown name 'resoning'.*\['plain', 'reasoning', 'short'\]"
    ):
        get_template("resoning")
    with pytest.raises(ValueError, match="not found"):
        get_template(str(tmp_path / "absent.jinja"))
    with pytest.raises(ValueError, match="invalid Jinja2 syntax"):
        PromptTemplate("{{ question ")
    with pytest.raises(DataError, match=r"template 'custom' on sample 's1'.*'topic' is undefined"):
        PromptTemplate("{{ question }} {{ topic }}").render(_sample("q"))


def test_answer_is_not_available_to_templates():
    with pytest.raises(DataError, match="'answer' is undefined"):
        PromptTemplate("{{ question }} {{ answer }}").render(_sample("q"))


@pytest.fixture(scope="module")
def qwen_processor():
    from vispo.models.tiny import build_tiny_processor

    return build_tiny_processor("qwen2_vl")


def test_items_render_through_a_real_chat_template(qwen_processor):
    msgs = TEMPLATES["short"].render(_sample("Is <image> brighter than <image>?", 2))
    text = qwen_processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    user = re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, re.S).group(1)
    assert user == f"Is {vision} brighter than {vision}? Answer in one word."
    assert text.endswith("<|im_start|>assistant\n")
