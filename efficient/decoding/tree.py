"""Draft token trees: what every drafter proposes and the verifier scores.

A tree of W nodes hangs below the *root*, the last committed token (whose
cache entry is written by the verification forward). Node i holds a token,
its parent (-1: the root; otherwise an index < i, so nodes are in topological
order) and whether it exists (a drafter may propose fewer than W nodes). A
chain is the tree whose node i has parent i - 1.

`probs[b, i]` is the proposal distribution node i's token was drawn from (the
drafter's law for its parent's next token, after earlier siblings were
removed when it samples without replacement); None means every token was
chosen deterministically (a point mass), as n-gram and recycling drafters do.
Lossless speculative sampling needs it; greedy verification ignores it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

# The largest tree the verifier scores in one forward (the query length of the
# verification attention is 1 + W).
MAX_TREE_NODES = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftTree:
    tokens: Int[Array, "B W"]
    parents: Int[Array, "B W"]  # -1: child of the root
    valid: Bool[Array, "B W"]
    probs: Float[Array, "B W V"] | None = None  # proposal law of each node (None: point masses)

    @property
    def size(self) -> int:
        return self.tokens.shape[1]


def check_tree_size(size: int, name: str = "tree_size") -> int:
    """A static tree size in [1, MAX_TREE_NODES]; ValueError naming `name` otherwise."""
    if not isinstance(size, int | np.integer) or isinstance(size, bool) or not 1 <= size <= MAX_TREE_NODES:
        raise ValueError(f"{name} must be an int in [1, {MAX_TREE_NODES}] (the verifier's largest tree), "
                         f"got {size!r}")
    return int(size)


def chain(tokens: Int[Array, "B D"], lengths: Int[Array, " B"],
          probs: Float[Array, "B D V"] | None = None) -> DraftTree:
    """A chain per row: node i follows node i - 1; the first `lengths[b]` nodes exist."""
    b, d = tokens.shape
    index = jnp.arange(d, dtype=jnp.int32)
    parents = jnp.broadcast_to(index - 1, (b, d))
    valid = index[None, :] < jnp.asarray(lengths, jnp.int32)[:, None]
    return DraftTree(tokens=tokens.astype(jnp.int32), parents=parents, valid=valid, probs=probs)


def ancestry(tree: DraftTree) -> tuple[Bool[Array, "B W W"], Int[Array, "B W"], Bool[Array, "B W"]]:
    """(ancestors, depths, valid): ancestors[b, j, i] = node i is node j or one of its
    ancestors; depth 1 = child of the root; a node whose parent does not exist (or
    is not earlier in the order) does not exist either.

    The closure is computed by repeated squaring of the parent relation
    (ceil(log2 W) boolean matrix products, no sequential loop over nodes)."""
    b, w = tree.tokens.shape
    index = jnp.arange(w, dtype=jnp.int32)
    parents = tree.parents.astype(jnp.int32)
    ordered = (parents >= -1) & (parents < index[None, :])
    edge = (parents[:, :, None] == index[None, None, :]) & ordered[:, :, None]  # j -> its parent i
    anc = edge | jnp.eye(w, dtype=jnp.bool_)[None]
    for _ in range(max(1, int(np.ceil(np.log2(max(w, 2)))))):
        reach = jnp.einsum("bjk,bki->bji", anc.astype(jnp.float32), anc.astype(jnp.float32))
        anc = anc | (reach > 0)
    exists = tree.valid & ordered
    valid = ~jnp.any(anc & ~exists[:, None, :], axis=-1)
    depths = jnp.sum(anc, axis=-1, dtype=jnp.int32)
    return anc, depths, valid


def verification_inputs(
    tree: DraftTree, root_token: Int[Array, " B"], root_position: Int[Array, " B"], active: Bool[Array, " B"]
) -> tuple[Int[Array, "B T"], Int[Array, "B T"], Bool[Array, "B T T"], Bool[Array, "B W W"], Int[Array, "B W"],
           Bool[Array, "B W"]]:
    """Tokens, positions and the [B, T, T] visibility (T = 1 + W, index 0 the root) of
    the verification forward, plus the tree's ancestry (ancestors, depths,
    existence). Inactive rows and missing nodes get position -1 (never attended)."""
    anc, depths, valid = ancestry(tree)
    valid &= active[:, None]
    b, w = tree.tokens.shape
    tokens = jnp.concatenate([root_token[:, None].astype(jnp.int32), tree.tokens], axis=1)
    node_pos = jnp.where(valid, root_position[:, None] + depths, -1)
    positions = jnp.concatenate([jnp.where(active, root_position, -1)[:, None], node_pos], axis=1)
    top = jnp.zeros((b, 1, 1 + w), jnp.bool_).at[:, 0, 0].set(True)
    below = jnp.concatenate([jnp.ones((b, w, 1), jnp.bool_), anc], axis=2)
    return tokens, positions.astype(jnp.int32), jnp.concatenate([top, below], axis=1), anc, depths, valid


def check_tree(tree: DraftTree, vocab_size: int | None = None) -> None:
    """Validate a concrete tree (tests, custom drafters): shapes, parent order, ids, laws."""
    tokens, parents = np.asarray(tree.tokens), np.asarray(tree.parents)
    if tokens.ndim != 2 or parents.shape != tokens.shape or np.shape(tree.valid) != tokens.shape:
        raise ValueError(f"tree: tokens, parents and valid must share a [B, W] shape, got "
                         f"{tokens.shape}, {parents.shape}, {np.shape(tree.valid)}")
    check_tree_size(tokens.shape[1], "tree size")
    index = np.arange(tokens.shape[1])[None, :]
    if np.any((parents < -1) | (parents >= index)):
        raise ValueError("tree.parents: each parent must be -1 (the root) or an earlier node index")
    if vocab_size is not None and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"tree.tokens: ids must lie in [0, {vocab_size})")
    if tree.probs is not None:
        probs = np.asarray(tree.probs)
        if probs.shape[:2] != tokens.shape or (vocab_size is not None and probs.shape[2] != vocab_size):
            raise ValueError(f"tree.probs must have shape [B, W, V], got {probs.shape}")


def template_parents(branching: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """Parents of a static tree template given, per depth, the number of children of
    each node of the previous depth (in order): ((3,), (2, 1, 1)) is a root with
    3 children, the first with 2 children and the others with 1."""
    parents: list[int] = []
    previous = [-1]
    for depth, counts in enumerate(branching):
        if len(counts) != len(previous):
            raise ValueError(f"branching[{depth}] has {len(counts)} entries for {len(previous)} nodes at the "
                             f"previous depth")
        current = []
        for parent, count in zip(previous, counts, strict=True):
            if count < 0:
                raise ValueError(f"branching[{depth}]: child counts must be >= 0, got {count}")
            for _ in range(count):
                current.append(len(parents))
                parents.append(parent)
        previous = current
    return np.asarray(parents, np.int32)
