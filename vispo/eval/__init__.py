"""Evaluation: accuracy of a policy on held-out questions."""

from vispo.eval.accuracy import generate_answers, greedy_accuracy

__all__ = ["generate_answers", "greedy_accuracy"]
