"""Evaluation: avg@k accuracy, the vision-dependence probe, and HTML reports.

* :func:`evaluate_model` (``vispo eval``): avg@k and greedy accuracy on registered
  benchmarks (:data:`BENCHMARKS`), resumable, JSON + Markdown; :func:`write_comparison` puts
  several models side by side with absolute and relative deltas.
* :func:`probe_model` (``vispo probe``): per question KL(original || masked) and
  KL(original || no image) of the model's own response, answer changes, histograms.
* :func:`build_report` (``vispo report``): one self-contained HTML page about a run.
* :func:`generate_answers` / :func:`greedy_accuracy`: what the trainer uses for its
  before/after accuracy.
"""

from vispo.eval.accuracy import correctness, generate_answers, generate_batch, greedy_accuracy
from vispo.eval.benchmarks import (
    BENCHMARKS,
    Benchmark,
    BenchmarkError,
    data_file_benchmark,
    describe_benchmarks,
    get_benchmark,
    held_out_benchmark,
    parse_benchmarks,
    register_benchmark,
)
from vispo.eval.loading import (
    LoadedModel,
    ModelSpecError,
    load_model_spec,
    load_run_checkpoint,
)
from vispo.eval.metrics import avg_at_k, macro_average, micro_average, summarize
from vispo.eval.probe import ProbeSettings, analyse_batch, probe_model
from vispo.eval.report import build_report
from vispo.eval.runner import (
    EvalSettings,
    Interrupted,
    evaluate_model,
    load_result,
    unique_labels,
    write_comparison,
)

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkError",
    "EvalSettings",
    "Interrupted",
    "LoadedModel",
    "ModelSpecError",
    "ProbeSettings",
    "analyse_batch",
    "avg_at_k",
    "build_report",
    "correctness",
    "data_file_benchmark",
    "describe_benchmarks",
    "evaluate_model",
    "generate_answers",
    "generate_batch",
    "get_benchmark",
    "greedy_accuracy",
    "held_out_benchmark",
    "load_model_spec",
    "load_result",
    "load_run_checkpoint",
    "macro_average",
    "micro_average",
    "parse_benchmarks",
    "probe_model",
    "register_benchmark",
    "summarize",
    "unique_labels",
    "write_comparison",
]
