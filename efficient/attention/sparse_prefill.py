"""MInference (Jiang et al. 2024): dynamic sparse prefill with a pattern per attention head.

Each (layer, query head) is given one of MInference's patterns offline
(efficient/attention/sparse_prefill_search.py), and at prefill time the pattern's index is
built from this prompt's own queries and keys, then attention runs over the listed key
blocks only (efficient/attention/block_sparse.py: the xla path gathers only those blocks,
the Pallas TPU kernel skips their DMA):

- "a_shape": the first key block (attention sinks) plus a local window of `budget` x S
  tokens before each query block (StreamingLLM's shape, static).
- "vertical_slash": the last `last_queries` queries of the prompt are scored against every
  key; the keys with the highest summed attention (vertical lines, `budget` x S of them) and
  the query-key distances with the highest summed attention (slash lines, `budget2` x S of
  them) are kept. As in MInference's kernel, vertical lines are read token by token (each
  head's key columns, gathered once and seen by every query after them) and slash lines by
  block (a slash at distance o lists, for each query block, the key blocks holding keys at
  q_pos - o for some query of the block), so slashes are widened to blocks and counted so.
- "block_sparse": queries and keys mean-pooled per block, the `budget` x Sb key blocks with
  the highest pooled score kept for each query block.
- "dense": every causal block (a head the search could not make sparse).

Every sparse pattern also lists the first key block and the blocks within one block before
each query block (MInference forces its first columns and last diagonals the same way), so
no query is left without keys; and the query blocks holding the last `last_queries` queries
attend densely (their scores against every key are computed for the estimate anyway, and
generation continues from the last one). Block geometry comes from positions, not slot
indices (a row's padding, a chunk over a cache), and attention inside the listed blocks
applies the usual masks (efficient.attention.spec), so at full budget every pattern equals
dense attention. Budgets are fractions of the keys S, so one pattern set serves every
prompt length.

What it loses: the attention mass on keys outside the index, in every layer of the prefill
(`sparse_prefill_search.index_recall` measures it against dense attention), and with it the
prompt's hidden states and cache entries drift from dense ones.

A model carries its pattern set as the static attribute `sparse_prefill`
(`set_sparse_prefill`); `forward` then runs every call of at least `min_tokens` queries over
a dense view (a prefill, fresh or chunked) through `sparse_prefill_attention`; decode steps,
shorter calls, non-dense views (quantized, paged, Quest) and caches that score their keys
(eviction) attend densely.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from efficient.attention.block_sparse import BlockSparseLayout, block_sparse_attention
from efficient.attention.spec import AttentionSpec
from efficient.attention.views import DenseView, slot_positions
from kernels_pallas.flash_attention.reference import visible

PATTERNS = ("a_shape", "vertical_slash", "block_sparse", "dense")
A_SHAPE, VERTICAL_SLASH, BLOCK_SPARSE, DENSE = range(4)
_BIG = np.iinfo(np.int32).max // 2


@dataclasses.dataclass(frozen=True)
class HeadPattern:
    """One head's pattern: `kind` (a PATTERNS name) and its budgets as fractions of the keys S:
    a_shape: budget = local window; vertical_slash: budget = vertical lines, budget2 = slash
    lines; block_sparse: budget = key blocks per query block; dense: none."""

    kind: str
    budget: float = 0.0
    budget2: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in PATTERNS:
            raise ValueError(f"HeadPattern.kind must be one of {PATTERNS}, got {self.kind!r}")
        for name in ("budget", "budget2"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ValueError(f"HeadPattern.{name} must be a fraction in [0, 1], got {value!r}")
        if self.kind != "dense" and self.budget + self.budget2 <= 0.0:
            raise ValueError(f"HeadPattern {self.kind!r} needs a positive budget, got {self.budget}, {self.budget2}")


@dataclasses.dataclass(frozen=True)
class SparsePrefill:
    """Patterns per (layer, query head), hashable (a model's static attribute): `heads[l][n]`.

    block: query and key block size of the layout. last_queries: queries that estimate the
    vertical and slash lines. min_tokens: calls with fewer queries attend densely."""

    heads: tuple[tuple[HeadPattern, ...], ...]
    block: int = 64
    last_queries: int = 64
    min_tokens: int = 1024

    def __post_init__(self) -> None:
        if not self.heads or not all(isinstance(row, tuple) and row for row in self.heads):
            raise ValueError("SparsePrefill.heads must be a non-empty tuple (layers) of non-empty tuples (heads)")
        if len({len(row) for row in self.heads}) != 1:
            raise ValueError("SparsePrefill.heads: every layer needs as many heads, got "
                             f"{[len(row) for row in self.heads]}")
        if not all(isinstance(p, HeadPattern) for row in self.heads for p in row):
            raise TypeError("SparsePrefill.heads must hold HeadPattern entries")
        for name in ("block", "last_queries", "min_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SparsePrefill.{name} must be a positive int, got {value!r}")

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    @property
    def num_heads(self) -> int:
        return len(self.heads[0])

    @classmethod
    def uniform(cls, pattern: HeadPattern, num_layers: int, num_heads: int, **kwargs: int) -> SparsePrefill:
        """One pattern for every head of every layer."""
        return cls(heads=tuple((pattern,) * num_heads for _ in range(num_layers)), **kwargs)

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(kind int32 [L, N], budget float32 [L, N], budget2 float32 [L, N])."""
        kind = np.array([[PATTERNS.index(p.kind) for p in row] for row in self.heads], np.int32)
        budget = np.array([[p.budget for p in row] for row in self.heads], np.float32)
        budget2 = np.array([[p.budget2 for p in row] for row in self.heads], np.float32)
        return kind, budget, budget2

    def max_budgets(self) -> tuple[float, float, float]:
        """(vertical lines, slash lines, key blocks): the largest budget of any head of that
        kind, which sizes the index's top-k (static)."""
        top = lambda kind, attr: max((getattr(p, attr) for row in self.heads for p in row if p.kind == kind),  # noqa: E731
                                     default=0.0)
        return top("vertical_slash", "budget"), top("vertical_slash", "budget2"), top("block_sparse", "budget")

    def counts(self) -> dict[str, int]:
        """How many heads use each pattern."""
        return {name: sum(p.kind == name for row in self.heads for p in row) for name in PATTERNS}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillIndex:
    """What a layer's prefill reads: `layout`, the key blocks per (row, query head, query
    block), and `columns` [B, N, V], key slots every query of the head reads besides (the
    vertical lines of vertical-slash heads, token-wise; -1 for none)."""

    layout: BlockSparseLayout
    columns: Int[Array, "B N V"]

    def covered(self, num_keys: int) -> Bool[Array, "B N Tb S"]:
        """Which keys each (row, head, query block) reads, before masking."""
        block = self.layout.block_k
        listed = jnp.repeat(self.layout.block_mask(num_keys // block), block, axis=-1)  # B N Tb S
        b, n, _ = self.columns.shape
        chosen = jnp.zeros((b, n, num_keys + 1), jnp.bool_).at[
            jnp.arange(b)[:, None, None], jnp.arange(n)[None, :, None],
            jnp.where(self.columns >= 0, self.columns, num_keys)].set(True)[..., :num_keys]
        return listed | chosen[:, :, None, :]


def _top_indices(score: Float[Array, "B N X"], count: Int[Array, " N"], max_count: int) -> Int[Array, "B N c"]:
    """The `count[n]` entries of highest score per (row, head), -1 past count or at -inf."""
    b, n, _ = score.shape
    if max_count == 0:
        return jnp.full((b, n, 0), -1, jnp.int32)
    values, index = jax.lax.top_k(score, max_count)
    keep = (jnp.arange(max_count)[None, None, :] < count[None, :, None]) & (values > -jnp.inf)
    return jnp.where(keep, index, -1).astype(jnp.int32)


def _top_set(score: Float[Array, "B N X"], count: Int[Array, " N"], max_count: int) -> Bool[Array, "B N X"]:
    """`_top_indices` as a mask over X."""
    b, n, x = score.shape
    index = _top_indices(score, count, max_count)
    return jnp.zeros((b, n, x + 1), jnp.bool_).at[
        jnp.arange(b)[:, None, None], jnp.arange(n)[None, :, None], jnp.where(index >= 0, index, x)].set(True)[..., :x]


def _block_ranges(positions: Int[Array, "B T"], block: int) -> tuple[Int[Array, "B Tb"], Int[Array, "B Tb"]]:
    """(min, max) position of each block's valid tokens; an empty block gets (_BIG, -1)."""
    b, t = positions.shape
    p = positions.reshape(b, t // block, block)
    lo = jnp.min(jnp.where(p >= 0, p, _BIG), axis=-1)
    hi = jnp.max(jnp.where(p >= 0, p, -1), axis=-1)
    return lo, hi


def _estimate_lines(q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], q_positions: Int[Array, "B T"],
                    kv_positions: Int[Array, "B S"], spec: AttentionSpec, last_queries: int
                    ) -> tuple[Float[Array, "B N S"], Float[Array, "B N S"]]:
    """Summed attention of the last queries (highest positions) per key (vertical) and per
    query-key distance in [0, S) (slash), float32."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    last = min(last_queries, t)
    _, idx = jax.lax.top_k(q_positions, last)  # B Lq: the prompt's last queries
    ql = jnp.take_along_axis(q, idx[:, :, None, None], axis=1)
    qp = jnp.take_along_axis(q_positions, idx, axis=1)
    kx = jnp.repeat(k, n // kh, axis=2)
    logits = jnp.einsum("bqnh,bsnh->bnqs", ql, kx.astype(ql.dtype), preferred_element_type=jnp.float32)
    logits = logits * spec.logit_scale(h)
    if spec.softcap is not None:
        logits = spec.softcap * jnp.tanh(logits / spec.softcap)
    seen = visible(qp[:, None, :, None], kv_positions[:, None, None, :], None, None, causal=spec.causal,
                   window=spec.window)
    probs = jax.nn.softmax(jnp.where(seen, logits, -jnp.inf), axis=-1)
    probs = jnp.where(seen, probs, 0.0)  # a fully hidden query: zeros, not NaN
    vertical = jnp.sum(probs, axis=2)
    # Keys at their own slot (a prefill, a dense cache) and the last queries at consecutive
    # positions: the slash sums are a shear of probs, no scatter (a 9-head scatter over 8k
    # keys took about 130 ms of XLA:CPU per layer, a third of dense attention).
    slots = jnp.arange(s, dtype=jnp.int32)[None, :]
    sheared = (jnp.all((kv_positions == slots) | (kv_positions < 0))
               & jnp.all((qp == qp[:, :1] - jnp.arange(last)[None, :]) | (qp < 0)))
    return vertical, jax.lax.cond(sheared, _slash_by_shear, _slash_by_scatter, probs, qp, kv_positions)


def _slash_by_shear(probs: Float[Array, "B N Lq S"], qp: Int[Array, "B Lq"], kv_positions: Int[Array, "B S"]
                    ) -> Float[Array, "B N S"]:
    """Slash sums when key s sits at position s and query i (of the last, highest first) at
    qp[:, 0] - i: row i shifted right by i puts every distance qp[:, 0] - j in column j."""
    b, n, m, s = probs.shape
    padded = jnp.pad(probs, ((0, 0), (0, 0), (0, 0), (0, m)))  # B N m S+m
    shifted = padded.reshape(b, n, m * (s + m))[..., :m * (s + m - 1)].reshape(b, n, m, s + m - 1)
    columns = jnp.sum(shifted, axis=2)  # B N S+m-1: column j = distance qp[:, 0] - j
    index = qp[:, :1] - jnp.arange(s, dtype=jnp.int32)[None, :]  # B S
    found = jnp.take_along_axis(columns, jnp.clip(index, 0, s + m - 2)[:, None, :], axis=-1)
    return jnp.where((index >= 0)[:, None, :], found, 0.0)


def _slash_by_scatter(probs: Float[Array, "B N Lq S"], qp: Int[Array, "B Lq"], kv_positions: Int[Array, "B S"]
                      ) -> Float[Array, "B N S"]:
    """Slash sums in general: each query-key pair's mass added at its distance."""
    b, n, _, s = probs.shape
    distance = jnp.clip(qp[:, None, :, None] - kv_positions[:, None, None, :], 0, s - 1) * jnp.ones_like(
        probs, jnp.int32)
    return jnp.zeros((b, n, s), jnp.float32).at[
        jnp.arange(b)[:, None, None, None], jnp.arange(n)[None, :, None, None], distance].add(probs)


def sparse_layout(
    q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], q_positions: Int[Array, "B T"],
    kv_positions: Int[Array, "B S"], kind: Int[Array, " N"], budget: Float[Array, " N"],
    budget2: Float[Array, " N"], *, spec: AttentionSpec = AttentionSpec(), block: int = 64,
    last_queries: int = 64, max_budget: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> PrefillIndex:
    """The index of each head's pattern (module docstring) for this prompt. T and S must be
    multiples of `block`; `max_budget` (static) bounds the vertical-slash heads' budget and
    budget2 and the block-sparse heads' budget (the top-k sizes)."""
    b, t, n, h = q.shape
    s = k.shape[1]
    tb, sb = t // block, s // block
    q_lo, q_hi = _block_ranges(q_positions, block)  # B Tb
    k_lo, k_hi = _block_ranges(kv_positions, block)  # B Sb
    ql, qh = q_lo[:, None, :, None], q_hi[:, None, :, None]
    kl, kh_ = k_lo[:, None, None, :], k_hi[:, None, None, :]
    valid = (qh >= 0) & (kh_ >= 0)
    causal = valid & (kl <= qh)
    if spec.window is not None:
        causal &= kh_ > ql - spec.window
    base = (kl < block) | (kh_ >= ql - block)  # the sink block and the local band

    # a_shape: a local window of budget * S tokens.
    window = jnp.ceil(budget * s).astype(jnp.int32)[None, :, None, None]
    a_shape = base | (kh_ >= ql - window)

    # vertical_slash from the last queries' attention.
    vertical_score, slash_score = _estimate_lines(q, k, q_positions, kv_positions, spec, last_queries)
    max_v, max_s = (min(s, math.ceil(m * s)) for m in max_budget[:2])
    is_lines = kind == VERTICAL_SLASH
    columns = _top_indices(jnp.where(kv_positions[:, None, :] >= 0, vertical_score, -jnp.inf),
                           jnp.where(is_lines, jnp.ceil(budget * s), 0).astype(jnp.int32), max_v)  # B N V
    distances = _top_set(slash_score, jnp.where(is_lines, jnp.ceil(budget2 * s), 0).astype(jnp.int32), max_s)
    running = jnp.concatenate([jnp.zeros((b, n, 1), jnp.int32), jnp.cumsum(distances, axis=-1, dtype=jnp.int32)],
                              axis=-1)  # B N S+1: distances below d
    near = jnp.clip(ql - kh_, 0, s)  # the smallest and largest distance between the blocks
    far = jnp.clip(qh - kl + 1, 0, s)
    near, far = (jnp.broadcast_to(x, (b, n, tb, sb)).reshape(b, n, tb * sb) for x in (near, far))
    slash_hits = (jnp.take_along_axis(running, far, axis=-1) - jnp.take_along_axis(running, near, axis=-1)) > 0
    vertical_slash = base | slash_hits.reshape(b, n, tb, sb)

    # block_sparse: mean-pooled queries and keys.
    block_sparse = base | _pooled_top_blocks(q, k, q_positions, kv_positions, causal, budget, spec, block,
                                             max_budget[2])

    per_kind = jnp.stack([a_shape, vertical_slash, block_sparse, jnp.ones_like(a_shape)])  # 4 B N Tb Sb
    chosen = jnp.take_along_axis(per_kind, kind[None, None, :, None, None].astype(jnp.int32), axis=0)[0]
    # The query blocks of the last queries attend densely: their scores were computed for the
    # estimate anyway, and the prompt's last token is the one generation continues from.
    last = jnp.max(q_positions, axis=1)[:, None, None, None] - last_queries  # B 1 1 1
    chosen |= qh > last
    return PrefillIndex(BlockSparseLayout.from_block_mask(chosen & causal, block, block), columns)


def _pooled_top_blocks(q: jax.Array, k: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
                       causal: Bool[Array, "B N Tb Sb"], budget: jax.Array, spec: AttentionSpec, block: int,
                       max_fraction: float) -> Bool[Array, "B N Tb Sb"]:
    """MInference's block-sparse index: the budget * Sb key blocks of highest pooled score."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]

    def pool(x: jax.Array, positions: jax.Array) -> jax.Array:
        weight = (positions >= 0).reshape(b, -1, block, 1, 1).astype(jnp.float32)
        blocks = x.reshape(b, -1, block, x.shape[2], h).astype(jnp.float32) * weight
        return jnp.sum(blocks, axis=2) / jnp.maximum(jnp.sum(weight, axis=2), 1.0)

    pq, pk = pool(q, q_positions), jnp.repeat(pool(k, kv_positions), n // kh, axis=2)  # B Tb N H, B Sb N H
    score = jnp.einsum("binh,bjnh->bnij", pq, pk) * spec.logit_scale(h)
    score = jnp.where(causal, score, -jnp.inf)
    sb = s // block
    max_count = min(sb, math.ceil(max_fraction * sb))
    count = jnp.ceil(budget * sb).astype(jnp.int32)
    tb = t // block
    return _top_set(score.reshape(b, n * tb, sb), jnp.repeat(count, tb), max_count).reshape(b, n, tb, sb)


def dense_keys(view: DenseView) -> tuple[jax.Array, jax.Array, jax.Array] | None:
    """(k, v [B, S, K, H], kv_positions [B, S]) of a dense view, or None where sparse prefill
    does not apply (per-head positions of an evicting cache)."""
    positions = slot_positions(view)
    if positions.ndim != 2:
        return None
    return (*view.kv("BSKH"), positions)


def _pad_to(x: jax.Array, multiple: int, value: float | int) -> jax.Array:
    extra = -x.shape[1] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _column_attention(q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"],
                      q_positions: Int[Array, "B T"], kv_positions: Int[Array, "B S"], index: PrefillIndex,
                      spec: AttentionSpec) -> tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """(out float32, lse) of each head's vertical-line columns, each left out for the query
    blocks whose listed key blocks already hold it (no key counted twice)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    block = index.layout.block_q
    columns = index.columns
    slot = jnp.clip(columns, 0, s - 1)  # B N V
    head = (jnp.arange(n) // (n // kh))[None, :, None]
    rows = jnp.arange(b)[:, None, None]
    keys, values = k[rows, slot, head], v[rows, slot, head]  # B N V H
    kp = jnp.where(columns >= 0, jnp.take_along_axis(kv_positions, slot.reshape(b, -1), axis=1).reshape(slot.shape),
                   -1)
    listed = jnp.take_along_axis(index.layout.block_mask(s // block), jnp.broadcast_to(
        (slot // block)[:, :, None, :], (b, n, t // block, slot.shape[-1])), axis=-1)  # B N Tb V
    fresh = ~jnp.repeat(listed, block, axis=2)  # B N T V
    seen = fresh & visible(q_positions[:, None, :, None], kp[:, :, None, :], None, None, causal=spec.causal,
                           window=spec.window)
    logits = jnp.einsum("btnh,bnvh->bntv", q, keys.astype(q.dtype), preferred_element_type=jnp.float32)
    logits = logits * spec.logit_scale(h)
    if spec.softcap is not None:
        logits = spec.softcap * jnp.tanh(logits / spec.softcap)
    logits = jnp.where(seen, logits, -jnp.inf)
    top = jnp.max(logits, axis=-1)
    safe = jnp.where(jnp.isfinite(top), top, 0.0)
    p = jnp.where(seen, jnp.exp(logits - safe[..., None]), 0.0)
    total = jnp.sum(p, axis=-1)
    out = jnp.einsum("bntv,bnvh->btnh", p.astype(q.dtype), values.astype(q.dtype), preferred_element_type=jnp.float32)
    out = out / jnp.swapaxes(jnp.where(total > 0, total, 1.0), 1, 2)[..., None]
    lse = jnp.where(total > 0, safe + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    return out, jnp.swapaxes(lse, 1, 2)


def _merge(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Attention over two disjoint key sets from each one's (out, lse)."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    weight = lambda x: jnp.where(jnp.isfinite(x), jnp.exp(x - safe), 0.0)[..., None]  # noqa: E731
    return out_a.astype(jnp.float32) * weight(lse_a) + out_b.astype(jnp.float32) * weight(lse_b)


def _reference(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
               index: PrefillIndex, spec: AttentionSpec) -> jax.Array:
    """The float32 oracle, head by head, its mask the keys the index covers."""
    from kernels_pallas.block_sparse_attention.reference import masked_attention_per_head

    vis = visible(q_positions[:, None, :, None], kv_positions[:, None, None, :], None, None, causal=spec.causal,
                  window=spec.window)  # B 1 T S
    covered = jnp.repeat(index.covered(k.shape[1]), index.layout.block_q, axis=2)  # B N T S
    out, _ = masked_attention_per_head(q, k, v, vis & covered, softcap=spec.softcap, scale=spec.scale)
    return out


def sparse_prefill_attention(
    q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"],
    q_positions: Int[Array, "B T"], kv_positions: Int[Array, "B S"], patterns: SparsePrefill,
    layer: int | Int[Array, ""], *, spec: AttentionSpec = AttentionSpec(),
    implementation: str | Sequence[str] | None = None, return_index: bool = False,
) -> Float[Array, "B T N H"] | tuple[Float[Array, "B T N H"], PrefillIndex]:
    """Attention of q over layer `layer`'s patterns (T and S padded to the block inside):
    the listed key blocks through the block-sparse primitive, merged with the vertical-line
    columns by log-sum-exp. implementation: "reference" runs the oracle over the same keys;
    anything else, the block-sparse primitive's default for the backend."""
    if patterns.num_heads != q.shape[2]:
        raise ValueError(f"sparse prefill patterns hold {patterns.num_heads} heads per layer, the model "
                         f"{q.shape[2]}")
    kind, budget, budget2 = (jnp.asarray(x)[layer] for x in patterns.table())
    t = q.shape[1]
    block = patterns.block
    qp = _pad_to(q_positions.astype(jnp.int32), block, -1)
    kp = _pad_to(kv_positions.astype(jnp.int32), block, -1)
    qx, kx, vx = _pad_to(q, block, 0), _pad_to(k, block, 0), _pad_to(v, block, 0)
    index = sparse_layout(qx, kx, qp, kp, kind, budget, budget2, spec=spec, block=block,
                          last_queries=patterns.last_queries, max_budget=patterns.max_budgets())
    names = (implementation,) if isinstance(implementation, str) else tuple(implementation or ())
    if names[:1] == ("reference",):
        out = _reference(qx, kx, vx, qp, kp, index, spec)
    else:
        blocks = block_sparse_attention(qx, kx, vx, index.layout, spec=spec, q_positions=qp, kv_positions=kp,
                                        return_lse=True)
        if index.columns.shape[-1]:
            out = _merge(blocks, _column_attention(qx, kx, vx, qp, kp, index, spec)).astype(q.dtype)
        else:
            out = blocks[0]
    out = out[:, :t].astype(q.dtype)
    return (out, index) if return_index else out


def set_sparse_prefill(model: object, patterns: SparsePrefill | None) -> object:
    """Attach (or, with None, remove) sparse prefill patterns to `model` (in place; returns it):
    its forward then prefills with them. The patterns must match the model's layers and heads."""
    from efficient.models.checks import check_model

    config = check_model(model, "set_sparse_prefill")
    if patterns is not None:
        if not isinstance(patterns, SparsePrefill):
            raise TypeError(f"patterns must be a SparsePrefill or None, got {type(patterns).__name__}")
        if (patterns.num_layers, patterns.num_heads) != (config.num_layers, config.num_heads):
            raise ValueError(f"patterns: {patterns.num_layers} layers x {patterns.num_heads} heads, but the model "
                             f"has {config.num_layers} x {config.num_heads}: they belong to another model")
    model.sparse_prefill = patterns
    return model
