"""Prompt lookup decoding / CopySpec (Dumitru et al. 2025, "CopySpec: Accelerating
LLMs with Speculative Copy-and-Paste"): copy the continuation of an earlier
occurrence of the text just written.

    drafter = PromptLookupDrafter.create(length=8, max_ngram=4, min_ngram=1)

Each step, per row: the suffix of the committed history (ending at the root,
`last_position`) of n tokens, for n = max_ngram down to min_ngram, is searched
for earlier in the same row's history (prompt + generated text). The longest n
with a match wins; among its matches the most recent one (the occurrence
ending latest) is taken. The tokens that followed it are proposed as a chain of
up to `length` tokens, never reading past `last_position` (so the most recent
match of a periodic text proposes at most one period). No match: an empty tree.
Every token is a point mass (probs=None), so the drafter is deterministic and
needs no model, no state and no training.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from efficient.cache.protocol import KVCache
from efficient.decoding.drafters.base import DraftContext, PromptContext, VerifyOutcome
from efficient.decoding.tree import DraftTree, chain, check_tree_size


def _check_ngram(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def lookup(
    history: Int[Array, "B C"], last_position: Int[Array, " B"], *, length: int, max_ngram: int,
    min_ngram: int = 1,
) -> tuple[Int[Array, "B D"], Int[Array, " B"], Int[Array, " B"]]:
    """The n-gram match of every row (D = length).

    Returns (tokens, counts, ngram): the continuation `tokens[b, :counts[b]]`
    of the chosen match (pad after), and the matched n (0: no match, counts 0).
    Positions > last_position[b] of `history` are never read into the result.
    """
    b, c = history.shape
    history = history.astype(jnp.int32)
    last = jnp.asarray(last_position, jnp.int32)
    rows = jnp.arange(b)
    ends = jnp.arange(c, dtype=jnp.int32)[None, :]  # candidate end position e of an occurrence
    # An occurrence ends strictly before the root (it is not the suffix itself).
    before = ends < last[:, None]
    # matches[b, e]: history[e - j] == history[last - j] for j < n, built one j at a time.
    matches = before
    best_end = jnp.full((b,), -1, jnp.int32)
    best_n = jnp.zeros((b,), jnp.int32)
    for j in range(max_ngram):
        n = j + 1
        shifted = jnp.pad(history, ((0, 0), (j, 0)))[:, :c]  # shifted[b, e] = history[b, e - j]
        wanted = history[rows, jnp.clip(last - j, 0, c - 1)]
        matches = matches & (ends >= j) & (shifted == wanted[:, None])
        if n >= min_ngram:
            latest = jnp.max(jnp.where(matches, ends, -1), axis=1)  # most recent occurrence
            found = latest >= 0
            # Larger n is visited later and overrides: the longest match wins.
            best_end = jnp.where(found, latest, best_end)
            best_n = jnp.where(found, n, best_n)
    start = best_end + 1
    counts = jnp.where(best_n > 0, jnp.minimum(length, last - best_end), 0)
    index = jnp.arange(length, dtype=jnp.int32)[None, :]
    tokens = jnp.take_along_axis(history, jnp.clip(start[:, None] + index, 0, c - 1), axis=1)
    tokens = jnp.where(index < counts[:, None], tokens, 0)
    return tokens, counts.astype(jnp.int32), best_n


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptLookupDrafter:
    """Copy the continuation of the longest, most recent earlier n-gram match (a chain)."""

    length: int = dataclasses.field(default=8, metadata=dict(static=True))
    max_ngram: int = dataclasses.field(default=4, metadata=dict(static=True))
    min_ngram: int = dataclasses.field(default=1, metadata=dict(static=True))

    @classmethod
    def create(cls, *, length: int = 8, max_ngram: int = 4, min_ngram: int = 1) -> PromptLookupDrafter:
        """length: most tokens copied per step; max_ngram/min_ngram: the n-gram sizes
        tried, longest first (1 <= min_ngram <= max_ngram)."""
        length = check_tree_size(length, "length")
        max_ngram = _check_ngram(max_ngram, "max_ngram")
        min_ngram = _check_ngram(min_ngram, "min_ngram")
        if min_ngram > max_ngram:
            raise ValueError(f"min_ngram must be <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        return cls(length=length, max_ngram=max_ngram, min_ngram=min_ngram)

    # -------------------------------------------------------------- protocol
    @property
    def tree_size(self) -> int:
        return self.length

    @property
    def max_depth(self) -> int:
        return self.length

    @property
    def is_chain(self) -> bool:
        return True

    def check(self, target_config: object) -> None:
        """Any target works: the drafter only reads token ids."""

    def init(self, prompt: PromptContext) -> None:
        return None

    def propose(self, state: None, ctx: DraftContext) -> tuple[DraftTree, None, KVCache]:
        tokens, counts, _ = lookup(ctx.history, ctx.last_position, length=self.length,
                                   max_ngram=self.max_ngram, min_ngram=self.min_ngram)
        counts = jnp.where(ctx.active, counts, 0)
        return chain(tokens, counts), state, ctx.cache

    def update(self, state: None, ctx: DraftContext, outcome: VerifyOutcome) -> None:
        return state
