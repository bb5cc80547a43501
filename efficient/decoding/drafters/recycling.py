"""Token Recycling (Luo et al. 2024, "Turning Trash into Treasure: Accelerating
Inference of LLMs with Token Recycling"): the candidate tokens the target
scored but did not emit are kept in an adjacency matrix and reused as drafts.

    drafter = TokenRecyclingDrafter.create()                          # default 25-node tree
    drafter = TokenRecyclingDrafter.create(branching=((3,), (2, 1, 1)), top_k=3)

State: M[V, k] (int32), for each token the top-k next tokens the target
predicted the last time that token was verified. It is one matrix shared by
all batch rows, as the paper keeps one matrix: every row reads and writes it.

- propose: a static tree template (`template_parents(branching)`, BFS-like as
  in the paper: deeper levels have fewer children, higher-ranked candidates
  more) is filled top-down: the node that is its parent's r-th child takes
  token M[parent token, r] (the root's token is the last committed token).
  Point masses (probs=None): the drafter is deterministic.
- update: for every verified position (the root and each existing node),
  M[token] = top-k of the target logits there. When one token occurs at
  several positions (in a row or across the batch), the root and accepted
  path win over rejected nodes, then the later node, then the later row.
- init: M starts from `matrix` (given to `create`) or, for every token, k
  copies of the token itself (a harmless repetition guess until the token's
  row is first written). With `prompt_init`, each prompt token's row then
  gets its distinct successors in the prompts (and the first generated
  token), most recent first, in its leading ranks; later ranks keep their
  initial value.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from efficient.cache.protocol import KVCache
from efficient.decoding.drafters.base import DraftContext, PromptContext, VerifyOutcome
from efficient.decoding.tree import MAX_TREE_NODES, DraftTree, template_parents

# 25 nodes, depth 5: 4 + 7 + 8 + 4 + 2 nodes per level.
DEFAULT_BRANCHING: tuple[tuple[int, ...], ...] = (
    (4,),
    (3, 2, 1, 1),
    (2, 1, 1, 1, 1, 1, 1),
    (1, 1, 1, 0, 1, 0, 0, 0),
    (1, 1, 0, 0),
)


def template(branching: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(parents, ranks, depths) of the template: node i is the ranks[i]-th child of parents[i]."""
    parents = template_parents(branching)
    ranks = np.zeros_like(parents)
    depths = np.zeros_like(parents)
    seen: dict[int, int] = {}
    for i, parent in enumerate(parents.tolist()):
        ranks[i] = seen.get(parent, 0)
        seen[parent] = ranks[i] + 1
        depths[i] = 1 if parent < 0 else depths[parent] + 1
    return parents, ranks, depths


def expand(matrix: Int[Array, "V K"], root: Int[Array, " B"],
           branching: tuple[tuple[int, ...], ...]) -> Int[Array, "B W"]:
    """Tree tokens: node i = matrix[token of its parent, its rank], level by level."""
    parents, ranks, depths = template(branching)
    b, w = root.shape[0], parents.shape[0]
    tokens = jnp.zeros((b, w), jnp.int32)
    for depth in range(1, int(depths.max()) + 1):
        nodes = np.flatnonzero(depths == depth)
        par = parents[nodes]
        parent_tokens = jnp.where(jnp.asarray(par)[None, :] < 0, root[:, None].astype(jnp.int32),
                                  tokens[:, np.maximum(par, 0)])
        tokens = tokens.at[:, nodes].set(matrix[parent_tokens, jnp.asarray(ranks[nodes])[None, :]])
    return tokens


def recycle(matrix: Int[Array, "V K"], tokens: Int[Array, "B T"], logits: Float[Array, "B T V"],
            valid: Bool[Array, "B T"], priority: Int[Array, "B T"] | None = None) -> Int[Array, "V K"]:
    """matrix[tokens[b, t]] = top-k(logits[b, t]) for valid positions. Among positions
    holding the same token the highest `priority` wins (ties: the later flat index)."""
    v, k = matrix.shape
    b, t = tokens.shape
    flat = jnp.arange(b * t, dtype=jnp.int32).reshape(b, t)
    score = flat if priority is None else priority.astype(jnp.int32) * (b * t) + flat
    score = jnp.where(valid, score, -1)
    tokens = tokens.astype(jnp.int32)
    best = jnp.full((v,), -1, jnp.int32).at[jnp.where(valid, tokens, v)].max(score, mode="drop")
    write = valid & (best[jnp.clip(tokens, 0, v - 1)] == score)
    _, top = jax.lax.top_k(logits.astype(jnp.float32), k)  # B T K, best first
    return matrix.at[jnp.where(write, tokens, v)].set(top.astype(jnp.int32), mode="drop")


def prompt_successors(matrix: Int[Array, "V K"], history: Int[Array, "B C"],
                      last: Int[Array, " B"]) -> Int[Array, "V K"]:
    """Each token's distinct successors in history[b, :last[b] + 1], most recent
    first (ties across rows: the later row), written into its leading ranks."""
    v, k = matrix.shape
    b, c = history.shape
    tok = history[:, :-1].reshape(-1).astype(jnp.int32)
    succ = history[:, 1:].reshape(-1).astype(jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(c - 1, dtype=jnp.int32)[None, :], (b, c - 1))
    valid = (pos < last[:, None]).reshape(-1)
    recency = (pos * b + jnp.arange(b, dtype=jnp.int32)[:, None]).reshape(-1)
    tok = jnp.where(valid, tok, v)
    # 1. Keep the most recent occurrence of each (token, successor) bigram.
    order = jnp.lexsort((-recency, succ, tok))
    tok, succ, recency = tok[order], succ[order], recency[order]
    first = jnp.concatenate([jnp.ones((1,), bool), (tok[1:] != tok[:-1]) | (succ[1:] != succ[:-1])])
    tok = jnp.where(first, tok, v)
    # 2. Rank each token's kept successors by recency.
    order = jnp.lexsort((-recency, tok))
    tok, succ = tok[order], succ[order]
    index = jnp.arange(tok.shape[0], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones((1,), bool), tok[1:] != tok[:-1]])
    rank = index - jax.lax.cummax(jnp.where(starts, index, 0))
    rows = jnp.where((tok < v) & (rank < k), tok, v)
    return matrix.at[rows, jnp.minimum(rank, k - 1)].set(succ, mode="drop")


def _check_branching(branching: object) -> tuple[tuple[int, ...], ...]:
    try:
        levels = tuple(tuple(level) for level in branching)  # type: ignore[union-attr]
    except TypeError:
        raise TypeError(f"branching must be a sequence of sequences of child counts, got {branching!r}") from None
    for level in levels:
        for count in level:
            if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
                raise ValueError(f"branching: child counts must be ints >= 0, got {count!r} in {branching!r}")
    levels = tuple(tuple(int(c) for c in level) for level in levels)
    parents = template_parents(levels)  # ValueError naming branching[d] on a bad level width
    if not 1 <= parents.shape[0] <= MAX_TREE_NODES:
        raise ValueError(f"branching must describe 1 to {MAX_TREE_NODES} nodes, got {parents.shape[0]}")
    return levels


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenRecyclingDrafter:
    """Draft a static tree from the recycled top-k adjacency matrix (state: M[V, k])."""

    matrix: Int[Array, "V K"] | None = None  # initial matrix (None: repetition guess)
    branching: tuple[tuple[int, ...], ...] = dataclasses.field(default=DEFAULT_BRANCHING,
                                                               metadata=dict(static=True))
    top_k: int = dataclasses.field(default=4, metadata=dict(static=True))
    prompt_init: bool = dataclasses.field(default=True, metadata=dict(static=True))

    @classmethod
    def create(cls, *, branching: tuple[tuple[int, ...], ...] = DEFAULT_BRANCHING, top_k: int | None = None,
               matrix: Int[Array, "V K"] | np.ndarray | None = None,
               prompt_init: bool = True) -> TokenRecyclingDrafter:
        """branching: the tree template, as for `template_parents`; top_k: candidates
        kept per token (default: the matrix's width, else the largest child count);
        matrix: an initial M[V, top_k] of token ids (e.g. from an earlier run);
        prompt_init: seed M with the prompts' successors at init."""
        levels = _check_branching(branching)
        widest = max(int(max(level, default=0)) for level in levels)
        if matrix is not None:
            array = np.asarray(matrix)
            if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
                raise ValueError(f"matrix must have shape [V, top_k], got {array.shape}")
            if not np.issubdtype(array.dtype, np.integer):
                raise TypeError(f"matrix must hold integer token ids, got dtype {array.dtype}")
            if array.min() < 0 or array.max() >= array.shape[0]:
                raise ValueError(f"matrix: token ids must lie in [0, {array.shape[0]}), got "
                                 f"[{array.min()}, {array.max()}]")
            if top_k is None:
                top_k = array.shape[1]
        top_k = widest if top_k is None else top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < widest:
            raise ValueError(f"top_k must be an int >= the largest child count of branching ({widest}), "
                             f"got {top_k!r}")
        if matrix is not None and np.shape(matrix)[1] != top_k:
            raise ValueError(f"matrix must have shape [V, top_k={top_k}], got {np.shape(matrix)}")
        if not isinstance(prompt_init, bool):
            raise TypeError(f"prompt_init must be a bool, got {prompt_init!r}")
        return cls(matrix=None if matrix is None else jnp.asarray(matrix, jnp.int32), branching=levels,
                   top_k=int(top_k), prompt_init=prompt_init)

    # -------------------------------------------------------------- protocol
    @property
    def tree_size(self) -> int:
        return int(template_parents(self.branching).shape[0])

    @property
    def max_depth(self) -> int:
        return int(template(self.branching)[2].max())

    @property
    def is_chain(self) -> bool:
        return False

    def check(self, target_config: object) -> None:
        vocab = target_config.vocab_size  # type: ignore[attr-defined]
        if self.matrix is not None and self.matrix.shape[0] != vocab:
            raise ValueError(f"matrix has {self.matrix.shape[0]} rows != target vocab_size {vocab}")
        if self.top_k > vocab:
            raise ValueError(f"top_k {self.top_k} exceeds the target vocab_size {vocab}")

    def init(self, prompt: PromptContext) -> Int[Array, "V K"]:
        if self.matrix is None:
            v = prompt.target.config.vocab_size
            matrix = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32)[:, None], (v, self.top_k))
        else:
            matrix = self.matrix.astype(jnp.int32)
        if self.prompt_init:
            matrix = prompt_successors(matrix, prompt.history, prompt.lengths)
        return matrix

    def propose(self, state: Int[Array, "V K"], ctx: DraftContext) -> tuple[DraftTree, Int[Array, "V K"], KVCache]:
        tokens = expand(state, ctx.last_token, self.branching)
        b, w = tokens.shape
        parents = jnp.broadcast_to(jnp.asarray(template_parents(self.branching)), (b, w))
        valid = jnp.broadcast_to(ctx.active[:, None], (b, w))
        return DraftTree(tokens=tokens, parents=parents, valid=valid, probs=None), state, ctx.cache

    def update(self, state: Int[Array, "V K"], ctx: DraftContext, outcome: VerifyOutcome) -> Int[Array, "V K"]:
        b, w = outcome.tree.tokens.shape
        tokens = jnp.concatenate([ctx.last_token[:, None], outcome.tree.tokens], axis=1)
        valid = jnp.concatenate([ctx.active[:, None], outcome.valid & ctx.active[:, None]], axis=1)
        on_path = jnp.any(outcome.path[:, :, None] == jnp.arange(w)[None, None, :], axis=1)
        priority = jnp.concatenate([jnp.ones((b, 1), jnp.int32), on_path.astype(jnp.int32)], axis=1)
        return recycle(state, tokens, outcome.logits, valid, priority)
