"""Evaluation: generation, metrics, test sets and the papers' protocol (see harness.py)."""

from dualkd.eval.metrics import bleu, chrf, exact_match, rouge_l

__all__ = ["bleu", "chrf", "exact_match", "rouge_l"]
