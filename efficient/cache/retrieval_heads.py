"""Finding retrieval heads by calibration (RazorAttention, Tang et al. 2024, "RazorAttention:
Efficient KV Cache Compression Through Retrieval Heads"; DuoAttention, Xiao et al. 2024).

A head's score is the attention its queries give to a target key, averaged over the
queries that have one: RazorAttention's retrieval score on a random token sequence
repeated twice, where a query in the second copy has two targets, the previous
occurrence of its own token (echo heads) and the token after it (induction heads);
or, on synthetic retrieval prompts, the needle a question should copy from
(`targets` built by the caller). Scores are per KV head, averaged over its query group.
The heads with the highest scores keep the full cache (`budgets.retrieval_head_budgets`).

Not implemented: RazorAttention's compensation token (the mean of the dropped keys and
values kept as one extra entry) and DuoAttention's gates optimised by distillation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from efficient.attention.spec import KeyStats
from efficient.cache.dense import DenseKVCache
from efficient.cache.press import PER_QUERY_STATS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _ScoringCache(DenseKVCache):
    """A dense cache that sums, per target set n and (layer, KV head), the attention mass
    each query gives to its target slots (`targets[n, b, t, s]`) into `head_mass` [N, L, K]."""

    targets: Bool[Array, "N B T S"] = None  # type: ignore[assignment]
    head_mass: Float[Array, "N L K"] = None  # type: ignore[assignment]

    @property
    def key_stats(self) -> KeyStats:
        return PER_QUERY_STATS

    def observe(self, layer: Int[Array, ""], mass: Float[Array, "B K T S"], q_positions: Int[Array, "B T"]
                ) -> _ScoringCache:
        targets = self.targets & (q_positions >= 0)[None, :, :, None]
        total = jnp.einsum("bkts,nbts->nk", mass, targets.astype(mass.dtype))
        return dataclasses.replace(self, head_mass=self.head_mass.at[:, layer].add(total))


def _target_sets(tokens: jax.Array, targets: np.ndarray) -> np.ndarray:
    """`targets` ([B, T] indices, -1 none; or [B, T, T] sets) as a bool [B, T, T] set."""
    if tokens.ndim != 2 or targets.shape[:2] != tokens.shape or targets.ndim not in (2, 3):
        raise ValueError(f"head_scores: tokens [B, T] and targets [B, T] or [B, T, T] expected, got "
                         f"{tuple(tokens.shape)} and {tuple(targets.shape)}")
    if targets.ndim == 2:
        targets = np.arange(tokens.shape[1])[None, None, :] == targets[:, :, None]
    if not np.any(targets):
        raise ValueError("head_scores: targets has no query with a target")
    return targets


def head_scores(model, tokens: Int[Array, "B T"],  # noqa: ANN001
                *targets: Int[Array, "B T"] | Bool[Array, "B T T"],
                positions: Int[Array, "B T"] | None = None) -> Float[np.ndarray, "L K"] | list[np.ndarray]:
    """Mean attention probability each KV head's queries give to their targets, from one
    prefill: `targets[b, t]` a token index in `tokens` (-1: the query has none), or a set
    of them `targets[b, t, s]` (the mass over the set counts). Several target arrays are
    scored in the same prefill (a list of [L, K] back). `positions`: for rows left-padded
    to one length (-1 on padding; default 0..T-1)."""
    from efficient.models import jit_forward

    tokens = jnp.asarray(tokens, jnp.int32)
    sets = np.stack([_target_sets(tokens, np.asarray(t)) for t in targets])  # N B T T
    counts = np.sum(np.any(sets, axis=3), axis=(1, 2))  # N
    config = model.config
    b, t = tokens.shape
    dense = DenseKVCache.for_model(config, b, t)
    cache = _ScoringCache(**{f.name: getattr(dense, f.name) for f in dataclasses.fields(DenseKVCache)},
                          targets=jnp.asarray(sets),
                          head_mass=jnp.zeros((len(sets), config.num_layers, config.num_kv_heads)))
    _, cache = jit_forward(model)(tokens, positions=positions, cache=cache,
                                  logits_indices=jnp.zeros((b, 1), jnp.int32))
    group = config.num_heads // config.num_kv_heads
    scores = [np.asarray(mass) / (count * group) for mass, count in zip(cache.head_mass, counts, strict=True)]
    return scores[0] if len(scores) == 1 else scores


def repeated_random_tokens(batch: int, length: int, low: int, high: int, seed: int = 0
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RazorAttention's calibration: `length` random tokens from [low, high) repeated twice
    per row. Returns tokens [B, 2 length] and the echo and induction targets (the previous
    occurrence of each second-copy token, and the token after it; -1 in the first copy)."""
    caller = "repeated_random_tokens"
    for name, value in (("batch", batch), ("length", length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            raise ValueError(f"{caller}: {name} must be an int of at least 2, got {value!r}")
    if not 0 <= low < high or high - low < length:
        raise ValueError(f"{caller}: the token range [{low}, {high}) must hold {length} distinct tokens")
    rng = np.random.default_rng(seed)
    first = np.stack([rng.choice(np.arange(low, high), size=length, replace=False) for _ in range(batch)])
    tokens = np.concatenate([first, first], axis=1).astype(np.int32)
    echo = np.full(tokens.shape, -1, np.int32)
    echo[:, length:] = np.arange(length)
    induction = np.full(tokens.shape, -1, np.int32)
    induction[:, length:-1] = np.arange(1, length)
    return tokens, echo, induction


def razor_scores(model, *, batch: int = 2, length: int = 256, seed: int = 0,  # noqa: ANN001
                 token_range: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(echo, induction) scores [L, K] of every KV head on repeated random tokens."""
    low, high = token_range or (min(256, model.config.vocab_size // 4), model.config.vocab_size)
    if 2 * length > model.config.max_position_embeddings:
        raise ValueError(f"razor_scores: length {length} repeated twice exceeds the model's "
                         f"{model.config.max_position_embeddings} positions")
    tokens, echo, induction = repeated_random_tokens(batch, length, low, high, seed)
    echo_scores, induction_scores = head_scores(model, tokens, echo, induction)  # one prefill
    return echo_scores, induction_scores


def razor_retrieval_score(echo: np.ndarray, induction: np.ndarray) -> np.ndarray:
    """One ranking of both kinds: each score over its largest, the better of the two per
    head (RazorAttention protects the top induction heads and the top echo heads)."""
    return np.maximum(echo / max(float(echo.max()), 1e-9), induction / max(float(induction.max()), 1e-9))
