"""The committed per-run result records (``benchmarks/results/reproduce/<run>.json``).

A record holds everything the report needs: the run's spec, settings and full training
config, the final metrics, the validation curve, the training curves, and per-question
correctness as compact bitsets (base64 of the 0/1 answers packed 8 to a byte, in benchmark
order), so ``--report`` rebuilds every table without the run folders.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .plan import ROOT, ReproError, RunSpec, Settings

RECORDS_DIR = ROOT / "benchmarks" / "results" / "reproduce"
SCHEMA = 1


def pack_bits(values: Sequence[float]) -> str:
    """0/1 values -> base64 of the bits, most significant bit first (``[1, 0, 1]`` -> ``"oA=="``)."""
    out = bytearray((len(values) + 7) // 8)
    for i, v in enumerate(values):
        if v not in (0, 1, 0.0, 1.0, True, False):
            raise ReproError(f"per-question correctness must be 0 or 1, got {v!r} at {i}")
        if v:
            out[i // 8] |= 0x80 >> (i % 8)
    return base64.b64encode(bytes(out)).decode("ascii")


def unpack_bits(text: str, n: int) -> list[int]:
    """The inverse of :func:`pack_bits` for ``n`` values."""
    raw = base64.b64decode(text)
    if len(raw) != (n + 7) // 8:
        raise ReproError(f"bitset of {len(raw)} bytes cannot hold exactly {n} values")
    return [(raw[i // 8] >> (7 - i % 8)) & 1 for i in range(n)]


def spec_document(spec: RunSpec, settings: Settings) -> dict:
    """What identifies a run: a record is reused only if this is unchanged."""
    return {"run": spec.to_json(), "settings": settings.to_json()}


def code_version() -> str | None:
    """The commit the run's code came from (``git describe --always --dirty``), None outside a
    git checkout: a record says which code produced it."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_json(path: Path, data: Any) -> None:
    """Write atomically (a crash leaves the old file or the new one, never half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_records(folder: Path, settings: Settings | None = None) -> dict[str, dict]:
    """Every record in ``folder`` (by run name); with ``settings``, only those made with them."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ReproError(f"{path}: not valid JSON; delete it to rerun that run") from None
        if rec.get("schema") != SCHEMA:
            print(f"note: {path.name} is not a schema-{SCHEMA} record; left out")
            continue
        if settings is not None and rec["settings"] != settings.to_json():
            print(f"note: {path.name} was made with other settings; left out")
            continue
        out[rec["name"]] = rec
    return out


def record_settings(records: Mapping[str, Mapping]) -> Settings | None:
    """The settings the records share (the most common, when they differ)."""
    docs = [json.dumps(r["settings"], sort_keys=True) for r in records.values()]
    if not docs:
        return None
    common = max(set(docs), key=docs.count)
    return Settings(**json.loads(common))


def correct_vector(record: Mapping, key: str) -> list[int]:
    """A record's per-question correctness for ``key`` (``test/real``, ``cf``...)."""
    entry = record["questions"][key]
    return unpack_bits(entry["bits"], entry["n"])
