"""Prompt batching: validation, right padding, and shape buckets.

Prompts are right-padded to a bucketed length so that new prompts of a similar
length reuse the compiled generate; padded slots carry position -1 and are
never attended.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def bucket_length(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= max(n, minimum)."""
    if minimum < 1:
        raise ValueError(f"minimum bucket must be >= 1, got {minimum}")
    size = minimum
    while size < n:
        size *= 2
    return size


def capacity_bucket(n: int, minimum: int = 64) -> int:
    """The smallest quarter-octave size (2^k times 1, 1.25, 1.5 or 1.75) >= max(n, minimum):
    a default cache capacity holds at most 25% more slots than needed (a power of two
    held up to 2x, and decode attention over the materialised path reads every slot),
    with four compiled capacities per doubling."""
    if minimum < 1:
        raise ValueError(f"minimum capacity must be >= 1, got {minimum}")
    octave = bucket_length(max(n, minimum), minimum) // 2
    if octave < minimum or octave % 4:
        return bucket_length(n, minimum)
    return next(size for size in (octave * q // 4 for q in (5, 6, 7, 8)) if size >= n)


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Right-padded prompts: tokens [B, T_bucket], lengths [B]."""

    tokens: np.ndarray
    lengths: np.ndarray

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def bucket(self) -> int:
        return self.tokens.shape[1]


def make_prompt_batch(
    prompts: Sequence[Sequence[int]] | np.ndarray,
    vocab_size: int,
    *,
    pad_id: int = 0,
    lengths: Sequence[int] | np.ndarray | None = None,
    min_bucket: int = 16,
) -> PromptBatch:
    """Validate prompts (list of id lists, or an int array [B, T] with optional
    `lengths`) and right-pad them to a bucketed length."""
    if isinstance(prompts, np.ndarray) or hasattr(prompts, "shape"):
        array = np.asarray(prompts)
        if array.ndim != 2:
            raise ValueError(f"prompts array must have rank 2 [B, T], got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"prompts must hold integer token ids, got dtype {array.dtype}")
        row_lengths = (np.full(array.shape[0], array.shape[1]) if lengths is None
                       else np.asarray(lengths))
        if row_lengths.shape != (array.shape[0],):
            raise ValueError(f"lengths must have shape ({array.shape[0]},), got {row_lengths.shape}")
        if not np.issubdtype(row_lengths.dtype, np.integer):
            raise TypeError(f"lengths must be integers, got dtype {row_lengths.dtype}")
        if row_lengths.min() < 1 or row_lengths.max() > array.shape[1]:
            raise ValueError(f"lengths must lie in [1, {array.shape[1]}], got {row_lengths.tolist()}")
        rows = [array[i, : int(n)] for i, n in enumerate(row_lengths)]
    else:
        if lengths is not None:
            raise ValueError("lengths is only accepted with a prompts array")
        if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a sequence of token-id sequences, got {type(prompts).__name__}")
        rows = []
        for i, row in enumerate(prompts):
            arr = np.asarray(row)
            if arr.ndim != 1:
                raise ValueError(f"prompt {i} must be a flat sequence of ids, got shape {arr.shape}")
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise TypeError(f"prompt {i} must hold integer token ids, got dtype {arr.dtype}")
            rows.append(arr.astype(np.int64))
    if not rows:
        raise ValueError("prompts is empty: give at least one prompt")
    for i, row in enumerate(rows):
        if row.size == 0:
            raise ValueError(f"prompt {i} is empty")
        lo, hi = int(row.min()), int(row.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"prompt {i} holds token id {lo if lo < 0 else hi} outside the vocabulary [0, {vocab_size})"
            )
    if not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id {pad_id} is outside the vocabulary [0, {vocab_size})")
    row_lengths = np.array([row.size for row in rows], np.int32)
    bucket = bucket_length(int(row_lengths.max()), min_bucket)
    tokens = np.full((len(rows), bucket), pad_id, np.int32)
    for i, row in enumerate(rows):
        tokens[i, : row.size] = row
    return PromptBatch(tokens=tokens, lengths=row_lengths)
