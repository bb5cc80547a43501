"""Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM
Inference Using Lookahead Decoding") fitted into the one tree verifier.

    drafter = LookaheadDrafter.create(window=5, ngram=4, candidates=4)   # W = 5 + 4 * 3 = 17 nodes

The paper runs two branches in one forward: a *lookahead* branch (a 2D window
of Jacobi iterations whose diagonals feed an n-gram pool) and a *verification*
branch (pool n-grams that start with the last committed token). Here both
live in the draft tree:

- The Jacobi window (N guesses for positions last+1..last+N) is one chain
  below the root. The target's argmax at the root and at each chain node is
  one Jacobi iteration y_t (N + 1 predictions, each conditioned on the
  committed prefix and the previous guesses); the chain is also verified, so
  Jacobi decoding is a special case. Unlike the paper's 2D window (which
  feeds N - 1 past rows to the model every step), the past iterations are
  *remembered* (the last n - 1 of them, by absolute position) rather than
  re-run, so the lookahead branch costs N tree nodes instead of N * (n - 1).
- Diagonal n-grams (y_{t-n+1}[p], y_{t-n+2}[p+1], ..., y_t[p+n-1]): each
  element was predicted while the previous one was the guess at its position
  (the window is the previous iteration shifted). Those whose elements all
  exist go into a *per-row* pool [B, V, G, n-1] keyed by their first token,
  G slots per key overwritten FIFO, exact duplicates skipped. Memory
  4 * B * V * (G * (n-1) + 1) bytes: about 7 MB per row for V = 128k, G = 4, n = 4.
- Candidates: the G pool entries for the last committed token become G
  chains of n - 1 nodes below the root. Branches are merged into a trie (a
  node repeating an earlier branch's prefix is dropped and its child hangs
  below that branch's node), so the verifier's first-matching-child walk finds
  the longest accepted candidate.
- The next window is y_t shifted by the committed count; positions beyond
  y_t's reach are filled with random tokens of the committed history (the
  paper initialises its window with random prompt tokens; so does `init`).

The Jacobi trajectory uses the argmax even under sampling rules: the guesses
only shape the tree, verification keeps the output exact (point masses,
probs=None).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from efficient.cache.protocol import KVCache
from efficient.decoding.drafters.base import DraftContext, PromptContext, VerifyOutcome
from efficient.decoding.tree import DraftTree, check_tree_size
from efficient.models.config import ModelConfig



@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LookaheadState:
    window: Int[Array, "B N"]  # guesses for positions last+1 .. last+N
    trajectory: Int[Array, "B I N1"]  # the last I = n-1 Jacobi iterations (oldest first), -1 = none
    starts: Int[Array, "B I"]  # position of trajectory[:, i, 0]
    pool: Int[Array, "B V G E"]  # n-gram continuations (E = n-1) keyed by first token, -1 = empty
    pointer: Int[Array, "B V"]  # the next slot to overwrite per key (FIFO)


def _gather_positions(rows: Int[Array, "B J"], starts: Int[Array, " B"], positions: Int[Array, "B J"]
                      ) -> Int[Array, "B J"]:
    """rows[b, positions - starts[b]], -1 where the position is out of the row's reach."""
    offsets = positions - starts[:, None]
    inside = (offsets >= 0) & (offsets < rows.shape[1])
    values = jnp.take_along_axis(rows, jnp.clip(offsets, 0, rows.shape[1] - 1), axis=1)
    return jnp.where(inside, values, -1)


def diagonal_ngrams(trajectories: Int[Array, "B n N1"], starts: Int[Array, "B n"]
                    ) -> tuple[Int[Array, "B N1 n"], Bool[Array, "B N1"]]:
    """The n-grams along the diagonals of n Jacobi iterations (oldest first; row i
    predicts positions starts[:, i] + j; -1 = none), one per position p + n - 1
    predicted by the newest: (traj[0][p], traj[1][p + 1], ..., traj[n-1][p + n - 1]).
    Valid where every element exists."""
    n, width = trajectories.shape[1], trajectories.shape[2]
    ends = starts[:, -1:] + jnp.arange(width)[None, :]  # B N1
    elements = [_gather_positions(trajectories[:, i], starts[:, i], ends - (n - 1) + i) for i in range(n)]
    ngrams = jnp.stack(elements, axis=-1)
    return ngrams, jnp.all(ngrams >= 0, axis=-1)


def pool_insert(pool: Int[Array, "B V G E"], pointer: Int[Array, "B V"], ngrams: Int[Array, "B M n"],
                valid: Bool[Array, "B M"]) -> tuple[Int[Array, "B V G E"], Int[Array, "B V"]]:
    """Insert each valid n-gram, in order, under its first token: its continuation
    overwrites slot pointer[key] (FIFO over the G slots) unless already present."""
    b, v, g, _ = pool.shape
    rows = jnp.arange(b)

    def insert(carry: tuple[jax.Array, jax.Array], item: tuple[jax.Array, jax.Array]
               ) -> tuple[tuple[jax.Array, jax.Array], None]:
        pool, pointer = carry
        ngram, ok = item  # [B, n], [B]
        key, continuation = ngram[:, 0], ngram[:, 1:]
        safe_key = jnp.clip(key, 0, v - 1)
        present = jnp.any(jnp.all(pool[rows, safe_key] == continuation[:, None, :], axis=-1), axis=-1)
        write = ok & ~present
        slot = pointer[rows, safe_key]
        pool = pool.at[rows, jnp.where(write, safe_key, v), slot].set(continuation, mode="drop")
        pointer = pointer.at[rows, safe_key].set(jnp.where(write, (slot + 1) % g, slot))
        return (pool, pointer), None

    (pool, pointer), _ = jax.lax.scan(insert, (pool, pointer),
                                      (jnp.moveaxis(ngrams, 1, 0), jnp.moveaxis(valid, 1, 0)))
    return pool, pointer


def shift_window(predictions: Int[Array, "B N1"], num_new: Int[Array, " B"], filler: Int[Array, "B N"]
                 ) -> Int[Array, "B N"]:
    """The next window: predictions[:, k + j] (positions last + 1 + k + j) after k
    committed tokens, filler[:, j] where that runs past the predictions."""
    n = filler.shape[1]
    index = num_new[:, None] + jnp.arange(n)[None, :]
    shifted = jnp.take_along_axis(predictions, jnp.clip(index, 0, predictions.shape[1] - 1), axis=1)
    return jnp.where(index < predictions.shape[1], shifted, filler)


def candidate_tree(window: Int[Array, "B N"], candidates: Int[Array, "B G E"]) -> DraftTree:
    """The window chain (nodes 0..N-1) then G candidate chains (node N + g*E + d),
    merged into a trie: a candidate node whose prefix equals the window's or an
    earlier filled candidate's prefix is dropped and its child hangs below that
    branch's node. Candidates starting with -1 (empty slots) do not exist."""
    b, n = window.shape
    _, g, e = candidates.shape
    filled = candidates[:, :, 0] >= 0  # B G
    own = n + jnp.arange(g)[:, None] * e + jnp.arange(e)[None, :]  # G E
    # Prefix equality with the window chain (depth d < N) and with earlier filled candidates.
    depth = min(n, e)
    same_chain = jnp.cumprod(candidates[:, :, :depth] == window[:, None, :depth], axis=-1).astype(bool)
    same_chain = jnp.concatenate([same_chain, jnp.zeros((b, g, e - depth), bool)], axis=-1)  # B G E
    same = jnp.cumprod(candidates[:, :, None, :] == candidates[:, None, :, :], axis=-1).astype(bool)
    earlier = jnp.tril(jnp.ones((g, g), bool), k=-1)[None, :, :] & filled[:, None, :]  # B G G'
    same &= earlier[..., None]  # B G G' E
    first = jnp.argmax(same, axis=2)  # B G E: the first earlier candidate with the same prefix
    representative = jnp.where(same_chain, jnp.arange(e)[None, None, :],
                               jnp.where(jnp.any(same, axis=2), n + first * e + jnp.arange(e), own[None]))
    parents = jnp.concatenate([jnp.full((b, g, 1), -1, representative.dtype), representative[:, :, :-1]],
                              axis=-1)
    valid = filled[:, :, None] & (representative == own[None])
    tokens = jnp.concatenate([window, jnp.maximum(candidates, 0).reshape(b, g * e)], axis=1)
    chain_parents = jnp.broadcast_to(jnp.arange(n) - 1, (b, n))
    return DraftTree(tokens=tokens.astype(jnp.int32),
                     parents=jnp.concatenate([chain_parents, parents.reshape(b, g * e)], axis=1).astype(jnp.int32),
                     valid=jnp.concatenate([jnp.ones((b, n), bool), valid.reshape(b, g * e)], axis=1))


def _random_history_tokens(key: jax.Array, history: Int[Array, "B C"], last: Int[Array, " B"], count: int
                           ) -> Int[Array, "B N"]:
    """`count` tokens per row drawn uniformly from history positions 0..last."""
    positions = jax.random.randint(key, (history.shape[0], count), 0, last[:, None] + 1)
    return jnp.take_along_axis(history, positions, axis=1)


def _check_int(value: object, name: str, low: int) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LookaheadDrafter:
    window: int = dataclasses.field(default=5, metadata=dict(static=True))  # N: Jacobi guesses per step
    ngram: int = dataclasses.field(default=4, metadata=dict(static=True))  # n: pool n-gram size
    candidates: int = dataclasses.field(default=4, metadata=dict(static=True))  # G: pool slots per key

    @classmethod
    def create(cls, *, window: int = 5, ngram: int = 4, candidates: int = 4) -> LookaheadDrafter:
        """window: N >= 1 Jacobi guesses (the lookahead chain); ngram: n >= 2, the pool
        holds n-grams (candidates of n - 1 tokens); candidates: G >= 1 pool slots per
        key, all verified. The tree has N + G * (n - 1) <= MAX_TREE_NODES nodes."""
        window = _check_int(window, "window", 1)
        ngram = _check_int(ngram, "ngram", 2)
        candidates = _check_int(candidates, "candidates", 1)
        check_tree_size(window + candidates * (ngram - 1), "window + candidates * (ngram - 1)")
        return cls(window=window, ngram=ngram, candidates=candidates)

    # -------------------------------------------------------------- protocol
    @property
    def tree_size(self) -> int:
        return self.window + self.candidates * (self.ngram - 1)

    @property
    def max_depth(self) -> int:
        return max(self.window, self.ngram - 1)

    @property
    def is_chain(self) -> bool:
        return False

    def check(self, target_config: ModelConfig) -> None:
        """Any target works (the pool is sized by its vocabulary at `init`)."""

    def init(self, prompt: PromptContext) -> LookaheadState:
        b = prompt.tokens.shape[0]
        v = prompt.target.config.vocab_size
        width, iterations = self.window + 1, self.ngram - 1
        window = _random_history_tokens(prompt.key, prompt.history, prompt.lengths, self.window)
        return LookaheadState(
            window=window.astype(jnp.int32),
            trajectory=jnp.full((b, iterations, width), -1, jnp.int32),
            starts=jnp.zeros((b, iterations), jnp.int32),
            pool=jnp.full((b, v, self.candidates, self.ngram - 1), -1, jnp.int32),
            pointer=jnp.zeros((b, v), jnp.int32))

    def propose(self, state: LookaheadState, ctx: DraftContext) -> tuple[DraftTree, LookaheadState, KVCache]:
        rows = jnp.arange(state.pool.shape[0])
        candidates = state.pool[rows, jnp.clip(ctx.last_token, 0, state.pool.shape[1] - 1)]
        return candidate_tree(state.window, candidates), state, ctx.cache

    def update(self, state: LookaheadState, ctx: DraftContext, outcome: VerifyOutcome) -> LookaheadState:
        # This step's Jacobi iteration: the target's argmax at the root and the window chain.
        predictions = jnp.argmax(outcome.logits[:, : self.window + 1], axis=-1).astype(jnp.int32)  # B N1
        start = ctx.last_position + 1
        trajectories = jnp.concatenate([state.trajectory, predictions[:, None]], axis=1)
        starts = jnp.concatenate([state.starts, start[:, None]], axis=1)
        ngrams, valid = diagonal_ngrams(trajectories, starts)
        pool, pointer = pool_insert(state.pool, state.pointer, ngrams, valid & ctx.active[:, None])
        filler = _random_history_tokens(jax.random.fold_in(ctx.key, 1), outcome.history,
                                        outcome.last_position, self.window)
        window = shift_window(predictions, outcome.num_new, filler)
        keep = ~ctx.active
        return LookaheadState(
            window=jnp.where(keep[:, None], state.window, window),
            trajectory=jnp.where(keep[:, None, None], state.trajectory, trajectories[:, 1:]),
            starts=jnp.where(keep[:, None], state.starts, starts[:, 1:]),
            pool=pool, pointer=pointer)
