"""Held-out loss in bits per byte over a fixed set of evaluation windows."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np

from efficient.data import Document, EvalWindows, Tokenizer, eval_windows
from efficient.train.step import bits_per_byte


@dataclasses.dataclass(frozen=True)
class ValidationSet:
    """Evaluation windows (a subset of the held-out split's) and the bytes they cover."""

    windows: EvalWindows  # tokens [W, T+1], mask [W, T]
    num_bytes: int  # UTF-8 bytes the scored targets stand for

    @property
    def num_tokens(self) -> int:
        return int(self.windows.mask.sum())


def validation_set(
    documents: Sequence[Document | str], tokenizer: Tokenizer, seq_len: int, max_windows: int = 0
) -> ValidationSet:
    """All windows of `documents`, or `max_windows` of them evenly spaced (0 = all).

    For a subset, the bytes are counted with `tokenizer.num_bytes` over the
    scored target ids (exact for the byte tokenizer).
    """
    if max_windows < 0:
        raise ValueError(f"max_windows must be >= 0, got {max_windows}")
    full = eval_windows(documents, tokenizer, seq_len)
    count = len(full.tokens)
    if max_windows == 0 or max_windows >= count:
        return ValidationSet(full, full.num_bytes)
    keep = np.unique(np.linspace(0, count - 1, max_windows).round().astype(np.int64))
    tokens, mask = full.tokens[keep], full.mask[keep]
    targets = tokens[:, 1:][mask]
    num_bytes = int(tokenizer.num_bytes(targets.tolist()))
    subset = EvalWindows(tokens=tokens, mask=mask, num_tokens=int(mask.sum()), num_bytes=num_bytes)
    return ValidationSet(subset, num_bytes)


def evaluate(
    eval_sums: Callable[..., tuple[jax.Array, jax.Array]],
    params: object,
    data: ValidationSet,
    batch_size: int,
) -> dict[str, float]:
    """Masked mean NLL (nats/token) and bits/byte; padding rows and tokens do not count."""
    total, count = 0.0, 0
    for tokens, mask in data.windows.batches(batch_size):
        nll, n = eval_sums(params, tokens, mask)
        total += float(nll)
        count += int(n)
    return {
        "loss": total / max(count, 1),
        "bits_per_byte": bits_per_byte(total, data.num_bytes) if data.num_bytes else math.nan,
        "tokens": count,
        "bytes": data.num_bytes,
    }
