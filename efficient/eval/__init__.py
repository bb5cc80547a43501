"""Evaluation: speed and memory measurement (quality metrics arrive with the harness)."""

from efficient.eval.timing import median_seconds

__all__ = ["median_seconds"]
