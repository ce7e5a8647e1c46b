"""Load (images, question, answer) data sets from local folders, files or (explicitly) the hub.

Supported sources, all turned into a :class:`~vispo.data.sample.SampleDataset`:

* a folder written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` folder too: the
  ``split`` argument picks the split);
* parquet file(s), a folder of them (files whose path names the split are preferred, e.g. the hub
  layout ``data/train-00000-of-00001.parquet``), or a glob pattern;
* JSON (a list of records, or ``{"train": [...], ...}``) and JSONL, with images given as paths
  relative to ``image_root`` (default: the JSON file's folder);
* ``"hub:org/name"``: ``datasets.load_dataset`` on a machine that is online. The ``hub:`` prefix is
  required so that a mistyped local path never silently turns into a download;
* an in-memory ``datasets.Dataset`` / ``DatasetDict`` or a list of dicts.

Column names are found automatically (``images``/``image``, ``problem``/``question``/``prompt``,
``answer``/``solution``/``ground_truth``) or given with ``columns={"question": "my_col"}``.
Conversations in ShareGPT form (``messages`` with ``role``/``content``, or ``conversations`` with
``from``/``value``), the PAPO evaluation format, need no mapping: the first user turn is the
question and the assistant turn after it the answer.

Image columns of a Hugging Face dataset are read without decoding (``{"bytes", "path"}`` dicts);
images are decoded later, per batch, by :meth:`Sample.load_images`.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import numbers
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from vispo.data.sample import DataError, Sample, SampleDataset, _describe
from vispo.data.validate import check_image_shape, clean_text, unicode_problem

logger = logging.getLogger(__name__)

#: Default column names per field, tried in order.
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "images": ("images", "image", "image_path", "image_paths"),
    "question": ("problem", "question", "prompt", "query"),
    "answer": ("answer", "solution", "ground_truth"),
    "id": ("id", "uid", "qid", "question_id", "sample_id", "pid"),
    "messages": ("messages", "conversations"),
}

#: Prefix that marks a hub data set name (the only way :func:`load_samples` touches the network).
HUB_PREFIX = "hub:"

_DATA_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json")
_MAX_KEPT_ERRORS = 20
_USER_ROLES = {"user", "human"}
_ASSISTANT_ROLES = {"assistant", "gpt", "model", "bot"}


class _Skip(Exception):
    """Internal: a row is unusable; ``reason`` is the counter key, ``message`` the detail."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class _Part:
    """One stream of rows plus what is needed to interpret it."""

    rows: Iterable[Any]
    columns: list[str]
    label: str  # used in default ids and messages (file stem or dataset name)
    image_root: Path | None


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def load_samples(
    source: Any,
    *,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    image_root: str | os.PathLike | None = None,
    on_error: Literal["skip", "raise"] = "skip",
    limit: int | None = None,
    validate_images: bool = False,
    placeholder: str = "<image>",
) -> SampleDataset:
    """Load a data set of (images, question, answer) samples.

    Args:
        source: a path (folder, file, glob), a list of paths, ``"hub:org/name"``, a
            ``datasets.Dataset``/``DatasetDict``, or a list of dicts.
        split: which split to take where the source has several; recorded in ``meta["split"]``.
        columns: overrides of the column names, keys among ``images``, ``question``, ``answer``,
            ``id``, ``messages``.
        image_root: folder that relative image paths are resolved against (default: the folder of
            the JSON/parquet file, or of the saved dataset).
        on_error: ``"skip"`` drops bad rows and counts them in ``dataset.skipped``; ``"raise"``
            raises :class:`DataError` naming the first bad row.
        limit: stop after this many good samples.
        validate_images: decode every image now (slow) and treat undecodable ones as bad rows;
            otherwise only missing files are detected at load time.
        placeholder: the image placeholder in question texts.

    Returns:
        a :class:`SampleDataset`; ``.skipped`` is a ``Counter`` of reasons, ``.errors`` the first
        messages.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    columns = dict(columns or {})
    unknown = set(columns) - set(DEFAULT_COLUMNS)
    if unknown:
        raise DataError(
            f"columns: unknown field(s) {sorted(unknown)}; "
            f"known fields are {sorted(DEFAULT_COLUMNS)}"
        )
    root = Path(image_root) if image_root is not None else None
    parts, label = _open_source(source, split=split, image_root=root)

    samples: list[Sample] = []
    skipped: Counter = Counter()
    neutralised: Counter = Counter()
    errors: list[str] = []
    seen_ids: set[str] = set()
    row_index = 0
    for part in parts:
        if limit is not None and len(samples) >= limit:
            break
        mapping = _resolve_columns(part.columns, columns, part.label)
        for row in part.rows:
            if limit is not None and len(samples) >= limit:
                break
            index = row_index
            row_index += 1
            try:
                sample = _row_to_sample(row, index, mapping, part, split, placeholder)
                if sample.id in seen_ids:
                    raise _Skip("duplicate_id", f"sample {sample.id!r}: duplicate id")
                if validate_images:
                    _validate_images(sample)
            except _Skip as skip:
                if on_error == "raise":
                    raise DataError(f"{part.label}: {skip.message}") from None
                skipped[skip.reason] += 1
                if len(errors) < _MAX_KEPT_ERRORS:
                    errors.append(f"{part.label}: {skip.message}")
                continue
            seen_ids.add(sample.id)
            samples.append(sample)
            n_tokens = sample.meta.pop("_neutralised", 0)
            if n_tokens:
                neutralised[sample.id] = n_tokens
    if skipped:
        total = len(samples) + sum(skipped.values())
        logger.warning(
            "%s: skipped %d of %d rows (%s); first: %s",
            label,
            sum(skipped.values()),
            total,
            ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())),
            errors[0],
        )
    if neutralised:
        logger.warning(
            "%s: neutralised %d chat-control/image token(s) written in the text of %d sample(s) "
            "(now plain text; first: %s)",
            label,
            sum(neutralised.values()),
            len(neutralised),
            next(iter(neutralised)),
        )
    dataset = SampleDataset(samples, skipped=skipped, errors=errors, source=label, split=split)
    dataset.neutralised = neutralised
    return dataset


# --------------------------------------------------------------------------------------------
# Sources -> streams of rows
# --------------------------------------------------------------------------------------------


def _open_source(source: Any, *, split: str, image_root: Path | None) -> tuple[list[_Part], str]:
    """Turn any supported source into row streams; returns (parts, label for messages)."""
    import datasets  # imported here: it is slow to import and only needed to load

    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return [_hf_part(_pick_split(source, split, "dataset"), "dataset", image_root)], "dataset"
    if isinstance(source, list) and (not source or isinstance(source[0], Mapping)):
        return [_records_part(source, "records", image_root)], "records"
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
        return [p for path in paths for p in _file_parts(path, image_root, split)], str(paths[0])
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"source: unsupported type {type(source).__name__}")

    text = os.fspath(source)
    if text.startswith(HUB_PREFIX):
        name = text[len(HUB_PREFIX) :]
        if not name:
            raise DataError("source: 'hub:' must be followed by a dataset name, e.g. hub:org/name")
        ds = datasets.load_dataset(name, split=split)
        return [_hf_part(ds, name, image_root)], name
    if any(ch in text for ch in "*?["):
        matches = sorted(glob.glob(text, recursive=True))
        if not matches:
            raise DataError(f"source: the pattern {text!r} matches no file")
        return [p for m in matches for p in _file_parts(Path(m), image_root, split)], text

    path = Path(text)
    if not path.exists():
        hint = " (hub data sets are named 'hub:org/name')" if "/" in text else ""
        raise DataError(f"source: {text!r} does not exist{hint}")
    if path.is_dir():
        if _is_saved_hf_dataset(path):
            ds = _pick_split(datasets.load_from_disk(str(path)), split, str(path))
            return [_hf_part(ds, path.name, image_root or path)], str(path)
        files = _data_files_in(path, split)
        if not files:
            raise DataError(
                f"source: the folder {text!r} holds no saved dataset and no "
                f"{'/'.join(_DATA_SUFFIXES)} file"
            )
        return [p for f in files for p in _file_parts(f, image_root, split)], str(path)
    return _file_parts(path, image_root, split), str(path)


def _is_saved_hf_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _pick_split(ds: Any, split: str, label: str) -> Any:
    """From a DatasetDict take ``split``; a plain Dataset is returned as is."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{label}: no split {split!r}; available: {sorted(ds)}")
        return ds[split]
    return ds


def _data_files_in(folder: Path, split: str) -> list[Path]:
    """Data files under ``folder``; those whose path names ``split`` win if there are any."""
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in _DATA_SUFFIXES
        and not p.name.startswith(".")
        and p.name not in ("dataset_info.json", "state.json", "dataset_dict.json")
    )
    token = re.compile(rf"(^|[/\\_.\-]){re.escape(split)}([/\\_.\-]|$)")
    named = [p for p in files if token.search(p.relative_to(folder).as_posix())]
    return named or files


def _file_parts(path: Path, image_root: Path | None, split: str) -> list[_Part]:
    """Row streams of one data file, chosen by its suffix."""
    suffix = path.suffix.lower()
    root = image_root or path.parent
    if suffix == ".parquet":
        return [_parquet_part(path, root)]
    if suffix in (".jsonl", ".ndjson"):
        return [_jsonl_part(path, root)]
    if suffix == ".json":
        return [_json_part(path, root, split)]
    raise DataError(f"source: unsupported file type {path.name!r} (use parquet, json or jsonl)")


def _parquet_part(path: Path, root: Path) -> _Part:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)

    def rows() -> Iterator[dict]:
        for batch in pf.iter_batches(batch_size=512):
            yield from batch.to_pylist()

    return _Part(rows(), list(pf.schema_arrow.names), path.stem, root)


def _hf_part(ds: Any, label: str, root: Path | None) -> _Part:
    """Rows of a ``datasets.Dataset`` read as Arrow storage, so images stay undecoded."""
    arrow = ds.with_format("arrow")

    def rows() -> Iterator[dict]:
        for start in range(0, len(arrow), 512):
            yield from arrow[start : start + 512].to_pylist()

    return _Part(rows(), list(ds.column_names), label, root)


def _records_part(records: list, label: str, root: Path | None) -> _Part:
    keys: dict[str, None] = {}
    for rec in records:
        if isinstance(rec, Mapping):
            keys.update(dict.fromkeys(rec))
    return _Part(records, list(keys), label, root)


def _json_part(path: Path, root: Path, split: str) -> _Part:
    try:
        # Invalid UTF-8 becomes lone surrogates, so that only the rows holding it are skipped.
        data = json.loads(path.read_bytes().decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(data, Mapping):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if isinstance(data.get(split), list):
            data = data[split]
        elif len(lists) == 1:
            data = next(iter(lists.values()))
        else:
            raise DataError(
                f"{path}: expected a list of records, an object with a {split!r} list, or an "
                f"object with exactly one list (found keys {sorted(data)[:10]})"
            )
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records, got {type(data).__name__}")
    return _records_part(data, path.stem, root)


def _jsonl_part(path: Path, root: Path) -> _Part:
    records: list[Any] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.decode("utf-8", "surrogateescape")  # bad bytes: that row is skipped
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                records.append(_Skip("invalid_json", f"line {lineno}: invalid JSON ({exc.msg})"))
    return _records_part(records, path.stem, root)


# --------------------------------------------------------------------------------------------
# Rows -> samples
# --------------------------------------------------------------------------------------------


def _resolve_columns(available: list[str], overrides: dict[str, str], label: str) -> dict:
    """Check overrides and that the source has a question and an answer column somewhere.

    Errors here concern the whole source (a typo in ``columns``), so they are raised whatever
    ``on_error`` says.
    """
    present = set(available)
    mapping: dict[str, str | None] = {}
    for fieldname, candidates in DEFAULT_COLUMNS.items():
        if fieldname in overrides:
            col = overrides[fieldname]
            if col not in present:
                raise DataError(
                    f"{label}: columns[{fieldname!r}] = {col!r} is not a column; "
                    f"available: {sorted(present)}"
                )
            mapping[fieldname] = col
        else:
            mapping[fieldname] = next((c for c in candidates if c in present), None)
    if mapping["question"] is None and mapping["messages"] is None:
        raise DataError(
            f"{label}: no question column (looked for {list(DEFAULT_COLUMNS['question'])} or "
            f"conversations {list(DEFAULT_COLUMNS['messages'])}); available: {sorted(present)}; "
            "pass columns={'question': ...}"
        )
    if mapping["answer"] is None and mapping["messages"] is None:
        raise DataError(
            f"{label}: no answer column (looked for {list(DEFAULT_COLUMNS['answer'])}); "
            f"available: {sorted(present)}; pass columns={{'answer': ...}}"
        )
    # Only the overrides are fixed; other fields are looked up per row (JSON rows may differ in
    # their keys, e.g. some with "image" and some with "images").
    return {f: overrides.get(f) for f in DEFAULT_COLUMNS}


def _row_columns(row: Mapping, fixed: dict[str, str | None]) -> dict[str, str | None]:
    """The column feeding each field in this row: the override, else the first default present."""
    return {
        f: fixed[f] if fixed[f] is not None else next((c for c in cands if c in row), None)
        for f, cands in DEFAULT_COLUMNS.items()
    }


def _row_to_sample(
    row: Any, index: int, mapping: dict, part: _Part, split: str, placeholder: str
) -> Sample:
    if isinstance(row, _Skip):
        raise _Skip(row.reason, row.message)
    default_id = f"{part.label}/{split}/{index}"
    if not isinstance(row, Mapping):
        raise _Skip("not_a_record", f"row {default_id!r}: expected an object, got {_describe(row)}")

    mapping = _row_columns(row, mapping)
    id_col = mapping["id"]
    raw_id = row.get(id_col) if id_col else None
    sample_id = default_id if raw_id is None or str(raw_id) == "" else str(raw_id)

    question: Any = row.get(mapping["question"]) if mapping["question"] else None
    answer: Any = row.get(mapping["answer"]) if mapping["answer"] else None
    extra: dict[str, Any] = {}
    convo = row.get(mapping["messages"]) if mapping["messages"] else None
    if isinstance(question, list):  # a 'prompt' column in conversational (TRL) form
        convo, question = question, None
    if convo is not None and (question is None or answer is None):
        q, a, system = _from_conversation(convo, sample_id, placeholder)
        question = q if question is None else question
        answer = a if answer is None else answer
        if system:
            extra["system"] = system

    if not isinstance(question, str) or not question.strip():
        raise _Skip("missing_question", f"sample {sample_id!r}: missing or empty question")
    answer_text = _answer_to_str(answer, sample_id)
    problem = unicode_problem(answer_text)
    if problem:
        raise _Skip("bad_text", f"sample {sample_id!r}: the answer has {problem}")
    # Text that reaches the prompt: question, system turn, meta (templates may use it).
    texts, n_neutralised, problem = clean_text(
        sample_id, {"question": question, **extra}, keep=placeholder
    )
    if problem:
        raise _Skip("bad_text", problem)
    question = texts.pop("question")
    extra.update(texts)
    images = [
        _resolve_image(src, part.image_root, sample_id)
        for src in _as_image_list(row.get(mapping["images"]) if mapping["images"] else None)
    ]
    n_ph = question.count(placeholder)
    if n_ph and n_ph != len(images):
        raise _Skip(
            "image_count_mismatch",
            f"sample {sample_id!r}: {n_ph} {placeholder} placeholder(s) but {len(images)} image(s)",
        )

    used = {c for c in mapping.values() if c}
    meta = {k: v for k, v in row.items() if k not in used and not _is_binary(v)}
    meta, n_meta, problem = clean_text(sample_id, meta, keep=placeholder)
    if problem:
        raise _Skip("bad_text", problem)
    meta.update(extra)
    if n_neutralised + n_meta:
        meta["_neutralised"] = n_neutralised + n_meta
    meta["split"] = split
    meta["source"] = part.label
    meta.setdefault("vision_dependent", None)
    return Sample(id=sample_id, images=images, question=question, answer=answer_text, meta=meta)


def _from_conversation(convo: Any, sample_id: str, placeholder: str) -> tuple:
    """(question, answer, system) from a ShareGPT / chat-format conversation."""
    if not isinstance(convo, list):
        raise _Skip("bad_messages", f"sample {sample_id!r}: messages is not a list")
    question = answer = system = None
    for msg in convo:
        if not isinstance(msg, Mapping):
            raise _Skip("bad_messages", f"sample {sample_id!r}: a message is not an object")
        role = str(msg.get("role", msg.get("from", ""))).lower()
        content = _content_text(msg.get("content", msg.get("value")), placeholder)
        if role == "system" and system is None:
            system = content
        elif role in _USER_ROLES and question is None:
            question = content
        elif role in _ASSISTANT_ROLES and question is not None and answer is None:
            answer = content
    return question, answer, system


def _content_text(content: Any, placeholder: str) -> Any:
    """A message's content as text; HF content items become text with image placeholders."""
    if isinstance(content, list):
        pieces = []
        for item in content:
            kind = item.get("type") if isinstance(item, Mapping) else None
            if kind == "image":
                pieces.append(placeholder)
            elif kind == "text":
                pieces.append(str(item.get("text", "")))
        return "".join(pieces)
    return content


def _answer_to_str(answer: Any, sample_id: str) -> str:
    """The ground truth as a string; numbers are stringified, ambiguous values rejected."""
    if isinstance(answer, (list, tuple)) and len(answer) == 1:
        answer = answer[0]
    if answer is None:
        raise _Skip("missing_answer", f"sample {sample_id!r}: missing answer")
    if isinstance(answer, str):
        if not answer.strip():
            raise _Skip("missing_answer", f"sample {sample_id!r}: empty answer")
        return answer.strip()
    if isinstance(answer, (bool, np.bool_)):
        return "true" if answer else "false"
    if isinstance(answer, numbers.Integral):
        return str(int(answer))
    if isinstance(answer, numbers.Real):
        value = float(answer)
        if not math.isfinite(value):
            raise _Skip("bad_answer", f"sample {sample_id!r}: answer is {value}")
        return str(int(value)) if value.is_integer() else repr(value)
    raise _Skip(
        "bad_answer",
        f"sample {sample_id!r}: answer {_describe(answer)} ({type(answer).__name__}) is not a "
        "string or number",
    )


def _as_image_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _resolve_image(src: Any, root: Path | None, sample_id: str) -> Any:
    """Make relative paths absolute and check that referenced files exist (cheap, no decode)."""
    if src is None:
        raise _Skip("missing_image", f"sample {sample_id!r}: an image entry is null")
    if isinstance(src, (str, os.PathLike)):
        path = _absolute(Path(src), root)
        if not path.is_file():
            raise _Skip(
                "missing_image", f"sample {sample_id!r}: image file {str(path)!r} not found"
            )
        return str(path)
    if isinstance(src, Mapping):
        data, path = src.get("bytes"), src.get("path")
        if data:
            return {"bytes": data, "path": path}
        if path:
            resolved = _absolute(Path(path), root)
            if not resolved.is_file():
                raise _Skip(
                    "missing_image", f"sample {sample_id!r}: image file {str(resolved)!r} not found"
                )
            return {"bytes": None, "path": str(resolved)}
        raise _Skip("missing_image", f"sample {sample_id!r}: image dict has neither bytes nor path")
    if isinstance(src, (bytes, bytearray, np.ndarray, Image.Image)):
        return src
    raise _Skip(
        "bad_image", f"sample {sample_id!r}: unsupported image value of type {type(src).__name__}"
    )


def _absolute(path: Path, root: Path | None) -> Path:
    path = path.expanduser()
    if path.is_absolute() or root is None:
        return path
    return root / path


def _validate_images(sample: Sample) -> None:
    from vispo.vision import ImageLoadError

    try:
        images = sample.load_images()
    except ImageLoadError as exc:
        raise _Skip("bad_image", f"sample {sample.id!r}: {exc}") from None
    for image in images:
        problem = check_image_shape(image.size, sample.id)
        if problem:
            raise _Skip("bad_image", problem)


def _is_binary(value: Any) -> bool:
    """Image-like payloads are not copied into ``meta``."""
    if isinstance(value, (bytes, bytearray, Image.Image, np.ndarray)):
        return True
    if isinstance(value, Mapping):
        return "bytes" in value
    if isinstance(value, list) and value:
        return _is_binary(value[0])
    return False
