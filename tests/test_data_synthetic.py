"""vispo.data.synthetic: determinism, and answers read back from the pixels independently.

The checks never look at the generator's internals: objects are found as connected components
of their exact colour, shapes are told apart by how much of their bounding box they fill,
positions come from centroids, line lengths from the principal axis of a colour's pixels, bar
values by counting grid lines under a bar's top, and triangle angles and side ratios from the
vertices of the figure's outline.
"""

from __future__ import annotations

import math
import re
from collections import Counter, deque

import numpy as np
import pytest

from vispo.data import SYNTHETIC_TASKS, synthetic_vqa
from vispo.data.synthetic import COLORS, FIGURE, GRID, INK

SIZE = 128


@pytest.fixture(scope="module")
def items():
    """A mix of difficulties and seeds, 3 x 3 x 60 = 540 items (about 1 s)."""
    out = []
    for difficulty in (1, 2, 3):
        for seed in (0, 1, 2):
            out.extend(synthetic_vqa(60, seed=seed, difficulty=difficulty, image_size=SIZE))
    return out


def _by_task(items, task):
    chosen = [s for s in items if s.meta["task"] == task]
    assert len(chosen) >= 60
    return chosen


def _pixels(sample) -> np.ndarray:
    (img,) = sample.images
    assert img.size == (SIZE, SIZE) and img.mode == "RGB"
    return np.asarray(img)


def _mask(arr: np.ndarray, rgb) -> np.ndarray:
    return np.all(arr == np.array(rgb, dtype=np.uint8), axis=-1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an array of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pts = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pts.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]:
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        comps.append(np.array(pts))
    return comps


def _shape(comp: np.ndarray) -> str:
    """Square fills its bounding box, a disc pi/4 of it, a triangle half."""
    h = comp[:, 0].max() - comp[:, 0].min() + 1
    w = comp[:, 1].max() - comp[:, 1].min() + 1
    fill = len(comp) / (h * w)
    return "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"


def _objects(arr: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    """(colour, shape, centroid (y, x)) of every drawn object."""
    out = []
    for name, rgb in COLORS.items():
        for comp in _components(_mask(arr, rgb)):
            out.append((name, _shape(comp), comp.mean(0)))
    return out


def _colour_in(text: str) -> list[str]:
    """Colour names in the order they occur in ``text``."""
    found = [(m.start(), m.group(0)) for m in re.finditer("|".join(COLORS), text)]
    return [name for _, name in sorted(found)]


def _question_part(sample) -> str:
    """The question without a text-only fact sentence in front of it."""
    return re.split(r"(?<=\.) ", sample.question)[-1]


# ---------------------------------------------------------------------------------------------
# Determinism and coverage
# ---------------------------------------------------------------------------------------------


def _fingerprint(ds):
    return [(s.id, s.question, s.answer, np.asarray(s.images[0]).tobytes()) for s in ds]


def test_same_seed_same_items_and_prefix_stability():
    a = synthetic_vqa(24, seed=5, difficulty=2)
    b = synthetic_vqa(24, seed=5, difficulty=2)
    assert _fingerprint(a) == _fingerprint(b)
    # The first k items do not depend on n.
    assert _fingerprint(synthetic_vqa(10, seed=5, difficulty=2)) == _fingerprint(a)[:10]
    other_seed = synthetic_vqa(24, seed=6, difficulty=2)
    other_split = synthetic_vqa(24, seed=5, difficulty=2, split="test")
    for other in (other_seed, other_split):
        pairs = zip(_fingerprint(a), _fingerprint(other), strict=True)
        assert sum(x[3] != y[3] for x, y in pairs) >= 22


def test_every_task_is_produced_in_turn():
    ds = synthetic_vqa(12, seed=0)
    assert [s.meta["task"] for s in ds] == list(SYNTHETIC_TASKS) * 2
    assert Counter(s.meta["task"] for s in synthetic_vqa(5, tasks=("count", "geometry"))) == {
        "count": 3,
        "geometry": 2,
    }
    assert all(s.meta["split"] == "train" and s.meta["difficulty"] == 1 for s in ds)
    assert synthetic_vqa(2, tasks="bar_chart")[1].meta["task"] == "bar_chart"


def test_bad_arguments():
    with pytest.raises(ValueError, match="difficulty"):
        synthetic_vqa(1, difficulty=0)
    with pytest.raises(ValueError, match="tasks"):
        synthetic_vqa(1, tasks=("count", "ocr"))
    with pytest.raises(ValueError, match="image_size"):
        synthetic_vqa(1, image_size=32)
    with pytest.raises(ValueError, match="text_answerable_frac"):
        synthetic_vqa(1, text_answerable_frac=1.5)


def test_difficulty_adds_objects():
    def mean_objects(difficulty):
        ds = synthetic_vqa(60, seed=1, difficulty=difficulty, tasks=("count",))
        return np.mean([len(_objects(_pixels(s))) for s in ds])

    assert mean_objects(1) + 3 < mean_objects(3)


# ---------------------------------------------------------------------------------------------
# Answers agree with the pixels
# ---------------------------------------------------------------------------------------------


def test_count_answers_match_connected_components(items):
    for s in _by_task(items, "count"):
        q = _question_part(s)
        m = re.fullmatch(r"How many (\w+) (shapes|circles|squares|triangles) are in the image\?", q)
        color, noun = m.group(1), m.group(2)
        objs = [o for o in _objects(_pixels(s)) if o[0] == color]
        if noun != "shapes":
            objs = [o for o in objs if o[1] == noun[:-1]]
        assert len(objs) == int(s.answer), s.id


def test_attribute_answers_match_the_object(items):
    for s in _by_task(items, "attribute"):
        q = _question_part(s)
        objs = _objects(_pixels(s))
        if m := re.fullmatch(r"What color is the (\w+)\?", q):
            matches = [o for o in objs if o[1] == m.group(1)]
            assert len(matches) == 1 and matches[0][0] == s.answer, s.id
        else:
            m = re.fullmatch(r"What shape is the (\w+) object\?", q)
            matches = [o for o in objs if o[0] == m.group(1)]
            assert len(matches) == 1 and matches[0][1] == s.answer, s.id


def test_position_answers_match_centroids(items):
    kinds = Counter()
    for s in _by_task(items, "position"):
        q = _question_part(s)
        objs = _objects(_pixels(s))
        colours = _colour_in(q)
        centre = {c: next(o[2] for o in objs if o[0] == c) for c in colours}
        assert all(sum(o[0] == c for o in objs) == 1 for c in colours), s.id
        y, x = centre[colours[0]]
        if "side of the image" in q:
            assert s.answer == ("left" if x < SIZE / 2 else "right"), s.id
        elif "half of the image" in q:
            assert s.answer == ("top" if y < SIZE / 2 else "bottom"), s.id
        elif "to the left or to the right of" in q:
            assert s.answer == ("left" if x < centre[colours[1]][1] else "right"), s.id
        else:
            assert "above or below" in q
            assert s.answer == ("above" if y < centre[colours[1]][0] else "below"), s.id
        kinds[s.meta["kind"]] += 1
    assert set(kinds) == {"absolute_position", "relative_position"}


def _extent(points: np.ndarray) -> float:
    """Length of a thick segment: the spread of its pixels along their principal axis."""
    centred = points - points.mean(0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    proj = centred @ axis
    return float(proj.max() - proj.min())


def test_longer_line_is_longer_in_pixels(items):
    for s in _by_task(items, "compare_length"):
        arr = _pixels(s)
        c1, c2 = _colour_in(_question_part(s))
        lengths = {c: _extent(np.argwhere(_mask(arr, COLORS[c]))) for c in (c1, c2)}
        assert s.answer == max(lengths, key=lengths.get), s.id
        assert max(lengths.values()) / min(lengths.values()) > 1.08


def _bar_values(arr: np.ndarray) -> dict[str, int]:
    """Value of each bar = number of grid lines at or below its top (above the x-axis)."""
    ink_rows = np.nonzero(_mask(arr, INK).sum(1) > SIZE * 0.5)[0]
    baseline = int(ink_rows.max())  # the x-axis
    grid_rows = [int(y) for y in np.nonzero(_mask(arr, GRID).sum(1) >= 3)[0] if y < baseline]
    values = {}
    for name, rgb in COLORS.items():
        ys = np.nonzero(_mask(arr, rgb))[0]
        if len(ys):
            assert ys.max() == baseline - 1  # bars stand on the axis
            values[name] = sum(y >= ys.min() for y in grid_rows)
    return values


def test_bar_chart_answers_match_bar_heights(items):
    kinds = Counter()
    for s in _by_task(items, "bar_chart"):
        values = _bar_values(_pixels(s))
        assert 3 <= len(values) <= 6
        q = _question_part(s)
        colours = _colour_in(q)
        if q.startswith("What is the value"):
            assert int(s.answer) == values[colours[0]], s.id
        elif q.startswith("How much larger"):
            assert int(s.answer) == values[colours[0]] - values[colours[1]] > 0, s.id
        else:
            assert q == "Which color is the tallest bar?"
            assert s.answer == max(values, key=values.get), s.id
            assert sorted(values.values())[-1] > sorted(values.values())[-2]
        kinds[s.meta["kind"]] += 1
    assert set(kinds) == {"bar_value", "bar_difference", "bar_tallest"}


def _segment_distance(pts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    t = np.clip((pts - a) @ (b - a) / ((b - a) @ (b - a)), 0.0, 1.0)
    return np.linalg.norm(pts - (a + t[:, None] * (b - a)), axis=1)


def _triangle(arr: np.ndarray) -> np.ndarray:
    """Vertices of the drawn triangle, from the outline's pixels.

    Rough vertices: the farthest pair of pixels, then the pixel farthest from their line. Then
    each side's pixels (away from the corners) get a least-squares line, and the refined
    vertices are where those lines meet, which removes the bias of the 2 px wide stroke.
    """
    pts = np.argwhere(_mask(arr, FIGURE))[:, ::-1].astype(float)  # (x, y)
    d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(np.argmax(d2), d2.shape)
    p, q = pts[i], pts[j]
    u = (q - p) / np.linalg.norm(q - p)
    rough = np.stack([p, q, pts[np.argmax(np.abs((pts - p) @ np.array([-u[1], u[0]])))]])
    dists = np.stack([_segment_distance(pts, rough[k], rough[(k + 1) % 3]) for k in range(3)])
    near_corner = np.linalg.norm(pts[None] - rough[:, None], axis=2).min(0) < 6
    lines = []  # (point, unit direction) of side k = rough[k] -> rough[k + 1]
    for k in range(3):
        side = pts[(dists.argmin(0) == k) & ~near_corner]
        centre = side.mean(0)
        lines.append((centre, np.linalg.svd(side - centre, full_matrices=False)[2][0]))
    verts = []
    for k in range(3):  # vertex k joins side k-1 and side k
        (p1, d1), (p2, d2_) = lines[k - 1], lines[k]
        t = np.linalg.solve(np.stack([d1, -d2_], axis=1), p2 - p1)
        verts.append(p1 + t[0] * d1)
    return np.array(verts)


def _angles(v: np.ndarray) -> list[float]:
    out = []
    for k in range(3):
        a, b = v[(k + 1) % 3] - v[k], v[(k + 2) % 3] - v[k]
        out.append(math.degrees(math.acos(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))))
    return out


def _sides(v: np.ndarray) -> list[float]:
    return sorted(float(np.linalg.norm(v[k] - v[(k + 1) % 3])) for k in range(3))


def test_geometry_answers_follow_from_the_labels_and_the_drawing(items):
    kinds = Counter()
    for s in _by_task(items, "geometry"):
        verts = _triangle(_pixels(s))
        labels, kind, answer = s.meta["labels"], s.meta["kind"], int(s.answer)
        if kind == "geometry_angle":
            a, b = labels["angles"]["A"], labels["angles"]["B"]
            assert answer == 180 - a - b
            assert np.allclose(sorted(_angles(verts)), sorted([a, b, answer]), atol=4.5), s.id
        else:
            sides = list(labels["sides"].values())
            if kind == "geometry_perimeter":
                assert answer == sum(sides)
            else:
                assert kind == "geometry_hypotenuse" and answer**2 == sides[0] ** 2 + sides[1] ** 2
                # Drawn sides proportional to (leg, leg, hypotenuse) (checked below) make the
                # drawn angle at C right, by the converse of Pythagoras' theorem.
                sides = [*sides, answer]
            measured = _sides(verts)
            scale = sum(measured) / sum(sides)
            assert np.allclose(measured, np.array(sorted(sides)) * scale, atol=2.5), s.id
        kinds[kind] += 1
    assert set(kinds) == {"geometry_angle", "geometry_perimeter", "geometry_hypotenuse"}


# ---------------------------------------------------------------------------------------------
# The text-prior control
# ---------------------------------------------------------------------------------------------


def _solve_from_text(s) -> str:
    """Answer a text-answerable item from its question alone."""
    q, kind = s.question, s.meta["kind"]
    nums = [int(n) for n in re.findall(r"\d+", q)]
    if kind.startswith("count") or kind == "bar_value":
        return str(nums[0])
    if kind == "color_of_shape" or kind == "shape_of_color":
        return re.search(r" is a?\s?(\w+)\.", q).group(1)
    if kind.endswith("position"):
        return re.search(r"\b(left|right|top|bottom|above|below)\b", q).group(1)
    if kind == "compare_length":
        c1, c2 = _colour_in(q.split(".")[0])
        return c1 if nums[0] > nums[1] else c2
    if kind in ("bar_difference", "bar_tallest"):
        values = dict(re.findall(r"(\w+) (\d+)", q.split(": ")[1].split(".")[0]))
        if kind == "bar_tallest":
            return max(values, key=lambda c: int(values[c]))
        c1, c2 = _colour_in(_question_part(s))
        return str(int(values[c1]) - int(values[c2]))
    if kind == "geometry_angle":
        return str(180 - nums[0] - nums[1])
    if kind == "geometry_perimeter":
        return str(sum(nums))
    assert kind == "geometry_hypotenuse"
    return str(math.isqrt(nums[0] ** 2 + nums[1] ** 2))


def test_text_answerable_items_are_solvable_from_text_and_the_rest_are_not(items):
    answerable = [s for s in items if s.meta["answerable_without_image"]]
    assert 0.05 < len(answerable) / len(items) < 0.15  # default fraction 0.1
    assert {s.meta["task"] for s in answerable} == set(SYNTHETIC_TASKS)
    for s in answerable:
        assert s.meta["vision_dependent"] is False
        assert _solve_from_text(s) == s.answer, s.id
    for s in items:
        if s.meta["answerable_without_image"]:
            continue
        assert s.meta["vision_dependent"] is True
        assert not re.search(r"\d", s.question), s.id  # no number in the text
        if s.meta["task"] == "attribute":
            assert s.answer not in s.question, s.id
    none = synthetic_vqa(30, text_answerable_frac=0.0)
    assert not any(s.meta["answerable_without_image"] for s in none)
