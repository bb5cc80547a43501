"""Presses: the scoring rules an evicting cache (`EvictingKVCache`) keeps tokens by.

A press is a frozen dataclass (static in the cache): which attention statistics it
needs (`key_stats`), how a forward's statistics update the per-entry scores
(`observe`), and the priority that eviction ranks entries by (`priority`; higher
is kept). Every press always keeps the first `sinks` positions and the `window`
most recent ones, so a new policy is one small class (the "press" of NVIDIA's
kvpress, which this interface follows).

Scores and statistics are per (row, KV head, entry): [B, K, R]. Statistics come
from attention as per-KV-head, per-query mass [B, K, T, R] (softmax probabilities
summed over each KV head's G query heads); padded queries (position -1) carry none.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from efficient.attention.spec import KeyStats

PER_QUERY_STATS = KeyStats(per_kv_head=True, per_query=True)


def _check(press: Press) -> None:
    for name in ("sinks", "window"):
        value = getattr(press, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{type(press).__name__}.{name} must be a non-negative int, got {value!r}")
    if press.window < 1:
        raise ValueError(f"{type(press).__name__}.window must be at least 1 (the newest token is always kept), "
                         f"got {press.window}")


@dataclasses.dataclass(frozen=True)
class Press:
    """Keeps the first `sinks` positions, the last `window` ones, then the best `priority`."""

    sinks: int = 0
    window: int = 1
    name: ClassVar[str] = "press"

    def __post_init__(self) -> None:
        _check(self)

    @property
    def key_stats(self) -> KeyStats | None:
        """The statistics `observe` needs from attention (None: none, at no cost)."""
        return PER_QUERY_STATS

    def observe(self, scores: Float[Array, "B K R"], mass: Float[Array, "B K T R"],
                q_positions: Int[Array, "B T"]) -> Float[Array, "B K R"]:
        """Scores after a forward whose queries gave `mass`."""
        raise NotImplementedError

    def priority(self, scores: Float[Array, "... R"], positions: Int[Array, "... R"]) -> Float[Array, "... R"]:
        """What eviction ranks the unprotected entries by (higher is kept)."""
        del positions
        return scores


@dataclasses.dataclass(frozen=True)
class StreamingLLMPress(Press):
    """Attention sinks plus a recent window (StreamingLLM, Xiao et al. 2024; LM-Infinite,
    Han et al. 2024): a token is kept by position alone, so no statistics are asked for.
    With `sinks=0` it is the window-only cache StreamingLLM shows collapsing."""

    sinks: int = 4
    name: ClassVar[str] = "streaming_llm"

    @property
    def key_stats(self) -> KeyStats | None:
        return None

    def observe(self, scores, mass, q_positions):  # noqa: ANN001, ANN201
        return scores

    def priority(self, scores, positions):  # noqa: ANN001, ANN201
        return positions.astype(jnp.float32)  # beyond sinks and window: the most recent


@dataclasses.dataclass(frozen=True)
class H2OPress(Press):
    """Heavy hitters plus recent tokens (H2O, Zhang et al. 2023): a key's score is the
    attention it has received, accumulated over every query since it was written (per
    KV head, summed over the head's query group)."""

    name: ClassVar[str] = "h2o"

    def observe(self, scores, mass, q_positions):  # noqa: ANN001, ANN201
        return scores + jnp.sum(mass, axis=2)


def _last_query(mass: Float[Array, "B K T R"], q_positions: Int[Array, "B T"]) -> Float[Array, "B K R"]:
    """The mass of each row's last real query."""
    last = jnp.argmax(q_positions, axis=1)  # B
    return jnp.take_along_axis(mass, last[:, None, None, None], axis=2)[:, :, 0]


@dataclasses.dataclass(frozen=True)
class TOVAPress(Press):
    """Token Omission Via Attention (Oren et al. 2024): keep the keys the current query
    attends to most; the score is the attention of each row's last query, averaged over
    the heads of the layer as in the paper (so every KV head of a layer keeps the same
    tokens), and it replaces, not accumulates."""

    name: ClassVar[str] = "tova"

    def observe(self, scores, mass, q_positions):  # noqa: ANN001, ANN201
        current = _last_query(mass, q_positions)
        return jnp.broadcast_to(jnp.mean(current, axis=1, keepdims=True), current.shape)


@dataclasses.dataclass(frozen=True)
class SnapKVPress(Press):
    """SnapKV (Li et al. 2024): the queries of an observation window at the end of the
    prompt (the last `window` positions of each row, which also stay in the cache) vote
    for the keys they attend to; votes are max-pooled over `kernel` neighbouring entries
    so that a key's context is kept with it. The vote of the latest forward replaces the
    previous one: after a prompt it is SnapKV's selection; during decoding the window
    is the newest token alone."""

    window: int = 32
    kernel: int = 7
    name: ClassVar[str] = "snapkv"

    def __post_init__(self) -> None:
        _check(self)
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"SnapKVPress.kernel must be a positive odd int, got {self.kernel!r}")

    def observe(self, scores, mass, q_positions):  # noqa: ANN001, ANN201
        newest = jnp.max(q_positions, axis=1, keepdims=True)
        observing = (q_positions >= 0) & (q_positions > newest - self.window)  # B T
        votes = jnp.sum(mass * observing[:, None, :, None], axis=2)  # B K R
        if self.kernel == 1:
            return votes
        return jax.lax.reduce_window(votes, -jnp.inf, jax.lax.max, (1, 1, self.kernel), (1, 1, 1), "SAME")


PRESSES: dict[str, type[Press]] = {p.name: p for p in (StreamingLLMPress, H2OPress, TOVAPress, SnapKVPress)}


def press_for_budget(name: str, budget: int) -> Press:
    """A press named `name` with each paper's split of a `budget`: StreamingLLM 4 sinks and
    the rest recent; H2O half heavy hitters, half recent; TOVA the newest token only;
    SnapKV an observation window of min(32, budget / 2) and pooling over 7 entries."""
    if name not in PRESSES:
        raise ValueError(f"press must be one of {sorted(PRESSES)}, got {name!r}")
    if not isinstance(budget, int) or budget < 8:
        raise ValueError(f"budget must be an int of at least 8 (4 sinks + 4 recent), got {budget!r}")
    if name == "streaming_llm":
        return StreamingLLMPress(sinks=4, window=budget - 4)
    if name == "h2o":
        return H2OPress(window=budget // 2)
    if name == "tova":
        return TOVAPress()
    return SnapKVPress(window=min(32, budget // 2))
