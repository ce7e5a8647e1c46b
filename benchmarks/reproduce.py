"""Compatibility entry point: ``python benchmarks/reproduce.py`` = ``python -m benchmarks.reproduce``.

The reproduction lives in the package ``benchmarks/reproduce/`` (plan, worker, scheduler,
records, stats, analyse, report, cli); see its ``__init__``.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from benchmarks.reproduce.cli import main

    sys.exit(main())
