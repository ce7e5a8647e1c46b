"""``vispo eval``: avg@k and greedy accuracy of a model on benchmarks, resumable.

For each benchmark and each mode (``avg@k``: ``k`` samples per question at ``temperature`` /
``top_p``; ``greedy``: one answer at temperature 0) the questions are cut into fixed batches
of ``batch_size`` (batch ``b`` = questions ``b*batch_size ...``), generated with one
``generate`` call each, seeded by (seed, benchmark, mode, batch start). Every scored question
is appended to ``results.jsonl`` as soon as its batch finishes, so an interrupted evaluation
picks up where it stopped: a batch whose questions are all on file (with the same settings)
is not generated again, and because batches and seeds do not depend on what was already done,
a resumed run ends with exactly the numbers of an uninterrupted one.

Outputs in ``out_dir``: ``results.jsonl`` (one line per question and mode: its answers and
their correctness), ``eval.json`` (the summary: per benchmark, per group, overall) and
``eval.md`` (the table). Several models: :func:`write_comparison` writes ``comparison.md``
and ``comparison.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from vispo.eval.accuracy import correctness, generate_batch, reward_inputs
from vispo.eval.benchmarks import Benchmark
from vispo.eval.image_modes import IMAGE_MODES, derangement, donor_seed, with_image
from vispo.eval.loading import LoadedModel
from vispo.eval.metrics import summarize
from vispo.eval.tables import comparison_markdown, run_table

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "eval.json"
TABLE_FILE = "eval.md"


@dataclasses.dataclass
class EvalSettings:
    """How to evaluate (defaults: the papers' avg@8 at T=1.0, top_p=1.0, plus greedy).

    Attributes:
        k: samples per question for avg@k (0: no sampled mode).
        temperature: sampling temperature of avg@k (> 0).
        top_p: nucleus mass of avg@k.
        greedy: also report greedy accuracy (k=1, T=0).
        seed: base seed of the sampled batches.
        batch_size: questions per ``generate`` call (part of what makes results reproducible).
        max_new_tokens: answer length cap (None: the model's run config, else the benchmark's).
        template: prompt template (None: the run's, else the benchmark's).
        reward: reward whose ``accuracy`` component is the correctness (None: the run's,
            else the benchmark's).
        limit: evaluate only the first ``limit`` questions of each benchmark.
        keep_responses: store the answers' texts in ``results.jsonl``.
        image_mode: the image each question is asked with (:mod:`vispo.eval.image_modes`):
            ``"real"`` its own, ``"gray"`` a uniform gray image of the same size, ``"other"``
            another question's of the same benchmark (a fixed seeded derangement of the
            evaluated questions, preferring an image whose answer differs).
    """

    k: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = True
    seed: int = 0
    batch_size: int = 16
    max_new_tokens: int | None = None
    template: str | None = None
    reward: str | None = None
    limit: int | None = None
    keep_responses: bool = True
    image_mode: str = "real"

    def validate(self) -> EvalSettings:
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if self.k == 0 and not self.greedy:
            raise ValueError("nothing to evaluate: k is 0 and greedy is off")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for avg@k, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {self.image_mode!r}")
        return self

    def modes(self) -> dict[str, dict]:
        """Mode name -> generation parameters."""
        out = {}
        if self.k > 0:
            out[f"avg@{self.k}"] = {
                "k": self.k,
                "temperature": self.temperature,
                "top_p": self.top_p,
            }
        if self.greedy:
            out["greedy"] = {"k": 1, "temperature": 0.0, "top_p": 1.0}
        return out


class Interrupted(RuntimeError):
    """Raised by an ``on_batch`` callback to stop an evaluation (tests use it)."""


def batch_seed(seed: int, benchmark: str, mode: str, start: int) -> int:
    """The sampling seed of the batch starting at question ``start`` (stable across runs)."""
    digest = hashlib.sha256(f"{seed}/{benchmark}/{mode}/{start}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def resolve_benchmark_settings(
    benchmark: Benchmark, settings: EvalSettings, run_config=None
) -> dict:
    """Template, reward and length cap for ``benchmark``: explicit setting, else the run's
    config (the model was trained with them), else the benchmark's defaults."""

    def pick(explicit, from_run, default):
        if explicit is not None:
            return explicit
        return from_run if from_run is not None else default

    rc = run_config
    return {
        "template": pick(settings.template, rc.data.template if rc else None, benchmark.template),
        "reward": pick(settings.reward, _run_reward(rc), benchmark.reward),
        "max_new_tokens": pick(
            settings.max_new_tokens,
            rc.rollout.max_new_tokens if rc else None,
            benchmark.max_new_tokens,
        ),
    }


def _run_reward(run_config) -> str | None:
    """A run's reward name, if it is a registry name (a reward file may not be portable)."""
    if run_config is None:
        return None
    from vispo.rewards import REWARDS

    rc = run_config.reward
    if getattr(rc, "funcs", None):
        return _funcs_label(rc)
    name = rc.name
    return name if name in REWARDS or name.endswith(".py") or ".py:" in name else None


def _funcs_label(rc) -> str:
    weights = list(rc.weights) or [1.0] * len(rc.funcs)
    return " + ".join(f"{w:g}*{f}" for f, w in zip(rc.funcs, weights))


def open_reward(name: str, run_config=None):
    """The :class:`vispo.rewards.RewardRunner` for a resolved reward ``name``: the run's own
    reward (its ``reward.funcs``, workers and timeout, as in training) when ``name`` is the
    run's, else ``name`` under the run's (or the default) timeout and worker rule."""
    from vispo.train.config import RewardConfig
    from vispo.train.setup import load_reward

    rc = run_config.reward if run_config is not None else None
    if rc is not None and name == _run_reward(run_config):
        return load_reward(rc)
    if rc is not None:
        return load_reward(RewardConfig(name=name, timeout_s=rc.timeout_s))
    return load_reward(RewardConfig(name=name))


def read_results(path: Path) -> list[dict]:
    """Records of ``results.jsonl``; a truncated last line (a crash mid-write) is ignored."""
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the interrupted write of the last batch: that batch is redone
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return records


def _append(path: Path, records: list[dict]) -> None:
    """Append records and make them durable before the next batch starts."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _repair_tail(path: Path) -> None:
    """Cut a half-written last line so that appended records start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def evaluate_model(
    loaded: LoadedModel,
    benchmarks: Sequence[Benchmark],
    out_dir: str | Path,
    settings: EvalSettings | None = None,
    *,
    data_root: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    on_batch: Callable[[str, str, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Evaluate one model on ``benchmarks``; write and return its summary (module docstring).

    Args:
        loaded: from :func:`vispo.eval.loading.load_model_spec`.
        benchmarks: from :func:`vispo.eval.benchmarks.parse_benchmarks`.
        out_dir: where ``results.jsonl``, ``eval.json`` and ``eval.md`` go.
        settings: :class:`EvalSettings` (default: avg@8 + greedy).
        data_root: folder of local benchmark files.
        progress: show a progress bar.
        overwrite: discard earlier results in ``out_dir`` instead of resuming.
        on_batch: called as ``on_batch(benchmark, mode, batches_done_now)`` after each batch
            is written (raise :class:`Interrupted` there to stop).
        log: where to print notes.

    Returns:
        the ``eval.json`` content: ``{"label", "model", "settings", "benchmarks", "modes":
        {mode: {..., "summary": metrics.summarize(...)}}}``.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from vispo.data import get_template
    from vispo.train.batch import image_budget

    settings = (settings or EvalSettings()).validate()
    if not benchmarks:
        raise ValueError("no benchmark to evaluate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    if overwrite and results_path.exists():
        results_path.unlink()
    _repair_tail(results_path)
    modes = settings.modes()
    budget = image_budget(loaded.processor)

    # Load every benchmark first: a missing file fails before any generation.
    plan = []
    for bench in benchmarks:
        samples = bench.load(data_root, settings.limit)
        resolved = resolve_benchmark_settings(bench, settings, loaded.config)
        plan.append((bench, samples, resolved))

    previous = read_results(results_path)
    done: dict[tuple[str, str, str], dict] = {}
    for rec in previous:
        done[(rec["sig"], rec["id"], str(rec["batch"]))] = rec
    used: set[str] = set()

    summary_modes: dict[str, dict] = {
        m: {**params, "per_benchmark": {}} for m, params in modes.items()
    }
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    start_time = time.perf_counter()
    with Progress(*columns, disable=not progress) as bar:
        for bench, samples, resolved in plan:
            template = get_template(resolved["template"])
            reward = open_reward(resolved["reward"], loaded.config)
            donors = None
            if settings.image_mode == "other":
                seed = donor_seed(settings.seed, bench.name)
                donors = derangement([s.answer for s in samples], seed)
            for mode, params in modes.items():
                sig = _mode_signature(loaded, bench, params, settings, resolved)
                used.add(sig)
                n = len(samples)
                task = bar.add_task(f"{bench.name} {mode}", total=n)
                per_question: list[list[float] | None] = [None] * n
                batches_now = 0
                for start in range(0, n, settings.batch_size):
                    stop = min(start + settings.batch_size, n)
                    chunk = [samples[i] for i in range(start, stop)]
                    key_batch = str([start, stop])
                    found = [done.get((sig, s.id, key_batch)) for s in chunk]
                    if all(r is not None for r in found):
                        for i, rec in zip(range(start, stop), found):
                            per_question[i] = rec["correct"]
                        bar.advance(task, stop - start)
                        continue
                    shown = [
                        with_image(
                            samples[i],
                            settings.image_mode,
                            None if donors is None else samples[donors[i]],
                        )
                        for i in range(start, stop)
                    ]
                    texts = generate_batch(
                        loaded.model,
                        loaded.processor,
                        shown,
                        template,
                        max_new_tokens=resolved["max_new_tokens"],
                        k=params["k"],
                        temperature=params["temperature"],
                        top_p=params["top_p"],
                        budget=budget,
                        seed=batch_seed(settings.seed, bench.name, mode, start),
                    )
                    flat = [t for group in texts for t in group]
                    answers = [s.answer for s in chunk for _ in range(params["k"])]
                    scores = correctness(
                        reward,
                        flat,
                        answers,
                        **reward_inputs(chunk, flat, loaded.processor, params["k"]),
                    )
                    records = []
                    for j, sample in enumerate(chunk):
                        correct = scores[j * params["k"] : (j + 1) * params["k"]]
                        per_question[start + j] = correct
                        rec = {
                            "sig": sig,
                            "benchmark": bench.name,
                            "mode": mode,
                            "id": sample.id,
                            "batch": [start, stop],
                            "answer": sample.answer,
                            "correct": correct,
                        }
                        if settings.image_mode != "real":
                            rec["image_mode"] = settings.image_mode
                        if donors is not None:
                            rec["image_of"] = samples[donors[start + j]].id
                        if settings.keep_responses:
                            rec["responses"] = texts[j]
                        records.append(rec)
                    _append(results_path, records)
                    batches_now += 1
                    bar.advance(task, stop - start)
                    if on_batch is not None:
                        on_batch(bench.name, mode, batches_now)
                summary_modes[mode]["per_benchmark"][bench.name] = per_question
            reward.close()
    stale = sum(1 for rec in previous if rec["sig"] not in used)
    if stale:
        log(f"vispo eval: ignored {stale} stored result(s) computed with other settings")

    groups = {bench.name: bench.group for bench, _, _ in plan}
    result = {
        "label": loaded.label,
        "model": {**loaded.identity, "step": loaded.step},
        "settings": dataclasses.asdict(settings),
        "benchmarks": {
            bench.name: {"group": bench.group, "n": len(samples), **resolved}
            for bench, samples, resolved in plan
        },
        "modes": {
            mode: {
                **{k: v for k, v in info.items() if k != "per_benchmark"},
                "summary": summarize(info["per_benchmark"], groups),
            }
            for mode, info in summary_modes.items()
        },
        "wall_s": time.perf_counter() - start_time,
    }
    write_result(result, out)
    return result


def _mode_signature(
    loaded: LoadedModel, bench: Benchmark, params: dict, settings: EvalSettings, resolved: dict
) -> str:
    """What a stored result must match to be reused: model, benchmark, mode, seed, batching,
    template, reward, length cap and (when not the real one) the image shown."""
    payload = {
        "model": loaded.identity,
        "benchmark": bench.name,
        "mode": params,
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        **resolved,
    }
    if settings.image_mode != "real":  # absent for "real": earlier results stay valid
        payload["image_mode"] = settings.image_mode
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def write_result(result: dict, out_dir: str | Path) -> None:
    """``eval.json`` and ``eval.md`` of one model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).write_text(json.dumps(result, indent=2))
    (out / TABLE_FILE).write_text(run_table(result))


def load_result(path: str | Path) -> dict:
    """An ``eval.json`` (or the folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / SUMMARY_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no {SUMMARY_FILE}")
    return json.loads(p.read_text())


def unique_labels(labels: Sequence[str]) -> list[str]:
    """Labels made unique by appending ``#2``, ``#3``... to repeats."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def write_comparison(results: Sequence[dict], out_dir: str | Path) -> str:
    """``comparison.md`` / ``comparison.json`` for several models; returns the Markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = comparison_markdown(results)
    (out / "comparison.md").write_text(text)
    (out / "comparison.json").write_text(
        json.dumps(
            {
                "baseline": results[0]["label"],
                "models": [
                    {"label": r["label"], "model": r["model"], "modes": r["modes"]} for r in results
                ],
            },
            indent=2,
        )
    )
    return text
