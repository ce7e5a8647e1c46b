"""The PAPO/CPPO reproduction on CPU (issues 8 and 20), as a package.

    python -m benchmarks.reproduce --dry-run     # the plan and its estimated wall time
    python -m benchmarks.reproduce --quick       # smoke run (a few short runs)
    python -m benchmarks.reproduce               # the full suite (resumable)
    python -m benchmarks.reproduce --report      # docs/results.md from the committed records

Modules: ``plan`` (what runs, with which config), ``worker`` and ``scheduler`` (running them),
``records`` (the committed per-run result records), ``stats`` and ``analyse`` (paired t
statistics over seeds), ``report`` (the Markdown page and the curves), ``cli``.
"""
