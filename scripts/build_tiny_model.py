"""Build vispo's shipped small VLM (``builtin:vispo-tiny``): `make tiny-model`.

Why this exists: a randomly initialised tiny VLM learns easy-vqa's text prior (67% test
accuracy) within seconds but does not learn to look at the image within the minutes a CPU
demo has. The demo's RL stage needs a policy whose vision tower already produces useful
features, yet which does not already answer easy-vqa from the image: then RL has something
to teach (rely on what you see), as in the PAPO/CPPO papers, in miniature.

What it does (everything seeded; same seed, same thread count -> same weights):

1. Builds a small Qwen2-VL (``vispo.models.tiny.build_tiny_vlm`` with larger sizes; patch 16,
   merge 2, 64x64 images -> 4 image tokens) with vispo's locally trained BPE tokenizer.
   Images are drawn here with PIL, *not* taken from easy-vqa: one circle / rectangle /
   triangle in one of the 8 easy-vqa colours, random size and position, on a light random
   background.
2. Stage ``vision``: the vision tower alone classifies what is drawn (shape, colour, left or
   right, top or bottom) through a linear read-out of its output tokens (``SceneReadout``,
   discarded afterwards). This direct loss is cheap (no language model) and is what makes the
   tower learn shapes at all within minutes; through the language model alone it learns
   colours but not shapes (measured: shape naming at chance after 1,000 steps).
3. Stage ``perception``: supervised naming through the language model, with phrasings of
   its own ("Name the colour of the figure.", "Which side is the object on, left or
   right?"); every answer is one word: the colour, the shape, the side or the height. The
   read-out loss stays on.
4. Stage ``format``: easy-vqa TRAIN questions (the ``short`` template: "... Answer in one
   word.") shown with *uninformative* images: three in four are drawn scenes unrelated to
   the question, the rest blank backgrounds, flat gray or noise. The model learns the
   one-word answer format and the text prior, and no easy-vqa answer is ever tied to the
   image it is about. Naming batches stay mixed in so perception is not forgotten. (With
   blank images only, the format did not carry over to real images: shown a real image,
   the model answered yes/no questions with colour names, 26% accuracy.)
5. Measures what the demo depends on: naming accuracy on held-out drawn images, greedy
   easy-vqa test accuracy with the real images (should be near the 67% text prior) and with
   blank images, and writes the checkpoint (float32 safetensors, processor, chat template),
   ``train_log.jsonl`` (losses and evaluations) and ``README.md``.

Usage::

    python scripts/build_tiny_model.py --out vispo/assets/vispo-tiny
    python scripts/build_tiny_model.py --out /tmp/a --quick      # seconds: a smoke/repro check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from vispo.data import easy_vqa, get_template
from vispo.data.sample import Sample
from vispo.data.templates import PromptTemplate
from vispo.eval.accuracy import generate_answers
from vispo.models.adapt import vision_parameters
from vispo.models.loading import load_policy
from vispo.models.scoring import build_scoring_batch, encode_prompts, score
from vispo.models.tiny import build_tiny_vlm
from vispo.rewards import math_accuracy
from vispo.train.batch import image_budget, prepare_image
from vispo.train.optim import build_optimizer, lr_factor

# One CPU thread by default: the same thread count makes two runs reduce in the same order
# (bitwise-identical weights), and on a shared 2-core machine one thread is also the fastest
# (two OpenMP threads competing with other work stall each other).
THREADS_DEFAULT = 1

# --------------------------------------------------------------------------------------------
# Drawn scenes (the perception data)
# --------------------------------------------------------------------------------------------

#: easy-vqa's eight colours, as named CSS colours (the names are the answers).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "yellow": (255, 255, 0),
}
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
IMAGE_SIZE = 64  # easy-vqa's image size; the processor keeps it (patch 16 x merge 2 divides 64)
SUPERSAMPLE = 4  # draw 4x larger, then downsample: anti-aliased edges like easy-vqa's


@dataclasses.dataclass(frozen=True)
class Scene:
    """What was drawn: one shape, its colour, its centre and bounding-box size in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    width: float
    height: float


def draw_scene(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[Image.Image, Scene]:
    """One shape of a random easy-vqa colour, size (8-34 px) and position on a light background.

    The shape may be cut by the border (its centre stays at least a quarter of its size
    inside), as in easy-vqa. Rectangles have a random aspect ratio, triangles point up.
    """
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    background = tuple(int(v) for v in rng.integers(222, 256, size=3))
    if shape == "rectangle":
        width, height = rng.uniform(8, 34, size=2)
    elif shape == "circle":
        width = height = rng.uniform(8, 34)
    else:
        width = rng.uniform(10, 34)
        height = width * rng.uniform(0.75, 1.0)
    cx = rng.uniform(width / 4, size - width / 4)
    cy = rng.uniform(height / 4, size - height / 4)

    s = SUPERSAMPLE
    big = Image.new("RGB", (size * s, size * s), background)
    draw = ImageDraw.Draw(big)
    x0, y0, x1, y1 = (
        (cx - width / 2) * s,
        (cy - height / 2) * s,
        (cx + width / 2) * s,
        (cy + height / 2) * s,
    )
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "rectangle":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    image = big.resize((size, size), Image.Resampling.BOX)
    return image, Scene(shape, color, float(cx), float(cy), float(width), float(height))


#: Question phrasings of the perception stage, by kind. Deliberately unlike easy-vqa's
#: ("what color is the shape?", "is there a red shape?", ...): the model must not see
#: easy-vqa's question answering here.
PHRASINGS: dict[str, tuple[str, ...]] = {
    "color": (
        "Name the colour of the figure.",
        "Which colour does the object have?",
        "Tell me the colour of the drawn object.",
        "The figure is painted in which colour?",
    ),
    "shape": (
        "Name the figure.",
        "Which kind of figure is drawn?",
        "Name the geometric object in the picture.",
        "Tell me which figure you see.",
    ),
    "side": (
        "Is the figure on the left or on the right?",
        "Which side is the object on, left or right?",
    ),
    "height": (
        "Is the object near the top or near the bottom?",
        "Is the figure in the upper or the lower half? Say top or bottom.",
    ),
}
#: Every answer is one word, as in easy-vqa: a two-word "colour shape" caption kind leaked
#: into RL (colour questions answered "black rectangle...", measured in one of two demo seeds).
KIND_WEIGHTS: dict[str, float] = {"color": 0.4, "shape": 0.4, "side": 0.1, "height": 0.1}
ONE_WORD = " Answer in one word."
#: Centre this far from the midline (pixels) for a side/height question (no ambiguous labels).
MIN_OFFSET = 6.0


def perception_sample(rng: np.random.Generator, index: int, split: str = "train") -> Sample:
    """A drawn image with one naming question about it (kinds weighted by KIND_WEIGHTS)."""
    image, scene = draw_scene(rng)
    kinds = list(KIND_WEIGHTS)
    probs = np.array([KIND_WEIGHTS[k] for k in kinds])
    kind = kinds[rng.choice(len(kinds), p=probs / probs.sum())]
    mid = IMAGE_SIZE / 2
    if kind == "side" and abs(scene.cx - mid) < MIN_OFFSET:
        kind = "color"
    if kind == "height" and abs(scene.cy - mid) < MIN_OFFSET:
        kind = "shape"
    answer = {
        "color": scene.color,
        "shape": scene.shape,
        "side": "left" if scene.cx < mid else "right",
        "height": "top" if scene.cy < mid else "bottom",
    }[kind]
    question = PHRASINGS[kind][rng.integers(len(PHRASINGS[kind]))]
    if rng.random() < 0.5:
        question += ONE_WORD
    return Sample(
        id=f"drawn/{split}/{index}",
        images=[image],
        question=question,
        answer=answer,
        meta={"kind": kind, "scene": dataclasses.asdict(scene)},
    )


def uninformative_image(
    rng: np.random.Generator, size: int = IMAGE_SIZE, *, drawn_frac: float = 0.75
) -> Image.Image:
    """An image that says nothing about the easy-vqa answer it is shown with.

    With probability `drawn_frac` a scene drawn independently of the question (it looks like
    an easy-vqa image, so the answer format also holds on real-looking images, but it is
    unrelated to the answer); otherwise an empty light background, flat mid-gray, or light
    noise (in the ratio 2:1:1).
    """
    if rng.random() < drawn_frac:
        return draw_scene(rng, size)[0]
    u = rng.random()
    if u < 0.5:
        color = tuple(int(v) for v in rng.integers(222, 256, size=3))
        return Image.new("RGB", (size, size), color)
    if u < 0.75:
        return Image.new("RGB", (size, size), (128, 128, 128))
    noise = rng.integers(200, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(noise, "RGB")


# --------------------------------------------------------------------------------------------
# Supervised steps (teacher-forced, through vispo's own scoring path)
# --------------------------------------------------------------------------------------------

PLAIN = PromptTemplate("{{ question }}", name="plain")
SHORT = get_template("short")


@dataclasses.dataclass
class Item:
    """One supervised example: the chat messages, the (already sized) image, the answer, and
    for drawn images the scene (labels for the auxiliary read-out)."""

    messages: list[dict]
    image: Image.Image
    answer: str
    scene: Scene | None = None


class AnswerTokens:
    """Token ids of an answer followed by the end-of-turn token, cached per answer string."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.cache: dict[str, list[int]] = {}

    def __call__(self, answer: str) -> list[int]:
        if answer not in self.cache:
            ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            self.cache[answer] = [*ids, self.eos]
        return self.cache[answer]


class SceneReadout(torch.nn.Module):
    """Auxiliary linear read-out of the vision tower's output tokens (training only; not saved).

    Why: through the language model alone, the gradient that reaches the vision tower is weak
    (it must pass an attention that first has to learn to look at the image tokens), and a
    from-scratch tower learns colours but not shapes in minutes. A direct classification loss
    on the tokens the language model reads makes them encode shape, colour and place
    linearly; the naming loss then teaches the language model to read them. Shape and colour
    come from the mean of an image's tokens, side and height from their concatenation (the
    tower's rotary positions are relative, so where the shape is lies in which token holds it).
    """

    def __init__(self, hidden_size: int, tokens_per_image: int) -> None:
        super().__init__()
        self.tokens_per_image = tokens_per_image
        self.what = torch.nn.Linear(hidden_size, len(SHAPES) + len(COLORS))
        self.where = torch.nn.Linear(hidden_size * tokens_per_image, 4)
        self.features: torch.Tensor | None = None
        self.accuracy: dict[str, float] = {}

    def capture(self, module, inputs, output) -> None:
        """Forward hook on the vision tower: keep its merged output tokens."""
        self.features = output.pooler_output

    def loss(self, scenes: list[Scene | None]) -> torch.Tensor:
        """Mean cross-entropy of shape, colour, side and height over the labelled images."""
        feats = self.features.reshape(len(scenes), self.tokens_per_image, -1)
        rows = [i for i, sc in enumerate(scenes) if sc is not None]
        if not rows:
            self.accuracy = {}
            return feats.sum() * 0.0
        labelled = [scenes[i] for i in rows]
        feats = feats[rows]
        what = self.what(feats.mean(1))
        where = self.where(feats.flatten(1))
        colors = list(COLORS)
        shape = torch.tensor([SHAPES.index(sc.shape) for sc in labelled])
        color = torch.tensor([colors.index(sc.color) for sc in labelled])
        mid = IMAGE_SIZE / 2
        side = torch.tensor([int(sc.cx >= mid) for sc in labelled])
        height = torch.tensor([int(sc.cy >= mid) for sc in labelled])
        ce = torch.nn.functional.cross_entropy
        n_shapes = len(SHAPES)
        heads = (
            ("shape", what[:, :n_shapes], shape),
            ("color", what[:, n_shapes:], color),
            ("side", where[:, :2], side),
            ("height", where[:, 2:], height),
        )
        with torch.no_grad():  # training accuracy of each head, for the log
            self.accuracy = {
                name: float((logits.argmax(-1) == target).float().mean())
                for name, logits, target in heads
            }
        return sum(ce(logits, target) for _, logits, target in heads) / len(heads)


def sft_loss(
    model,
    processor,
    items: list[Item],
    answer_tokens: AnswerTokens,
    readout: SceneReadout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean negative log-likelihood of the answer tokens (and end of turn) given the prompts,
    and the auxiliary read-out loss (0 without a read-out)."""
    prompts = encode_prompts(processor, [it.messages for it in items], [[it.image] for it in items])
    ids = [answer_tokens(it.answer) for it in items]
    T = max(len(x) for x in ids)
    pad = processor.tokenizer.pad_token_id
    response = torch.full((len(items), T), pad, dtype=torch.long)
    mask = torch.zeros(len(items), T)
    for i, row in enumerate(ids):
        response[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1.0
    batch = build_scoring_batch(prompts, response, repeats=1, response_mask=mask)
    (scores,) = score(model, batch, grad=True)
    nll = -(scores.logp * mask).sum() / mask.sum()
    aux = readout.loss([it.scene for it in items]) if readout is not None else nll * 0.0
    return nll, aux


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def greedy_correct(model, processor, samples, template, budget, *, max_new_tokens=4) -> list[float]:
    """Per-sample 1.0/0.0: the greedy answer equals the gold one (vispo's ``math`` reward)."""
    texts = generate_answers(
        model,
        processor,
        samples,
        template,
        max_new_tokens=max_new_tokens,
        budget=budget,
        batch_size=128,
    )
    return [math_accuracy(t[0], s.answer) for t, s in zip(texts, samples)]


def perception_report(model, processor, samples, budget) -> dict[str, float]:
    """Greedy naming accuracy on held-out drawn images, overall and per question kind."""
    correct = greedy_correct(model, processor, samples, PLAIN, budget, max_new_tokens=5)
    out = {"perception/accuracy": float(np.mean(correct))}
    for kind in KIND_WEIGHTS:
        vals = [c for c, s in zip(correct, samples) if s.meta["kind"] == kind]
        if vals:
            out[f"perception/{kind}"] = float(np.mean(vals))
    return out


def easy_vqa_report(model, processor, samples, budget, *, blank: bool) -> dict[str, float]:
    """Greedy easy-vqa accuracy with the real images (or blank ones), per question type."""
    if blank:
        samples = [
            dataclasses.replace(s, images=[Image.new("RGB", (64, 64), (240, 240, 240))])
            for s in samples
        ]
    correct = greedy_correct(model, processor, samples, SHORT, budget)
    tag = "blank" if blank else "real"
    out = {f"easy_vqa_{tag}/accuracy": float(np.mean(correct))}
    for qtype in ("yes_no", "shape", "color"):
        vals = [c for c, s in zip(correct, samples) if s.meta["question_type"] == qtype]
        out[f"easy_vqa_{tag}/{qtype}"] = float(np.mean(vals))
    dep = [c for c, s in zip(correct, samples) if s.meta["vision_dependent"]]
    out[f"easy_vqa_{tag}/vision_dependent"] = float(np.mean(dep))
    return out


def prior_accuracy(samples) -> float:
    """The text prior's accuracy on `samples` (the questions it answers right)."""
    return float(np.mean([not s.meta["vision_dependent"] for s in samples]))


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BuildConfig:
    """Everything that decides the weights (recorded in the training log)."""

    seed: int = 0
    threads: int = THREADS_DEFAULT
    # model (Qwen2-VL, patch 16 x merge 2 on 64x64 images = 4 image tokens)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    vision_depth: int = 4
    vision_hidden_size: int = 128
    vision_heads: int = 4
    vision_intermediate_size: int = 512
    patch_size: int = 16
    # stage 0: the vision tower alone, classifying drawn scenes through the read-out
    vision_steps: int = 1500
    vision_batch_size: int = 128
    vision_lr: float = 2e-3
    # stage 1: perception (naming through the language model)
    perception_steps: int = 400
    # stage 2: format warm-up (easy-vqa train questions, uninformative images)
    format_steps: int = 300
    format_naming_frac: float = 0.25  # share of each warm-up batch that stays naming
    format_drawn_frac: float = 0.75  # uninformative images that are unrelated drawn scenes
    batch_size: int = 32
    lr: float = 5e-4
    vision_lr_scale: float = 0.5  # the tower is trained already: keep it steady
    readout_weight: float = 1.0  # auxiliary shape/colour/place read-out of the vision tokens
    format_lr: float = 5e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # evaluation
    eval_perception: int = 300
    eval_easy_vqa: int = 1000
    eval_full_test: bool = True  # also measure the whole easy-vqa test split at the end
    log_every: int = 25
    eval_every: int = 0


def quick_config(seed: int, threads: int) -> BuildConfig:
    """A seconds-long setting for smoke tests and the same-seed-same-weights check."""
    return BuildConfig(
        seed=seed,
        threads=threads,
        hidden_size=64,
        num_layers=2,
        intermediate_size=128,
        vision_depth=1,
        vision_hidden_size=32,
        vision_heads=2,
        vision_intermediate_size=64,
        vision_steps=4,
        vision_batch_size=8,
        perception_steps=6,
        format_steps=4,
        batch_size=8,
        warmup_steps=2,
        eval_perception=16,
        eval_easy_vqa=16,
        eval_full_test=False,
        log_every=2,
        eval_every=0,
    )


class Log:
    """Appends JSON lines to ``train_log.jsonl`` and echoes a short line to stdout."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("w", encoding="utf-8")
        self.start = time.perf_counter()

    def __call__(self, record: dict) -> None:
        record = {"time_s": round(time.perf_counter() - self.start, 2), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        short = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}
        print(json.dumps(short), flush=True)

    def close(self) -> None:
        self.file.close()


def fresh_model(cfg: BuildConfig):
    """A randomly initialised (seeded) tiny Qwen2-VL of the configured sizes and its processor."""
    return build_tiny_vlm(
        "qwen2_vl",
        seed=cfg.seed,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        vision_depth=cfg.vision_depth,
        vision_hidden_size=cfg.vision_hidden_size,
        vision_heads=cfg.vision_heads,
        vision_intermediate_size=cfg.vision_intermediate_size,
        patch_size=cfg.patch_size,
        merge_size=2,
        min_pixels=IMAGE_SIZE * IMAGE_SIZE,
        max_pixels=IMAGE_SIZE * IMAGE_SIZE,
        image_size=IMAGE_SIZE,
    )


def build(
    cfg: BuildConfig, out: Path, init: Path | None = None, save_stages: Path | None = None
) -> dict:
    """Train and save the model into ``out``; returns the final evaluation.

    `init`: start from this saved model instead of a fresh one (for iterating on a later
    stage; set the earlier stages' steps to 0). The shipped model is built from scratch.
    `save_stages`: also save the model after each stage into ``save_stages/<stage>``.
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "train_log.jsonl")
    log({"event": "config", **dataclasses.asdict(cfg), "init": None if init is None else str(init)})

    if init is not None:
        model, processor = load_policy(init, dtype="float32")
    else:
        model, processor = fresh_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log({"event": "model", "parameters": n_params})
    budget = image_budget(processor)
    answer_tokens = AnswerTokens(processor.tokenizer)
    ip = processor.image_processor
    readout = SceneReadout(cfg.hidden_size, (IMAGE_SIZE // (ip.patch_size * ip.merge_size)) ** 2)
    hook = model.model.visual.register_forward_hook(readout.capture)

    # Data: drawn scenes from their own seeded streams; easy-vqa train questions for the format.
    train_rng = np.random.default_rng([cfg.seed, 1])
    eval_rng = np.random.default_rng([cfg.seed, 2])
    blank_rng = np.random.default_rng([cfg.seed, 3])
    order_rng = np.random.default_rng([cfg.seed, 4])
    held_out = [perception_sample(eval_rng, i, "eval") for i in range(cfg.eval_perception)]
    vqa_train = easy_vqa("train")
    vqa_test = easy_vqa("test")
    vqa_eval = [vqa_test[i] for i in range(min(cfg.eval_easy_vqa, len(vqa_test)))]
    counter = [0]

    def naming_items(k: int) -> list[Item]:
        items = []
        for _ in range(k):
            s = perception_sample(train_rng, counter[0])
            counter[0] += 1
            image = prepare_image(s.images[0], budget)
            items.append(Item(PLAIN.render(s), image, s.answer, Scene(**s.meta["scene"])))
        return items

    def format_items(k: int) -> list[Item]:
        idx = order_rng.integers(len(vqa_train), size=k)
        items = []
        for i in idx:
            s = vqa_train[int(i)]
            image = uninformative_image(blank_rng, drawn_frac=cfg.format_drawn_frac)
            image = prepare_image(image, budget)
            items.append(Item(SHORT.render(s), image, s.answer))
        return items

    def evaluate(stage: str, step: int) -> dict:
        t0 = time.perf_counter()
        report = perception_report(model, processor, held_out, budget)
        report.update(easy_vqa_report(model, processor, vqa_eval, budget, blank=False))
        report.update(easy_vqa_report(model, processor, vqa_eval, budget, blank=True))
        report["easy_vqa/text_prior"] = prior_accuracy(vqa_eval)
        log(
            {
                "event": "eval",
                "stage": stage,
                "step": step,
                **report,
                "eval_s": round(time.perf_counter() - t0, 1),
            }
        )
        return report

    def run_stage(stage: str, steps: int, lr: float, make_batch) -> None:
        optimizer = build_optimizer(
            model,
            lr=lr,
            weight_decay=cfg.weight_decay,
            betas=(0.9, 0.98),
            vision_lr_scale=cfg.vision_lr_scale,
        )
        optimizer.add_param_group(
            {"params": list(readout.parameters()), "weight_decay": 0.0, "lr_scale": 1.0}
        )
        params = [*model.parameters(), *readout.parameters()]
        model.train()
        losses: list[float] = []
        aux_losses: list[float] = []
        aux_acc: list[dict[str, float]] = []
        for step in range(steps):
            factor = lr_factor(step, warmup=cfg.warmup_steps, total=steps, schedule="cosine")
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"] * factor
            nll, aux = sft_loss(model, processor, make_batch(), answer_tokens, readout)
            optimizer.zero_grad(set_to_none=True)
            (nll + cfg.readout_weight * aux).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            losses.append(nll.item())
            aux_losses.append(aux.item())
            if readout.accuracy:
                aux_acc.append(readout.accuracy)
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                log(
                    {
                        "event": "train",
                        "stage": stage,
                        "step": step + 1,
                        "loss": float(np.mean(losses)),
                        "readout_loss": float(np.mean(aux_losses)),
                        **{
                            f"readout_acc/{k}": float(np.mean([a[k] for a in aux_acc]))
                            for k in (aux_acc[0] if aux_acc else {})
                        },
                        "grad_norm": float(grad_norm),
                        "lr": lr * factor,
                    }
                )
                losses, aux_losses, aux_acc = [], [], []
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < steps:
                evaluate(stage, step + 1)
                model.train()
        model.eval()

    vision_rng = np.random.default_rng([cfg.seed, 5])

    def run_vision_stage(steps: int, lr: float) -> None:
        """Stage 0: the vision tower and the read-out alone (no language model) classify drawn
        scenes: a direct, cheap gradient that makes the image tokens encode what is drawn."""
        params = [p for _, p in vision_parameters(model)] + list(readout.parameters())
        optimizer = torch.optim.AdamW(
            params, lr=lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay
        )
        visual = model.model.visual
        visual.train()
        losses: list[float] = []
        accs: list[dict[str, float]] = []
        for step in range(steps):
            factor = lr_factor(step, warmup=cfg.warmup_steps, total=steps, schedule="cosine")
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            drawn = [draw_scene(vision_rng) for _ in range(cfg.vision_batch_size)]
            images = [prepare_image(image, budget) for image, _ in drawn]
            pixels = processor.image_processor(images=images, return_tensors="pt")
            visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])  # hook keeps tokens
            loss = readout.loss([scene for _, scene in drawn])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            accs.append(readout.accuracy)
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                log(
                    {
                        "event": "train",
                        "stage": "vision",
                        "step": step + 1,
                        "readout_loss": float(np.mean(losses)),
                        **{
                            f"readout_acc/{k}": float(np.mean([a[k] for a in accs]))
                            for k in accs[0]
                        },
                        "grad_norm": float(grad_norm),
                        "lr": lr * factor,
                    }
                )
                losses, accs = [], []
        model.eval()

    def format_batch() -> list[Item]:
        k_naming = int(round(cfg.format_naming_frac * cfg.batch_size))
        return format_items(cfg.batch_size - k_naming) + naming_items(k_naming)

    def snapshot(stage: str) -> None:
        if save_stages is not None:
            model.save_pretrained(save_stages / stage)
            processor.save_pretrained(save_stages / stage)

    run_vision_stage(cfg.vision_steps, cfg.vision_lr)
    snapshot("vision")
    run_stage("perception", cfg.perception_steps, cfg.lr, lambda: naming_items(cfg.batch_size))
    evaluate("perception", cfg.perception_steps)
    snapshot("perception")
    run_stage("format", cfg.format_steps, cfg.format_lr, format_batch)
    final = evaluate("format", cfg.format_steps)
    if cfg.eval_full_test:
        t0 = time.perf_counter()
        everything = [vqa_test[i] for i in range(len(vqa_test))]
        full = easy_vqa_report(model, processor, everything, budget, blank=False)
        full = {k.replace("easy_vqa_real/", "easy_vqa_test/"): v for k, v in full.items()}
        full["easy_vqa_test/text_prior"] = prior_accuracy(everything)
        full["easy_vqa_test/questions"] = len(everything)
        log({"event": "eval_full_test", **full, "eval_s": round(time.perf_counter() - t0, 1)})
        final.update(full)
    hook.remove()

    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    log({"event": "saved", "bytes": folder_bytes(out)})
    log.close()
    return final


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


README = """# vispo-tiny

The small vision-language model that `vispo train` (the embedded demo, `make demo`) starts from.
Built by `make tiny-model` = `python scripts/build_tiny_model.py --out vispo/assets/vispo-tiny`
(seeded: rebuilding with the same seed and thread count gives the same weights).

- Architecture: Qwen2-VL, {parameters:,} parameters, float32 safetensors; vispo's locally
  trained byte-level BPE tokenizer ({vocab} tokens), ChatML chat template; 64x64 images,
  patch 16, merge 2 -> 4 image tokens.
- Data for stages 1-2: one circle, rectangle or triangle in one of easy-vqa's 8 colours,
  random size and position, drawn with PIL by the script. No easy-vqa question answering.
- Stage 1, vision ({vision_steps} steps, batch {vision_batch_size}): the vision tower alone
  classifies shape, colour, side and height through a linear read-out of its output tokens
  (discarded afterwards).
- Stage 2, perception ({perception_steps} steps, batch {batch_size}): naming the colour, the
  shape, the side (left/right), the height (top/bottom) through the language model, with
  phrasings that are not easy-vqa's ("Name the colour of the figure.").
- Stage 3, format ({format_steps} steps): easy-vqa TRAIN questions with the `short` template,
  shown with uninformative images (drawn scenes unrelated to the question, blank, gray,
  noise), mixed with naming batches: the model learns the one-word format and the text prior
  without ever tying an easy-vqa answer to the image it is about.

Measured at the end of the build (greedy decoding, `short` template, vispo's `math` reward):

| | accuracy |
|---|---|
| naming, {n_naming} held-out drawn images | {perception:.3f} |
| naming the colour / the shape | {naming_color:.3f} / {naming_shape:.3f} |
| easy-vqa test split ({n_test} questions), real images | {test_real:.3f} |
| the same, text prior (most frequent train answer per question) | {test_prior:.3f} |
| easy-vqa, first {n_eval} test questions, real images | {real:.3f} |
| the same, blank images | {blank:.3f} |
| the same, text prior | {prior:.3f} |

The RL demo has to teach the model to use what it already sees. The loss curves and
evaluations are in `train_log.jsonl`. Build time: {minutes:.1f} min on {threads} CPU thread(s)
({machine}).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=THREADS_DEFAULT)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few steps")
    parser.add_argument(
        "--init", type=Path, help="start from this saved model (iterate on a later stage)"
    )
    parser.add_argument(
        "--save-stages", type=Path, help="also save the model after each stage in this folder"
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="override BuildConfig fields, e.g. --set perception_steps=500 lr=1e-3",
    )
    args = parser.parse_args(argv)
    cfg = (
        quick_config(args.seed, args.threads)
        if args.quick
        else BuildConfig(seed=args.seed, threads=args.threads)
    )
    types = {f.name: f.type for f in dataclasses.fields(BuildConfig)}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in types:
            parser.error(f"--set: unknown field {name!r}; fields: {sorted(types)}")
        cast = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true", "yes")}[
            types[name]
        ]
        cfg = dataclasses.replace(cfg, **{name: cast(value)})
    out = Path(args.out)
    start = time.perf_counter()
    final = build(cfg, out, init=args.init, save_stages=args.save_stages)
    minutes = (time.perf_counter() - start) / 60
    params = sum(
        int(math.prod(v["shape"]))
        for v in json.loads(_safetensors_header(out / "model.safetensors")).values()
        if isinstance(v, dict) and "shape" in v
    )
    (out / "README.md").write_text(
        README.format(
            parameters=params,
            vocab=len(Counter(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])),
            vision_steps=cfg.vision_steps,
            vision_batch_size=cfg.vision_batch_size,
            perception_steps=cfg.perception_steps,
            batch_size=cfg.batch_size,
            n_naming=cfg.eval_perception,
            naming_color=final.get("perception/color", float("nan")),
            naming_shape=final.get("perception/shape", float("nan")),
            format_steps=cfg.format_steps,
            n_eval=cfg.eval_easy_vqa,
            n_test=int(final.get("easy_vqa_test/questions", 0)),
            test_real=final.get("easy_vqa_test/accuracy", float("nan")),
            test_prior=final.get("easy_vqa_test/text_prior", float("nan")),
            perception=final["perception/accuracy"],
            real=final["easy_vqa_real/accuracy"],
            blank=final["easy_vqa_blank/accuracy"],
            prior=final["easy_vqa/text_prior"],
            minutes=minutes,
            threads=cfg.threads,
            machine=platform.machine(),
        ),
        encoding="utf-8",
    )
    print(f"built {out} in {minutes:.1f} min: {folder_bytes(out) / 1e6:.1f} MB", file=sys.stderr)
    return 0


def _safetensors_header(path: Path) -> str:
    """The JSON header of a safetensors file (names, dtypes, shapes)."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return f.read(n).decode("utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
