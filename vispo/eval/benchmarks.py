"""The benchmark registry: names that ``vispo eval --benchmarks`` and ``vispo probe`` accept.

Built in (no files needed):

* ``easy-vqa``: the easy-vqa test split (9,673 questions); ``easy-vqa-vd`` its
  vision-dependent subset: the questions that the text prior (each question string's most
  frequent training answer) gets wrong (``meta["vision_dependent"]``); ``easy-vqa-val``
  easy-vqa's validation split (1,005 questions of 107 train images that training never
  sees: tune on it, not on the test split); ``easy-vqa-cf`` 856 counterfactual questions
  whose drawn image contradicts the text prior (:mod:`vispo.data.counterfactual`; the prior
  scores 0 there).
* ``synthetic``: 500 seeded synthetic questions (:func:`vispo.data.synthetic_vqa`, split
  ``test``, seed 0, difficulty 1); ``synthetic-vd`` those whose question does not state the
  deciding fact; ``synthetic-hard`` / ``synthetic-hard-vd`` the same at difficulty 3.

Local copies of the papers' benchmarks, in the PAPO evaluation format (a ShareGPT JSON list of
``{"messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant",
"content": "answer"}], "images": ["relative/path.png"]}`` records plus an image folder),
looked up under ``--data-root`` (see :func:`find_local_file` for the accepted layouts):

==================  ==================  =========================================
name                group               file names tried (``<name>.json`` too)
==================  ==================  =========================================
geometry3k          general             hiyouga_geometry3k
mathvista           general             AI4Math_MathVista
wemath              general             We_Math, We-Math_We-Math
mmk12               general             FanqingM_MMK12, MMK12, papo_mm_eureka_test
mathverse           general             AI4Math_MathVerse
mathvision          general             MathLLMs_MathVision, MathVision
dynamath            general             DynaMath_DynaMath, DynaMath
logicvista          vision-dependent    lscpku_LogicVista
clevr-count         vision-dependent    BUAADreamer_clevr_count_70k
mmmu-pro            vision-dependent    MMMU_MMMU_Pro
mmmu-pro-vision     vision-dependent    MMMU_MMMU_Pro_vision
mathverse-vision    vision-dependent    AI4Math_MathVerse_vision_dependent
==================  ==================  =========================================

Any other name that matches a file under ``--data-root`` is accepted too (group
``general``), so a user's own benchmark in the same format needs no registration;
:func:`register_benchmark` adds one in code.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from vispo.data import SampleDataset, easy_vqa, load_samples, synthetic_vqa

GENERAL = "general"
VISION_DEPENDENT = "vision-dependent"

#: Default answer-length caps by template kind (a one-word answer vs. reasoning).
SHORT_MAX_NEW_TOKENS = 16
REASONING_MAX_NEW_TOKENS = 1024


class BenchmarkError(ValueError):
    """A benchmark name is unknown, or its files are missing or unreadable."""


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One named evaluation set.

    Attributes:
        name: the registry name.
        group: ``"general"`` or ``"vision-dependent"`` (groups are macro-averaged).
        loader: ``loader(data_root, limit) -> SampleDataset``; ``data_root`` may be None for
            built-in sets.
        template: default prompt template name (``short`` for one-word answers,
            ``reasoning`` for the papers' think-then-box prompt).
        reward: default reward name (its ``accuracy`` component is the correctness).
        description: one line for ``vispo eval --list``.
        local: True when the data comes from files under ``--data-root``.
    """

    name: str
    group: str
    loader: Callable[[Path | None, int | None], SampleDataset]
    template: str = "reasoning"
    reward: str = "math"
    description: str = ""
    local: bool = False

    @property
    def max_new_tokens(self) -> int:
        """Default length cap for this benchmark's template."""
        return SHORT_MAX_NEW_TOKENS if self.template == "short" else REASONING_MAX_NEW_TOKENS

    def load(self, data_root: str | Path | None = None, limit: int | None = None):
        """The benchmark's samples (the first ``limit`` of them)."""
        if limit is not None and limit < 1:
            raise BenchmarkError(f"{self.name}: limit must be >= 1, got {limit}")
        data = self.loader(None if data_root is None else Path(data_root), limit)
        if len(data) == 0:
            raise BenchmarkError(f"benchmark {self.name!r} has no samples")
        return data


def _first(data: SampleDataset, limit: int | None) -> SampleDataset:
    return data if limit is None else data[:limit]


def _vision_dependent(data: SampleDataset) -> SampleDataset:
    return data.filter(lambda s: bool(s.meta.get("vision_dependent")))


def _easy_vqa(vd: bool) -> Callable:
    def load(_root, limit):
        data = easy_vqa("test")
        return _first(_vision_dependent(data) if vd else data, limit)

    return load


def _easy_vqa_val(_root, limit):
    return easy_vqa("validation", limit=limit)


def _easy_vqa_cf(_root, limit):
    from vispo.data.counterfactual import easy_vqa_counterfactual

    return easy_vqa_counterfactual(limit)


def _synthetic(vd: bool, difficulty: int) -> Callable:
    def load(_root, limit):
        data = synthetic_vqa(500, split="test", seed=0, difficulty=difficulty)
        return _first(_vision_dependent(data) if vd else data, limit)

    return load


#: PAPO-format benchmarks: name -> (group, file stems tried under --data-root).
PAPO_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "geometry3k": (GENERAL, ("hiyouga_geometry3k",)),
    "mathvista": (GENERAL, ("AI4Math_MathVista",)),
    "wemath": (GENERAL, ("We_Math", "We-Math_We-Math")),
    "mmk12": (GENERAL, ("FanqingM_MMK12", "MMK12", "papo_mm_eureka_test")),
    "mathverse": (GENERAL, ("AI4Math_MathVerse",)),
    "mathvision": (GENERAL, ("MathLLMs_MathVision", "MathVision")),
    "dynamath": (GENERAL, ("DynaMath_DynaMath", "DynaMath")),
    "logicvista": (VISION_DEPENDENT, ("lscpku_LogicVista",)),
    "clevr-count": (VISION_DEPENDENT, ("BUAADreamer_clevr_count_70k",)),
    "mmmu-pro": (VISION_DEPENDENT, ("MMMU_MMMU_Pro",)),
    "mmmu-pro-vision": (VISION_DEPENDENT, ("MMMU_MMMU_Pro_vision",)),
    "mathverse-vision": (VISION_DEPENDENT, ("AI4Math_MathVerse_vision_dependent",)),
}


def find_local_file(data_root: Path, name: str, stems: tuple[str, ...] = ()) -> Path:
    """The JSON file of benchmark ``name`` under ``data_root``.

    Tried in order, for each stem in ``stems + (name,)``:

    1. ``<data_root>/papo/<stem>.json`` (the layout PAPO's preprocessing script writes,
       images under ``<data_root>/images/``);
    2. ``<data_root>/<stem>.json``;
    3. ``<data_root>/<stem>/`` holding exactly one ``.json`` / ``.jsonl`` file.

    Raises :class:`BenchmarkError` listing every path tried.
    """
    tried: list[str] = []
    for stem in (*stems, name):
        for candidate in (data_root / "papo" / f"{stem}.json", data_root / f"{stem}.json"):
            tried.append(str(candidate))
            if candidate.is_file():
                return candidate
        folder = data_root / stem
        tried.append(f"{folder}/*.json")
        if folder.is_dir():
            files = sorted(
                p
                for p in folder.iterdir()
                if p.suffix in (".json", ".jsonl") and not p.name.startswith(".")
            )
            if len(files) == 1:
                return files[0]
            if len(files) > 1:
                raise BenchmarkError(
                    f"benchmark {name!r}: {folder} holds several JSON files "
                    f"({', '.join(p.name for p in files)}); keep one"
                )
    raise BenchmarkError(
        f"benchmark {name!r}: no data file under --data-root {data_root}; tried: "
        + ", ".join(tried)
        + " (docs/evaluation.md describes the layout)"
    )


def _first_image_path(path: Path) -> str | None:
    """The first relative image path named in a JSON/JSONL benchmark file, if any."""
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as fh:
                records = [json.loads(line) for line in fh if line.strip()][:20]
        else:
            records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"{path}: cannot read the benchmark file ({exc})") from None
    if not isinstance(records, list):
        return None
    for rec in records[:20]:
        images = rec.get("images", rec.get("image")) if isinstance(rec, dict) else None
        images = images if isinstance(images, list) else [images]
        for im in images:
            if isinstance(im, str) and im and not Path(im).is_absolute():
                return im
    return None


def _has_local_file(data_root: Path, name: str) -> bool:
    """Whether :func:`find_local_file` finds a file for ``name`` under ``data_root``."""
    try:
        find_local_file(data_root, name)
    except BenchmarkError:
        return False
    return True


def image_root_for(path: Path, data_root: Path) -> Path:
    """Where the file's relative image paths resolve: the first of ``data_root``, the file's
    folder and its parent that contains the first image named in the file."""
    first = _first_image_path(path)
    candidates = [data_root, path.parent, path.parent.parent]
    if first is not None:
        for root in candidates:
            if (root / first).exists():
                return root
    return path.parent


def _local(name: str, stems: tuple[str, ...]) -> Callable:
    def load(data_root, limit):
        if data_root is None:
            raise BenchmarkError(
                f"benchmark {name!r} is read from local files: pass --data-root DIR "
                "(docs/evaluation.md describes the layout)"
            )
        if not data_root.is_dir():
            raise BenchmarkError(f"--data-root {data_root} is not a folder")
        path = find_local_file(data_root, name, stems)
        data = load_samples(path, image_root=image_root_for(path, data_root), limit=limit)
        if data.n_skipped:
            first = data.errors[0] if data.errors else ""
            raise BenchmarkError(
                f"benchmark {name!r} ({path}): {data.n_skipped} unusable record(s) "
                f"({dict(data.skipped)}); first: {first}"
            )
        return data

    return load


BENCHMARKS: dict[str, Benchmark] = {}


def register_benchmark(benchmark: Benchmark, *, overwrite: bool = False) -> Benchmark:
    """Add ``benchmark`` to the registry (an existing name needs ``overwrite=True``)."""
    if benchmark.group not in (GENERAL, VISION_DEPENDENT):
        raise BenchmarkError(
            f"benchmark {benchmark.name!r}: group must be {GENERAL!r} or {VISION_DEPENDENT!r}, "
            f"got {benchmark.group!r}"
        )
    if benchmark.name in BENCHMARKS and not overwrite:
        raise BenchmarkError(f"benchmark {benchmark.name!r} is already registered")
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


for _vd in (False, True):
    _suffix = "-vd" if _vd else ""
    _group = VISION_DEPENDENT if _vd else GENERAL
    register_benchmark(
        Benchmark(
            f"easy-vqa{_suffix}",
            _group,
            _easy_vqa(_vd),
            template="short",
            reward="math",
            description="easy-vqa test split"
            + (" where the text prior is wrong (needs the image)" if _vd else " (9,673 q.)"),
        )
    )
    for _difficulty, _label in ((1, "synthetic"), (3, "synthetic-hard")):
        register_benchmark(
            Benchmark(
                f"{_label}{_suffix}",
                _group,
                _synthetic(_vd, _difficulty),
                template="short",
                reward="math",
                description=f"500 seeded synthetic questions, difficulty {_difficulty}"
                + (", not answerable from the text" if _vd else ""),
            )
        )
register_benchmark(
    Benchmark(
        "easy-vqa-val",
        GENERAL,
        _easy_vqa_val,
        template="short",
        reward="math",
        description="easy-vqa validation split (1,005 q. of 107 train images never trained on)",
    )
)
register_benchmark(
    Benchmark(
        "easy-vqa-cf",
        VISION_DEPENDENT,
        _easy_vqa_cf,
        template="short",
        reward="math",
        description="856 drawn easy-vqa-style q. whose image contradicts the text prior",
    )
)
for _name, (_group, _stems) in PAPO_FILES.items():
    register_benchmark(
        Benchmark(
            _name,
            _group,
            _local(_name, _stems),
            template="reasoning",
            reward="math",
            description=f"local PAPO-format copy ({_stems[0]}.json)",
            local=True,
        )
    )


def get_benchmark(name: str, data_root: str | Path | None = None) -> Benchmark:
    """The registered benchmark ``name``, or a local PAPO-format file of that name under
    ``data_root`` (group ``general``)."""
    key = name.strip()
    if key in BENCHMARKS:
        return BENCHMARKS[key]
    lowered = key.lower().replace("_", "-")
    if lowered in BENCHMARKS:
        return BENCHMARKS[lowered]
    if data_root is not None:
        root = Path(data_root)
        if _has_local_file(root, key):
            return Benchmark(
                key,
                GENERAL,
                _local(key, ()),
                template="reasoning",
                reward="math",
                description="local file",
                local=True,
            )
    raise BenchmarkError(
        f"unknown benchmark {name!r}; registered: {', '.join(BENCHMARKS)}"
        + ("" if data_root is None else f"; and no file named {key!r} under {data_root}")
    )


def parse_benchmarks(spec: str | list[str], data_root: str | Path | None = None) -> list:
    """``"a,b,c"`` (or a list) -> the benchmarks, in order, duplicates removed."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise BenchmarkError("no benchmark named (e.g. --benchmarks easy-vqa,easy-vqa-vd)")
    out: dict[str, Benchmark] = {}
    for n in names:
        b = get_benchmark(n, data_root)
        out.setdefault(b.name, b)
    return list(out.values())


def data_file_benchmark(
    path: str | Path,
    *,
    split: str = "test",
    columns: dict | None = None,
    image_root: str | Path | None = None,
) -> Benchmark:
    """A data file or folder as a benchmark (``vispo eval --data``): any layout that
    ``data.name`` accepts (docs/data.md). Named after the file; group ``general``; bad rows are
    skipped and counted, as in training."""
    p = Path(path)
    if not p.exists():
        raise BenchmarkError(f"--data {str(path)!r}: no such file or folder")

    def load(_root, limit):
        from vispo.data import DataError

        try:
            return load_samples(
                str(p),
                split=split,
                columns=columns,
                image_root=image_root,
                limit=limit,
                validate_images=True,
            )
        except DataError as e:
            raise BenchmarkError(f"--data {str(path)!r}: {e}") from None

    return Benchmark(p.name, GENERAL, load, description=f"data file {p}", local=True)


def held_out_benchmark(run_config) -> Benchmark:
    """A run's own held-out set (what the trainer scored: :func:`vispo.train.setup.held_out`),
    rebuilt from the run's data config. ``vispo eval RUN`` uses it by default."""
    dcfg = run_config.data

    def load(_root, limit):
        from vispo.train.setup import load_eval_data

        data = load_eval_data(dcfg)
        if data is None:
            raise BenchmarkError(
                "the run has no held-out set (data.eval_size=0): name data with --data FILE "
                "or --benchmarks"
            )
        return data if limit is None else data[:limit]

    return Benchmark(
        "held-out",
        GENERAL,
        load,
        template=dcfg.template,
        description=f"the run's held-out set of {dcfg.name}",
        local=True,
    )


def describe_benchmarks() -> str:
    """One line per registered benchmark, for ``vispo eval --list``."""
    width = max(len(n) for n in BENCHMARKS)
    return "\n".join(
        f"  {b.name:<{width}}  {b.group:<16}  {b.description}" for b in BENCHMARKS.values()
    )
