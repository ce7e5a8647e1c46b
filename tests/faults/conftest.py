"""The fault-injection suite's table: every test records what it tried and what held.

Tests call the ``fault_table`` fixture with one row per kind of fault *before* asserting, so a
failing test still shows in the table with ``held < tried``. At the end of the session the rows
are printed as a table (and written as JSON to ``$VISPO_FAULTS_REPORT`` when that is set, which
is how docs/reliability.md's figures were collected).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

ROWS = pytest.StashKey[list]()


@dataclasses.dataclass
class FaultRow:
    """One kind of fault: how often it was injected, how often the run held, what was lost."""

    category: str
    fault: str
    tried: int
    held: int
    lost: str = "0"
    detail: str = ""


def pytest_configure(config: pytest.Config) -> None:
    config.stash[ROWS] = []


@pytest.fixture
def fault_table(request: pytest.FixtureRequest):
    """``record(category, fault, tried, held, lost="0", detail="")`` adds a row to the table."""
    rows: list[FaultRow] = request.config.stash[ROWS]

    def record(
        category: str, fault: str, tried: int, held: int, lost: str = "0", detail: str = ""
    ) -> None:
        rows.append(FaultRow(category, fault, int(tried), int(held), str(lost), detail))

    return record


def format_table(rows: list[FaultRow]) -> list[str]:
    """Fixed-width text table, one line per row plus a header and a total."""
    header = ("category", "fault", "tried", "held", "lost", "detail")
    body = [(r.category, r.fault, str(r.tried), str(r.held), r.lost, r.detail) for r in rows]
    total = ("TOTAL", "", str(sum(r.tried for r in rows)), str(sum(r.held for r in rows)), "", "")
    widths = [max(len(line[i]) for line in [header, *body, total]) for i in range(5)]

    def fmt(line) -> str:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        return "  ".join(cells) + "  " + line[5]

    rule = "-" * (sum(widths) + 2 * 5 + 6)
    return [fmt(header), rule, *(fmt(b) for b in body), rule, fmt(total)]


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    rows = config.stash.get(ROWS, [])
    if not rows:
        return
    terminalreporter.section("fault-injection summary (tried / held / data lost)")
    for line in format_table(rows):
        terminalreporter.write_line(line)
    path = os.environ.get("VISPO_FAULTS_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=2)
        terminalreporter.write_line(f"rows written to {path}")
