"""Budget tables for `EvictingKVCache`: tokens kept per (layer, KV head) [L, K].

- `pyramid_budgets`: PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache
  Compression based on Pyramidal Information Funneling"): budgets fall linearly with
  depth, from 2m - m/beta at the first layer to m/beta at the last (m the mean budget,
  beta = 20 in the paper), so the total is that of a uniform budget m.
- `retrieval_head_budgets`: RazorAttention (Tang et al. 2024) and DuoAttention (Xiao et
  al. 2024): retrieval heads keep every token (the capacity), the other heads a sink
  plus a recent window. `efficient.cache.retrieval_heads` finds the heads.
- `kept_fraction`: what a table keeps of a dense cache of the same capacity.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Bool, Int


def _positive(value: object, name: str, caller: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{caller}: {name} must be a positive int, got {value!r}")
    return value


def pyramid_budgets(mean: int, num_layers: int, num_kv_heads: int, *, beta: float = 20.0,
                    floor: int = 1) -> Int[np.ndarray, "L K"]:
    """PyramidKV's arithmetic budgets around a mean of `mean` tokens per unit, the last
    layer's at least `floor` (the press's sinks + window); the integer rounding keeps the
    total at mean * L * K (rounded remainders go to the first layers)."""
    caller = "pyramid_budgets"
    for name, value in (("mean", mean), ("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                        ("floor", floor)):
        _positive(value, name, caller)
    if not beta >= 1:
        raise ValueError(f"{caller}: beta must be at least 1 (1 is a uniform budget), got {beta!r}")
    if floor > mean:
        raise ValueError(f"{caller}: floor {floor} is larger than the mean budget {mean}")
    last = max(float(floor), mean / beta)
    first = 2.0 * mean - last
    exact = np.linspace(first, last, num_layers) if num_layers > 1 else np.asarray([float(mean)])
    layers = np.floor(exact).astype(np.int64)
    layers[: mean * num_layers - int(layers.sum())] += 1
    return np.repeat(layers[:, None], num_kv_heads, axis=1).astype(np.int32)


def retrieval_head_budgets(retrieval: Bool[np.ndarray, "L K"], capacity: int,
                           streaming_budget: int) -> Int[np.ndarray, "L K"]:
    """`capacity` for retrieval heads, `streaming_budget` (sinks + window) for the others."""
    caller = "retrieval_head_budgets"
    _positive(capacity, "capacity", caller)
    _positive(streaming_budget, "streaming_budget", caller)
    retrieval = np.asarray(retrieval)
    if retrieval.ndim != 2 or retrieval.dtype != np.bool_:
        raise ValueError(f"{caller}: retrieval must be a bool table [num_layers, num_kv_heads], got "
                         f"{retrieval.dtype} of shape {retrieval.shape}")
    if streaming_budget > capacity:
        raise ValueError(f"{caller}: streaming_budget {streaming_budget} is larger than the capacity {capacity}")
    return np.where(retrieval, capacity, streaming_budget).astype(np.int32)


def kept_fraction(budgets: Int[np.ndarray, "L K"], capacity: int) -> float:
    """Tokens a table keeps over those a dense cache of `capacity` holds."""
    return float(np.asarray(budgets).sum()) / (np.asarray(budgets).size * capacity)


def retrieval_heads_for_fraction(scores: np.ndarray, capacity: int, streaming_budget: int,
                                 kept: float) -> Bool[np.ndarray, "L K"]:
    """The highest-scoring heads, as many as a budget of `kept` of the capacity allows
    (each retrieval head costs capacity - streaming_budget more than a streaming head)."""
    scores = np.asarray(scores, np.float64)
    units = scores.size
    room = kept * units * capacity - units * streaming_budget
    count = int(np.clip(np.floor(room / max(capacity - streaming_budget, 1)), 0, units))
    chosen = np.zeros(units, bool)
    chosen[np.argsort(-scores.reshape(-1), kind="stable")[:count]] = True
    return chosen.reshape(scores.shape)
