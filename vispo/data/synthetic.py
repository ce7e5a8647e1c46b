"""A seeded generator of vision-dependent questions, drawn with PIL.

Six tasks, each needing the image:

* ``count``: how many objects of a colour (and, from difficulty 2, of a shape) are drawn;
* ``attribute``: the colour of the unique object of a shape, or the shape of the unique object
  of a colour;
* ``position``: which half of the image an object is in, or (difficulty >= 2) where it is
  relative to another object;
* ``compare_length``: which of two coloured line segments is longer;
* ``bar_chart``: the value of a bar read against a gridded axis (difficulty >= 2 also the
  difference of two bars and the tallest bar);
* ``geometry``: a triangle drawn to scale with its side lengths or two angles written into the
  image (``"A=50°"`` beside the vertex); the question (perimeter, third angle, hypotenuse) needs
  those labels.

Difficulty (an int >= 1) scales the number of objects and distractors, the ranges of the
labelled values and how close the compared lengths are; it saturates at 4 (3 for line lengths),
and small canvases cap the number of objects (8 at 64 px, 24 at 128 px). A fraction of items
(``text_answerable_frac``) states the deciding fact in the question itself; those have
``meta["answerable_without_image"] = True`` and serve as the text-prior control. Every item is
generated from ``numpy.random.default_rng([seed, split, i])``: the same seed gives the same
images, and the first k items do not depend on ``n``.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vispo.data.sample import Sample, SampleDataset

SYNTHETIC_TASKS: tuple[str, ...] = (
    "count",
    "attribute",
    "position",
    "compare_length",
    "bar_chart",
    "geometry",
)

#: Object colours (names are the answers). Pure RGB values, drawn without anti-aliasing.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (230, 190, 20),
    "purple": (150, 60, 190),
    "orange": (240, 130, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)  # axes and text
GRID = (200, 200, 200)  # bar-chart grid lines
FIGURE = (30, 60, 150)  # geometry figure outline

_PYTHAGOREAN = ((3, 4, 5), (6, 8, 10), (5, 12, 13), (9, 12, 15), (8, 15, 17), (7, 24, 25))


@dataclass
class _Item:
    """What a task generator returns."""

    image: Image.Image
    question: str
    answer: str
    fact: str  # one sentence that makes the question answerable from text alone
    kind: str
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def synthetic_vqa(
    n: int,
    *,
    seed: int = 0,
    difficulty: int = 1,
    tasks: Sequence[str] = SYNTHETIC_TASKS,
    image_size: int = 128,
    split: str = "train",
    text_answerable_frac: float = 0.1,
) -> SampleDataset:
    """Generate ``n`` questions; item ``i`` has task ``tasks[i % len(tasks)]``.

    Args:
        n: number of items.
        seed: base seed; items are drawn from ``default_rng([seed, crc32(split), i])``.
        difficulty: >= 1; more objects and distractors, wider label ranges, closer lengths.
        tasks: subset of :data:`SYNTHETIC_TASKS`.
        image_size: side of the square RGB images in pixels (>= 64; the geometry labels need
            about 96 px or more to stay clear of the figure).
        split: a label that also selects an independent random stream (train vs test).
        text_answerable_frac: probability that an item states its deciding fact in the
            question (``meta["answerable_without_image"] = True``).

    Returns:
        a :class:`SampleDataset` whose samples hold one PIL image each (about 50 KB per item
        at 128 px), with meta ``task``, ``kind``, ``difficulty``, ``split``,
        ``answerable_without_image`` and ``vision_dependent`` (its negation).
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"synthetic_vqa: n must be a non-negative int, got {n!r}")
    if not isinstance(difficulty, (int, np.integer)) or difficulty < 1:
        raise ValueError(f"synthetic_vqa: difficulty must be an int >= 1, got {difficulty!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 64:
        raise ValueError(f"synthetic_vqa: image_size must be an int >= 64, got {image_size!r}")
    if isinstance(tasks, str):
        tasks = (tasks,)
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in _GENERATORS]
    if not tasks or unknown:
        raise ValueError(
            f"synthetic_vqa: tasks must be a non-empty subset of {SYNTHETIC_TASKS}, got {tasks!r}"
        )
    if not 0.0 <= text_answerable_frac <= 1.0:
        raise ValueError(
            f"synthetic_vqa: text_answerable_frac must be in [0, 1], got {text_answerable_frac!r}"
        )
    split_key = zlib.crc32(split.encode("utf-8"))
    samples = []
    for i in range(int(n)):
        task = tasks[i % len(tasks)]
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, split_key, i])
        text_only = bool(rng.random() < text_answerable_frac)
        item = _GENERATORS[task](rng, int(image_size), int(difficulty))
        question = f"{item.fact} {item.question}" if text_only else item.question
        meta = {
            "task": task,
            "kind": item.kind,
            "difficulty": int(difficulty),
            "split": split,
            "answerable_without_image": text_only,
            "vision_dependent": not text_only,
            **item.extra,
        }
        samples.append(
            Sample(
                id=f"synthetic/{split}/{i}",
                images=[item.image],
                question=question,
                answer=item.answer,
                meta=meta,
            )
        )
    return SampleDataset(samples, source="synthetic", split=split)


# --------------------------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _font_size(image_size: int) -> int:
    return max(9, image_size // 11)


def _canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), BACKGROUND)
    return image, ImageDraw.Draw(image)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int], color) -> None:
    """Filled shape in the square box ``(x, y, side)``; no anti-aliasing."""
    x, y, s = box
    if shape == "circle":
        draw.ellipse([x, y, x + s - 1, y + s - 1], fill=color)
    elif shape == "square":
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=color)
    else:
        draw.polygon([(x + (s - 1) / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=color)


def _separated(a: tuple[int, int, int], b: tuple[int, int, int], gap: int) -> bool:
    ax, ay, as_ = a
    bx, by, bs = b
    return (
        ax + as_ + gap <= bx or bx + bs + gap <= ax or ay + as_ + gap <= by or by + bs + gap <= ay
    )


def _place_boxes(
    rng: np.random.Generator,
    size: int,
    sides: Sequence[int],
    *,
    regions: Sequence[tuple[int, int, int, int] | None] | None = None,
    gap: int = 3,
) -> list[tuple[int, int, int]]:
    """Non-touching square boxes (x, y, side), box k inside ``regions[k]`` (x0, y0, x1, y1)."""
    margin = 2
    for _ in range(200):
        boxes: list[tuple[int, int, int]] = []
        for k, side in enumerate(sides):
            region = regions[k] if regions is not None and regions[k] is not None else None
            x0, y0, x1, y1 = region or (margin, margin, size - margin, size - margin)
            if x1 - x0 < side or y1 - y0 < side:
                raise ValueError(f"an object of side {side} does not fit its region {region}")
            for _ in range(100):
                box = (
                    int(rng.integers(x0, x1 - side + 1)),
                    int(rng.integers(y0, y1 - side + 1)),
                    int(side),
                )
                if all(_separated(box, other, gap) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(sides):
            return boxes
    raise RuntimeError(f"could not place {len(sides)} objects on a {size}px canvas")


def _min_side(size: int) -> int:
    return max(10, size // 10)


def _max_objects(size: int) -> int:
    """How many objects of the smallest side fit comfortably (a third of the canvas area)."""
    return max(3, size * size // (3 * (_min_side(size) + 3) ** 2))


def _object_sides(rng: np.random.Generator, size: int, count: int) -> list[int]:
    """Random object sides, smaller when many objects must share the canvas."""
    lo = _min_side(size)
    hi = max(lo, min(size // 6, int(size / math.sqrt(2.5 * max(count, 1)))))
    return [int(v) for v in rng.integers(lo, hi + 1, size=count)]


def _pick(rng: np.random.Generator, options: Sequence, k: int | None = None):
    """One element (k=None) or k distinct elements of ``options``, order randomised."""
    if k is None:
        return options[int(rng.integers(len(options)))]
    return [options[int(j)] for j in rng.choice(len(options), size=k, replace=False)]


def _plural(shape: str) -> str:
    return shape + "s"


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int, fs: int):
    """Centred label, moved inwards where needed so that it stays inside the image."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=_font(fs), anchor="mm")
    x = min(max(xy[0], 1 - left), size - 1 - right)
    y = min(max(xy[1], 1 - top), size - 1 - bottom)
    draw.text((x, y), text, fill=INK, font=_font(fs), anchor="mm")


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


def _gen_count(rng: np.random.Generator, size: int, difficulty: int) -> _Item:
    colors = list(COLORS)
    target_color = _pick(rng, colors)
    by_shape = difficulty >= 2 and rng.random() < 0.5
    target_shape = _pick(rng, SHAPES) if by_shape else None
    cap = _max_objects(size)
    k = min(int(rng.integers(1, 3 + 2 * min(difficulty, 4))), cap)  # 1..4 at difficulty 1
    n_distract = min(int(rng.integers(0, 2 * min(difficulty, 4) + 1)), cap - k)
    objects = []
    for _ in range(k):
        objects.append((target_shape or _pick(rng, SHAPES), target_color))
    for _ in range(n_distract):
        if by_shape and rng.random() < 0.5:  # same colour, other shape: must not be counted
            other = [s for s in SHAPES if s != target_shape]
            objects.append((_pick(rng, other), target_color))
        else:
            objects.append(
                (_pick(rng, SHAPES), _pick(rng, [c for c in colors if c != target_color]))
            )
    order = rng.permutation(len(objects))
    objects = [objects[j] for j in order]
    boxes = _place_boxes(rng, size, _object_sides(rng, size, len(objects)))
    image, draw = _canvas(size)
    for (shape, color), box in zip(objects, boxes, strict=True):
        _draw_shape(draw, shape, box, COLORS[color])
    noun = _plural(target_shape) if by_shape else "shapes"
    return _Item(
        image=image,
        question=f"How many {target_color} {noun} are in the image?",
        answer=str(k),
        fact=f"The image shows exactly {k} {target_color} {noun}.",
        kind="count_color_shape" if by_shape else "count_color",
    )


def _gen_attribute(rng: np.random.Generator, size: int, difficulty: int) -> _Item:
    n_distract = min(int(rng.integers(0, min(difficulty, 4) + 2)), _max_objects(size) - 1)
    colors = list(COLORS)
    if rng.random() < 0.5:  # colour of the unique object of a shape
        shape, color = _pick(rng, SHAPES), _pick(rng, colors)
        others = [
            (_pick(rng, [s for s in SHAPES if s != shape]), _pick(rng, colors))
            for _ in range(n_distract)
        ]
        question = f"What color is the {shape}?"
        answer, fact, kind = color, f"The {shape} in the image is {color}.", "color_of_shape"
    else:  # shape of the unique object of a colour
        shape, color = _pick(rng, SHAPES), _pick(rng, colors)
        others = [
            (_pick(rng, SHAPES), _pick(rng, [c for c in colors if c != color]))
            for _ in range(n_distract)
        ]
        question = f"What shape is the {color} object?"
        answer, fact, kind = (
            shape,
            f"The {color} object in the image is a {shape}.",
            "shape_of_color",
        )
    objects = [(shape, color), *others]
    boxes = _place_boxes(rng, size, _object_sides(rng, size, len(objects)))
    image, draw = _canvas(size)
    for (s, c), box in zip(objects, boxes, strict=True):
        _draw_shape(draw, s, box, COLORS[c])
    return _Item(image, question, answer, fact, kind)


def _gen_position(rng: np.random.Generator, size: int, difficulty: int) -> _Item:
    colors = list(COLORS)
    horizontal = bool(rng.random() < 0.5)
    relative = difficulty >= 2 and rng.random() < 0.5
    n_distract = min(int(rng.integers(0, min(difficulty, 4) + 1)), _max_objects(size) - 2)
    half, m = size // 2, 2
    if relative:
        (c1, c2), (s1, s2) = _pick(rng, colors, 2), (_pick(rng, SHAPES), _pick(rng, SHAPES))
        distract_colors = [c for c in colors if c not in (c1, c2)]
        objects = [(s1, c1), (s2, c2)]
    else:
        c1, s1 = _pick(rng, colors), _pick(rng, SHAPES)
        distract_colors = [c for c in colors if c != c1]
        objects = [(s1, c1)]
    objects += [(_pick(rng, SHAPES), _pick(rng, distract_colors)) for _ in range(n_distract)]
    sides = _object_sides(rng, size, len(objects))
    if relative:
        # Put the two objects in opposite halves (along the asked axis), so that they are
        # unambiguously ordered; which one comes first is random.
        first_low = bool(rng.random() < 0.5)
        low = (m, m, half - 2, size - m) if horizontal else (m, m, size - m, half - 2)
        high = (
            (half + 2, m, size - m, size - m) if horizontal else (m, half + 2, size - m, size - m)
        )
        regions = [low if first_low else high, high if first_low else low]
        boxes = _place_boxes(rng, size, sides, regions=regions + [None] * n_distract)
        if horizontal:
            answer = "left" if first_low else "right"
            question = f"Is the {c1} {s1} to the left or to the right of the {c2} {s2}?"
            fact = f"The {c1} {s1} is to the {answer} of the {c2} {s2}."
        else:
            answer = "above" if first_low else "below"
            question = f"Is the {c1} {s1} above or below the {c2} {s2}?"
            fact = f"The {c1} {s1} is {answer} the {c2} {s2}."
        kind = "relative_position"
    else:
        first_low = bool(rng.random() < 0.5)
        if horizontal:
            region = (m, m, half - 2, size - m) if first_low else (half + 2, m, size - m, size - m)
            answer = "left" if first_low else "right"
            question = f"Is the {c1} {s1} on the left or the right side of the image?"
            fact = f"The {c1} {s1} is on the {answer} side of the image."
        else:
            region = (m, m, size - m, half - 2) if first_low else (m, half + 2, size - m, size - m)
            answer = "top" if first_low else "bottom"
            question = f"Is the {c1} {s1} in the top or the bottom half of the image?"
            fact = f"The {c1} {s1} is in the {answer} half of the image."
        boxes = _place_boxes(rng, size, sides, regions=[region] + [None] * n_distract)
        kind = "absolute_position"
    image, draw = _canvas(size)
    for (s, c), box in zip(objects, boxes, strict=True):
        _draw_shape(draw, s, box, COLORS[c])
    return _Item(image, question, answer, fact, kind)


def _gen_compare_length(rng: np.random.Generator, size: int, difficulty: int) -> _Item:
    c1, c2 = _pick(rng, list(COLORS), 2)
    min_ratio = {1: 1.5, 2: 1.3}.get(difficulty, 1.15)
    width = max(2, size // 40)
    lo, hi = 0.25 * size, 0.8 * size
    while True:
        long_len = float(rng.uniform(lo * min_ratio, hi))
        short_len = float(rng.uniform(lo, long_len / min_ratio))
        if short_len >= lo:
            break
    lengths = [long_len, short_len] if rng.random() < 0.5 else [short_len, long_len]
    for _ in range(500):
        segments = []
        for length in lengths:
            if difficulty == 1:
                angle = 0.0
            elif difficulty == 2:
                angle = float(_pick(rng, (0.0, math.pi / 2)))
            else:
                angle = float(rng.uniform(0, math.pi))
            dx, dy = length * math.cos(angle), length * math.sin(angle)
            pad = width + 2
            x0 = rng.uniform(pad + max(0, -dx), size - pad - max(0, dx))
            y0 = rng.uniform(pad + max(0, -dy), size - pad - max(0, dy))
            segments.append((x0, y0, x0 + dx, y0 + dy))
        if _segment_distance(segments[0], segments[1]) > 3 * width:
            break
    else:  # pragma: no cover - 500 failures in a row do not happen at these sizes
        raise RuntimeError("could not place two separated line segments")
    image, draw = _canvas(size)
    for seg, color in zip(segments, (c1, c2), strict=True):
        draw.line([(seg[0], seg[1]), (seg[2], seg[3])], fill=COLORS[color], width=width)
    answer = c1 if lengths[0] > lengths[1] else c2
    first, second = (c1, c2) if rng.random() < 0.5 else (c2, c1)
    l1, l2 = (round(v) for v in lengths)
    return _Item(
        image,
        f"Which line is longer, the {first} one or the {second} one?",
        answer,
        f"The {c1} line is {l1} pixels long and the {c2} line is {l2} pixels long.",
        "compare_length",
    )


def _segment_distance(a: tuple, b: tuple) -> float:
    """Smallest distance between two segments (0 when they cross), sampled finely."""
    ts = np.linspace(0.0, 1.0, 64)
    pa = np.stack([a[0] + ts * (a[2] - a[0]), a[1] + ts * (a[3] - a[1])], axis=1)
    pb = np.stack([b[0] + ts * (b[2] - b[0]), b[1] + ts * (b[3] - b[1])], axis=1)
    return float(np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min())


def _gen_bar_chart(rng: np.random.Generator, size: int, difficulty: int) -> _Item:
    d = min(difficulty, 4)
    n_bars = min(2 + d, len(COLORS))
    ymax = 5 * d
    colors = _pick(rng, list(COLORS), n_bars)
    values = [int(v) for v in rng.integers(1, ymax + 1, size=n_bars)]
    kinds = ["value"] + (["difference", "tallest"] if difficulty >= 2 else [])
    kind = _pick(rng, kinds)
    if kind == "tallest" and values.count(max(values)) > 1:
        kind = "value"  # the tallest bar must be unique
    if kind == "difference" and len(set(values)) == 1:
        kind = "value"

    fs = _font_size(size)
    left, right = int(0.2 * size), size - int(0.05 * size)
    top, baseline = int(0.08 * size), size - int(0.1 * size)
    unit = (baseline - top) / ymax
    grid_y = [round(baseline - k * unit) for k in range(ymax + 1)]
    image, draw = _canvas(size)
    label_every = 1 if ymax <= 5 else 5
    for k in range(1, ymax + 1):
        draw.line([(left + 1, grid_y[k]), (right, grid_y[k])], fill=GRID, width=1)
        if k % label_every == 0:
            draw.text((left - 3, grid_y[k]), str(k), fill=INK, font=_font(fs), anchor="rm")
    slot = (right - left - 2) / n_bars
    bar_w = max(4, int(slot * 0.6))
    for j, (color, value) in enumerate(zip(colors, values, strict=True)):
        x0 = round(left + 2 + j * slot + (slot - bar_w) / 2)
        draw.rectangle([x0, grid_y[value], x0 + bar_w - 1, baseline - 1], fill=COLORS[color])
    draw.line([(left, top), (left, baseline)], fill=INK, width=1)
    draw.line([(left, baseline), (right, baseline)], fill=INK, width=1)

    listing = ", ".join(f"{c} {v}" for c, v in zip(colors, values, strict=True))
    if kind == "value":
        j = int(rng.integers(n_bars))
        question = f"What is the value of the {colors[j]} bar?"
        answer, fact = str(values[j]), f"The {colors[j]} bar has the value {values[j]}."
    elif kind == "difference":
        while True:
            a, b = (int(v) for v in rng.choice(n_bars, size=2, replace=False))
            if values[a] != values[b]:
                break
        hi, lo = (a, b) if values[a] > values[b] else (b, a)
        question = (
            f"How much larger is the value of the {colors[hi]} bar than the {colors[lo]} bar?"
        )
        answer = str(values[hi] - values[lo])
        fact = f"The bar values are: {listing}."
    else:
        question = "Which color is the tallest bar?"
        answer = colors[int(np.argmax(values))]
        fact = f"The bar values are: {listing}."
    return _Item(image, question, answer, fact, f"bar_{kind}")


def _triangle_from_sides(a: float, b: float, c: float) -> np.ndarray:
    """Vertices A, B, C (rows) with |BC| = a, |CA| = b, |AB| = c; C above AB (y up)."""
    cos_a = (b * b + c * c - a * a) / (2 * b * c)
    angle_a = math.acos(max(-1.0, min(1.0, cos_a)))
    return np.array([[0.0, 0.0], [c, 0.0], [b * math.cos(angle_a), b * math.sin(angle_a)]])


def _angles_deg(v: np.ndarray) -> np.ndarray:
    out = []
    for k in range(3):
        p, q, r = v[k], v[(k + 1) % 3], v[(k + 2) % 3]
        u, w = q - p, r - p
        cos = float(u @ w / (np.linalg.norm(u) * np.linalg.norm(w)))
        out.append(math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
    return np.array(out)


def _gen_geometry(rng: np.random.Generator, size: int, difficulty: int) -> _Item:
    d = min(difficulty, 4)
    kinds = ["perimeter", "angle"] + (["hypotenuse"] if difficulty >= 2 else [])
    kind = _pick(rng, kinds)
    labels: dict = {}
    if kind == "perimeter":
        lo, hi = (3, 9) if d == 1 else (4, 10 * d)
        while True:
            a, b, c = (int(v) for v in rng.integers(lo, hi + 1, size=3))
            if a + b > c and b + c > a and c + a > b:
                verts = _triangle_from_sides(a, b, c)
                if _angles_deg(verts).min() >= 25:
                    break
        labels = {"sides": {"BC": a, "CA": b, "AB": c}}
        question = "What is the perimeter of triangle ABC?"
        answer = str(a + b + c)
        fact = f"In triangle ABC, AB = {c}, BC = {a} and CA = {b}."
    elif kind == "angle":
        step = 10 if d == 1 else 5
        while True:
            ang_a, ang_b = (
                int(v) * step for v in rng.integers(30 // step, 100 // step + 1, size=2)
            )
            if 180 - ang_a - ang_b >= 30:
                break
        ang_c = 180 - ang_a - ang_b
        ra, rb, rc = (math.radians(x) for x in (ang_a, ang_b, ang_c))
        verts = _triangle_from_sides(math.sin(ra), math.sin(rb), math.sin(rc))  # law of sines
        labels = {"angles": {"A": ang_a, "B": ang_b}}
        question = "What is the measure of angle C in degrees?"
        answer = str(ang_c)
        fact = f"In triangle ABC, angle A = {ang_a}° and angle B = {ang_b}°."
    else:
        triple = _PYTHAGOREAN[int(rng.integers(len(_PYTHAGOREAN)))]
        leg1, leg2 = (triple[0], triple[1]) if rng.random() < 0.5 else (triple[1], triple[0])
        # Right angle at C: |BC| = leg1, |CA| = leg2, hypotenuse |AB|.
        verts = _triangle_from_sides(leg1, leg2, triple[2])
        labels = {"sides": {"BC": leg1, "CA": leg2}, "right_angle": "C"}
        question = "Triangle ABC has a right angle at C. What is the length of AB?"
        answer = str(triple[2])
        fact = f"In triangle ABC, BC = {leg1} and CA = {leg2}."

    # Random rotation / reflection, then fit into the canvas (y grows downwards in images).
    theta = float(rng.uniform(0, 2 * math.pi))
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    pts = verts @ rot.T
    if rng.random() < 0.5:
        pts[:, 0] = -pts[:, 0]
    margin = (0.27 if "angles" in labels else 0.2) * size  # room for the labels outside
    span = (pts.max(0) - pts.min(0)).max()
    pts = (pts - pts.min(0)) * ((size - 2 * margin) / span)
    pts += (size - pts.max(0)) / 2  # centre (pts.min is 0 here)
    pts[:, 1] = size - pts[:, 1]

    fs = _font_size(size)
    image, draw = _canvas(size)
    corners = [tuple(p) for p in pts]
    draw.line([*corners, corners[0]], fill=FIGURE, width=2, joint="curve")
    centroid = pts.mean(0)
    names = ("A", "B", "C")
    angles = labels.get("angles", {})
    for name, p in zip(names, pts, strict=True):
        # Vertex names (with the angle where it is given, "A=50°") sit outside the figure,
        # beyond the vertex as seen from the centroid, so they never cover a side.
        text = f"{name}={angles[name]}°" if name in angles else name
        left, top, right, bottom = draw.textbbox((0, 0), text, font=_font(fs), anchor="mm")
        out = (p - centroid) / np.linalg.norm(p - centroid)
        reach = fs * 0.4 + 0.5 * (abs(out[0]) * (right - left) + abs(out[1]) * (bottom - top))
        _text(draw, tuple(p + out * reach), text, size, fs)
    index = {name: k for k, name in enumerate(names)}
    for side, value in labels.get("sides", {}).items():
        p, q = pts[index[side[0]]], pts[index[side[1]]]
        mid = (p + q) / 2
        normal = np.array([-(q - p)[1], (q - p)[0]]) / np.linalg.norm(q - p)
        if normal @ (mid - centroid) < 0:
            normal = -normal
        _text(draw, tuple(mid + normal * fs * 0.8), str(value), size, fs)
    if labels.get("right_angle"):
        _draw_right_angle_mark(draw, pts, index[labels["right_angle"]], fs)
    return _Item(image, question, answer, fact, f"geometry_{kind}", {"labels": labels})


def _draw_right_angle_mark(draw: ImageDraw.ImageDraw, pts: np.ndarray, k: int, fs: int) -> None:
    p = pts[k]
    u = pts[(k + 1) % 3] - p
    w = pts[(k + 2) % 3] - p
    u, w = u / np.linalg.norm(u), w / np.linalg.norm(w)
    s = fs * 0.6
    corner = [tuple(p + u * s), tuple(p + (u + w) * s), tuple(p + w * s)]
    draw.line(corner, fill=INK, width=1)


_GENERATORS = {
    "count": _gen_count,
    "attribute": _gen_attribute,
    "position": _gen_position,
    "compare_length": _gen_compare_length,
    "bar_chart": _gen_bar_chart,
    "geometry": _gen_geometry,
}
