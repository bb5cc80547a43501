"""Agreement of a decoder's output with a reference decoder's (e.g. greedy with the dense cache)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def prefix_agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
    """Mean over rows of (common prefix length) / (reference length): 1.0 when a decoder
    reproduces the reference exactly; after the first difference nothing counts."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"reference and other: need the same non-zero number of rows, got "
                         f"{len(reference)} and {len(other)}")
    fractions = []
    for ref, out in zip(reference, other, strict=True):
        n = 0
        for a, b in zip(ref, out):
            if a != b:
                break
            n += 1
        fractions.append(n / max(len(ref), 1))
    return float(statistics.fmean(fractions))
