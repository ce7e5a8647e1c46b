"""The PAPO/CPPO reproduction on CPU (issues 8 and 20), as a package.

    python -m benchmarks.reproduce --dry-run     # the plan and its estimated wall time
    python -m benchmarks.reproduce --quick       # smoke run: 9 runs of 2 steps
    python -m benchmarks.reproduce               # the full suite (resumable), = make reproduce
    python -m benchmarks.reproduce --report      # docs/results.md from the committed records

The plan: the start model evaluated once; a tuning stage (GRPO at lr 1e-4, 3e-4, 1e-3, seeds 0
and 1, scored on the validation split only) whose choice every main run reads; then, at each
seed (default 0-4), every arm of ``plan.ARMS``: GRPO, DAPO, PAPO-G, PAPO-D, CPPO, VPPO,
NoisyRollout, and the controls that differ from them only in the term (CPPO lambda 0, VPPO
off, GRPO given DAPO's rollouts; PAPO-G gamma 0, PAPO-D without its terms and NoisyRollout
without noise are GRPO's and DAPO's runs, whose configs are identical). Curves are scored on
the validation split; the test split once per run, at the end, with the real, a gray and
another sample's image, plus ``easy-vqa-cf``.

Sizes chosen to fit about 2 hours on 2 cores (``--jobs 2``): the first 2,000 of the 9,673 test
questions per image mode, all 856 counterfactual questions, the curve on the first 500 of the
1,005 validation questions every 10 steps, 60 steps per run.

Modules: ``plan`` (what runs, with which config), ``worker`` and ``scheduler`` (running them),
``records`` (the committed per-run result records), ``stats`` and ``analyse`` (paired t
statistics over seeds), ``report`` (the Markdown page and the curves), ``cli``.
"""
