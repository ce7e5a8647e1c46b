"""A small byte-level BPE tokenizer trained offline, in code, for the tiny test models.

Nothing is downloaded: the training corpus is generated here from word lists and templates
(English words, numbers, LaTeX/math, the ``<think>``/``\\boxed{}`` answer format and the
easy-vqa vocabulary), and the BPE is trained with the ``tokenizers`` library. The same seed
always gives the same tokenizer. Training takes a fraction of a second, and the result is
cached in-process (as JSON; every call still returns a fresh, independent tokenizer object,
because processors such as Idefics3's mutate the tokenizer they are given).
"""

from __future__ import annotations

import functools
import json
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Special tokens, in id order (ids 0..len-1). One tokenizer serves every tiny architecture, so
# it carries the image placeholders of the Qwen-VL family and of Idefics3/SmolVLM.
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # end of a turn, the EOS for generation
QWEN_IMAGE_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
IDEFICS3_IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", "<global-img>")
END_OF_UTTERANCE = "<end_of_utterance>"
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    IM_START,
    IM_END,
    *QWEN_IMAGE_TOKENS,
    *IDEFICS3_IMAGE_TOKENS,
    END_OF_UTTERANCE,
)
# Atomic but NOT special: they must survive `skip_special_tokens=True` decoding, because the
# format reward reads them from the decoded response.
THINK_TOKENS: tuple[str, ...] = ("<think>", "</think>")

BASE_VOCAB_SIZE = 1024  # upper bound for the trained part; the corpus decides the exact size
EXTRA_TOKEN = "<|extra_{}|>"  # plain padding tokens (never produced by encoding)

# ChatML; an image content item becomes the architecture's image placeholder, which the
# processor then expands to the right number of image tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ 'IMAGE_PLACEHOLDER' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
IMAGE_PLACEHOLDERS = {
    "qwen": "<|vision_start|><|image_pad|><|vision_end|>",
    "idefics3": "<image>",
}

_WORDS = """
the a an of to and in is it that for on with as was are be this by at from or have not but
what which who when where how why all can will one two three four five six seven eight nine
ten there their they them then than so if into out up down over under between each more most
some any no yes true false first second last next number numbers value values answer question
image picture shape shapes color colour size left right top bottom middle center corner side
find compute solve show prove give let suppose assume given total sum difference product
quotient ratio equal equals greater less larger smaller area perimeter volume length width
height radius diameter angle angles degree degrees line lines point points segment triangle
circle rectangle square polygon parallel perpendicular chord arc tangent vertex edge face
cube sphere cylinder cone graph axis function variable equation inequality integer fraction
decimal percent probability mean median mode prime even odd divisible remainder factor step
therefore because since hence thus final result think reasoning count many much few several
red green blue black gray grey teal brown yellow white orange purple pink dark light bright
contain contains present here see look seen visible object objects figure chart table row
column time speed distance price cost money apples books students people day days year hour
minutes meters seconds per each every after before during while about around near far
""".split()

_EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
_EASY_VQA_COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")

_LATEX = (
    r"\frac{{{a}}}{{{b}}}",
    r"\sqrt{{{a}}}",
    r"x^{{{a}}} + {b}x",
    r"{a} \times {b} = {c}",
    r"{a} \cdot {b}",
    r"\angle ABC = {a}^\circ",
    r"\triangle ABC",
    r"\pi r^2",
    r"\alpha + \beta = {a}",
    r"\theta = \frac{{\pi}}{{{b}}}",
    r"a_{{{a}}} = a_{{{b}}} + d",
    r"{a} \le x \le {b}",
    r"x \ge {a}",
    r"{a} \neq {b}",
    r"\sin \theta",
    r"\cos x",
    r"\log_{{{a}}} {b}",
    r"\left( {a} + {b} \right)",
    r"\sum_{{i=1}}^{{{a}}} i",
    r"$ {a} + {b} = {c} $",
    r"\boxed{{{a}}}",
    r"\boxed{{\frac{{{a}}}{{{b}}}}}",
    r"\text{{{w}}}",
)


def _number(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return str(rng.randrange(10))
    if kind == 1:
        return str(rng.randrange(1000))
    if kind == 2:
        return f"{rng.randrange(100)}.{rng.randrange(100)}"
    return f"{rng.randrange(1, 20)}/{rng.randrange(1, 20)}"


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randrange(4, 14))]
    if rng.random() < 0.4:
        words.insert(rng.randrange(len(words)), _number(rng))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice(".?!,:;")


def _latex(rng: random.Random) -> str:
    template = rng.choice(_LATEX)
    a, b = rng.randrange(1, 100), rng.randrange(1, 100)
    return template.format(a=a, b=b, c=a + b, w=rng.choice(_WORDS))


def _easy_vqa(rng: random.Random) -> str:
    shape, color = rng.choice(_EASY_VQA_SHAPES), rng.choice(_EASY_VQA_COLORS)
    question = rng.choice(
        (
            f"what shape is in the image? {shape}",
            f"what color is the {shape}? {color}",
            f"is there a {color} shape in the image? {rng.choice(('yes', 'no'))}",
            f"does the image contain a {shape}? {rng.choice(('yes', 'no'))}",
            f"is no {color} shape present? {rng.choice(('yes', 'no'))}",
            f"what is the {color} shape? {shape}",
        )
    )
    return question + " Answer in one word."


def _think(rng: random.Random) -> str:
    answer = rng.choice((_number(rng), rng.choice(_EASY_VQA_SHAPES + _EASY_VQA_COLORS)))
    return f"<think> {_sentence(rng)} {_latex(rng)} </think> The answer is \\boxed{{{answer}}}."


def _corpus(seed: int, n_lines: int = 3000) -> list[str]:
    """Deterministic training text: a seeded mix of prose, math, answers and VQA questions."""
    rng = random.Random(seed)
    makers = (_sentence, _latex, _easy_vqa, _think)
    lines = [" ".join(_WORDS), " ".join(str(i) for i in range(101))]
    lines += [rng.choice(makers)(rng) for _ in range(n_lines)]
    return lines


@functools.lru_cache(maxsize=8)
def _tokenizer_json(seed: int, vocab_size: int | None) -> str:
    """Train the BPE for `seed` and pad it to `vocab_size`; returns the tokenizers JSON."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[*SPECIAL_TOKENS, *THINK_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)

    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        if added["content"] in THINK_TOKENS:
            added["special"] = False
    vocab: dict[str, int] = spec["model"]["vocab"]
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than the trained tokenizer ({len(vocab)} tokens)"
            )
        # Plain tokens appended to the BPE vocabulary: decodable, never produced by encoding
        # (no merges lead to them), so they only enlarge the embedding and output layers.
        for i in range(vocab_size - len(vocab)):
            vocab[EXTRA_TOKEN.format(i)] = len(vocab)
    return json.dumps(spec)


def chat_template(arch_family: str, *, default_system: str | None = None) -> str:
    """The ChatML chat template rendering image items as `arch_family`'s placeholder.

    `arch_family` is ``"qwen"`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) or ``"idefics3"``. With
    `default_system`, a conversation that does not start with a system message gets that one
    (SmolLM2-Instruct was trained with such a default).
    """
    if arch_family not in IMAGE_PLACEHOLDERS:
        raise ValueError(
            f"arch_family must be one of {sorted(IMAGE_PLACEHOLDERS)}, got {arch_family!r}"
        )
    template = CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", IMAGE_PLACEHOLDERS[arch_family])
    if default_system is not None:
        if "'" in default_system or "\\" in default_system:
            raise ValueError("default_system must not contain quotes or backslashes")
        prefix = (
            "{% if messages and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}{% endif %}"
        )
        template = prefix + template
    return template


def build_tokenizer(
    seed: int = 0, *, vocab_size: int | None = None, arch_family: str = "qwen"
) -> PreTrainedTokenizerFast:
    """Build the tiny byte-level BPE tokenizer (trained locally, deterministic for `seed`).

    Args:
        seed: seeds the generated training corpus; the same seed gives the same vocabulary.
        vocab_size: if given, pad the vocabulary with plain tokens ``<|extra_i|>`` to exactly
            this many entries (e.g. 19008 for the benchmark workload).
        arch_family: which image placeholder the chat template renders (``"qwen"`` or
            ``"idefics3"``).

    Returns:
        A fresh ``PreTrainedTokenizerFast`` (left padding, EOS ``<|im_end|>``, pad
        ``<|endoftext|>``, ChatML chat template). Each call returns an independent object.
    """
    if vocab_size is not None and vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    template = chat_template(arch_family)
    backend = Tokenizer.from_str(_tokenizer_json(seed, vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        padding_side="left",
        chat_template=template,
        model_max_length=32768,
    )
    return tokenizer
