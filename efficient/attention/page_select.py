"""Query-aware page selection for decoding: Quest (Tang et al. 2024, "Quest: Query-Aware
Sparsity for Efficient Long-Context LLM Inference").

The cache keeps, per page of P consecutive slots, the channel-wise minimum and maximum
of its keys. A query q bounds the logit of any key in page p from above by

    U(q, p) = sum_h max(q_h * min_h(p), q_h * max_h(p)),

so the pages with the largest bounds are the ones that can hold the largest logits.
`QuestView` is a dense cache's [B, K, S, H] view plus those bounds: attention over it
reads only the `top_pages` pages with the highest bound per (row, KV head), gathered,
instead of all S slots.

Choices this implementation makes (the paper has one head per KV head):
- GQA: one selection per KV head, shared by its G query heads and by the T queries of
  the call (tree verification), so the gather serves all of them at once; pages are
  ranked by the softmax weight each query head's bound allows, summed over them
  (`page_scores`), which for one head is Quest's own ranking. `per_query_head=True` is the
  paper's per-head selection instead: each query head reads its own `top_pages` pages
  (G times the keys and values read);
- the pages holding the call's own queries (the last T slots) are always selected
  (they hold the newest keys, whose page is partly filled), and so are the first
  `sink_pages` pages (attention sinks) and the `recent_pages` pages before the call's own;
- a call with more than `max_queries` queries (a prefill chunk) attends densely, as
  Quest prefills densely; so does a layer whose `sparse` flag is False (the paper keeps
  its first two layers dense).

What it loses: attention mass outside the selected pages (`attention_mass_kept`
measures it against dense attention).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def _static(default: object = dataclasses.MISSING) -> dataclasses.Field:
    return dataclasses.field(default=default, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuestView:
    """A dense [B, K, S, H] view (slot positions [B, S], row lengths [B]) with per-page key
    bounds page_min/page_max float32 [B, K, S/P, H] (0 for pages with no live slot), the
    number of pages to read `top_pages` (the always-read ones included), and `sparse` (a
    bool, or a traced bool scalar when the layer index is traced): whether this layer
    selects at all."""

    k: Float[Array, "B K S H"]
    v: Float[Array, "B K S H"]
    positions: Int[Array, "B S"]
    lengths: Int[Array, " B"]
    page_min: Float[Array, "B K Np H"]
    page_max: Float[Array, "B K Np H"]
    sparse: bool | Bool[Array, ""] = True
    page_size: int = _static(16)
    top_pages: int = _static(8)
    max_queries: int = _static(16)
    sink_pages: int = _static(0)
    recent_pages: int = _static(0)
    per_query_head: bool = _static(False)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def num_slots(self) -> int:  # S
        return self.k.shape[2]

    @property
    def num_kv_heads(self) -> int:  # K
        return self.k.shape[1]

    @property
    def head_dim(self) -> int:  # H
        return self.k.shape[3]

    @property
    def num_pages(self) -> int:  # Np
        return self.num_slots // self.page_size

    @property
    def dtype(self) -> jnp.dtype:
        return self.k.dtype

    def validate(self) -> None:
        b, kh, s, h = self.k.shape
        if self.v.shape != self.k.shape:
            raise ValueError(f"QuestView k and v must agree on [B, K, S, H], got {self.k.shape} and {self.v.shape}")
        for name, least in (("page_size", 1), ("top_pages", 1), ("max_queries", 1), ("sink_pages", 0),
                            ("recent_pages", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"QuestView.{name} must be an int >= {least}, got {value!r}")
        if s % self.page_size:
            raise ValueError(f"QuestView.page_size={self.page_size} must divide the {s} slots")
        if self.max_queries > self.page_size:
            raise ValueError(f"QuestView.max_queries={self.max_queries} must be <= page_size={self.page_size} "
                             "(the pages of a call's own queries are always read)")
        want = (b, kh, self.num_pages, h)
        for name in ("page_min", "page_max"):
            if tuple(getattr(self, name).shape) != want:
                raise ValueError(f"QuestView.{name} must have shape {want}, got {getattr(self, name).shape}")
        if tuple(self.positions.shape) != (b, s):
            raise ValueError(f"QuestView.positions must have shape {(b, s)}, got {self.positions.shape}")
        if tuple(self.lengths.shape) != (b,) or not jnp.issubdtype(self.lengths.dtype, jnp.integer):
            raise ValueError(f"QuestView.lengths must be integer [B={b}], got {self.lengths.dtype}{self.lengths.shape}")

    def dense(self):  # noqa: ANN201  (a DenseView; views.py imports this module)
        """The whole cache, as a dense view (what a dense layer or a long call reads)."""
        from efficient.attention.views import DenseView

        return DenseView(k=self.k, v=self.v, positions=self.positions, lengths=self.lengths, layout="BKSH")

    def selects(self, num_queries: int) -> bool:
        """Whether a call with `num_queries` queries reads fewer pages than all (static)."""
        return num_queries <= self.max_queries and self.top_pages < self.num_pages


def page_bounds(
    k: Float[Array, "B K S H"], live: Bool[Array, "B S"], page_size: int
) -> tuple[Float[Array, "B K Np H"], Float[Array, "B K Np H"]]:
    """Channel-wise min and max of the live keys of each page (0 where a page has none)."""
    b, kh, s, h = k.shape
    pages = k.astype(jnp.float32).reshape(b, kh, s // page_size, page_size, h)
    alive = live.reshape(b, 1, s // page_size, page_size, 1)
    lo = jnp.min(jnp.where(alive, pages, jnp.inf), axis=3)
    hi = jnp.max(jnp.where(alive, pages, -jnp.inf), axis=3)
    any_live = jnp.any(alive, axis=3)
    return jnp.where(any_live, lo, 0.0), jnp.where(any_live, hi, 0.0)


def logit_bounds(q: Float[Array, "B T N H"], view: QuestView, scale: float | None = None
                 ) -> Float[Array, "B K T G Np"]:
    """Quest's upper bound of the (scaled) logits of each query head in each page:
    sum_h max(q_h * min_h, q_h * max_h) * scale."""
    b, t, n, h = q.shape
    kh = view.num_kv_heads
    qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h) * (h**-0.5 if scale is None else scale)
    # max(q * lo, q * hi) = max(q, 0) * hi + min(q, 0) * lo, per channel: two dots.
    return (jnp.einsum("btkgh,bkph->bktgp", jnp.maximum(qg, 0.0), view.page_max)
            + jnp.einsum("btkgh,bkph->bktgp", jnp.minimum(qg, 0.0), view.page_min))


def page_scores(
    q: Float[Array, "B T N H"], view: QuestView, q_positions: Int[Array, "B T"] | None = None,
    scale: float | None = None,
) -> Float[Array, "B K Np"]:
    """Each page's score for the call: per query head, Quest's upper bound U of the page's
    logits (times the logit `scale`, default 1/sqrt(H)) turned into the softmax weight it
    bounds, exp(U - max over pages of U), summed over each KV head's G query heads and the T
    queries (padding queries, position -1, left out). For one query head this ranks pages
    exactly as Quest's bound does; summing weights rather than raw bounds gives each query
    head of a GQA group an equal voice. With `view.per_query_head`, [B, N, Np]: each query
    head's own scores. -inf for pages with no live slot, +inf for the pages that hold the
    call's queries (always read)."""
    t, p = q.shape[1], view.page_size
    bound = logit_bounds(q, view, scale)
    page = jnp.arange(view.num_pages, dtype=jnp.int32)[None, :]
    lengths = view.lengths.astype(jnp.int32)[:, None]
    live = page * p < lengths  # B Np
    bound = jnp.where(live[:, None, None, None], bound, -jnp.inf)
    top = jnp.max(bound, axis=-1, keepdims=True)
    weight = jnp.exp(bound - jnp.where(jnp.isfinite(top), top, 0.0))
    if q_positions is not None:
        weight = jnp.where((q_positions >= 0)[:, None, :, None, None], weight, 0.0)
    if view.per_query_head:  # B K G Np -> B N Np: each query head ranks its own pages
        score = jnp.sum(weight, axis=2).reshape(weight.shape[0], -1, weight.shape[-1])
    else:
        score = jnp.sum(weight, axis=(2, 3))
    first_own = (lengths - t) // p
    own = (page >= first_own - view.recent_pages) & (page <= (lengths - 1) // p)
    own = (own | (page < view.sink_pages)) & live
    return jnp.where(own[:, None, :], jnp.inf, jnp.where(live[:, None, :], score, -jnp.inf))


def select_pages(
    q: Float[Array, "B T N H"], view: QuestView, q_positions: Int[Array, "B T"] | None = None,
    scale: float | None = None,
) -> Int[Array, "B K k"]:
    """The `top_pages` pages with the highest `page_scores` per (row, KV head), in slot order."""
    _, index = jax.lax.top_k(page_scores(q, view, q_positions, scale), view.top_pages)
    return jnp.sort(index, axis=-1).astype(jnp.int32)


def _page_slots(pages: Int[Array, "B K k"], page_size: int) -> Int[Array, "B K kP"]:
    """The slots of the selected pages, page by page: [B, K, k * P]."""
    b, heads, n = pages.shape
    return (pages[..., None] * page_size + jnp.arange(page_size, dtype=jnp.int32)).reshape(b, heads, n * page_size)


def gather_pages(view: QuestView, pages: Int[Array, "B K k"] | Int[Array, "B N k"]):  # noqa: ANN201  (a DenseView)
    """The selected pages as a dense [B, K, k*P, H] view with per-KV-head positions
    [B, K, k*P] (-1 for slots past a row's length or of a page with no live slot, whose
    keys and values are zeroed so that nothing stored there can reach the output). Pages
    chosen per query head ([B, N, k]) give [B, N, k*P, H]: query head i reads its own pages
    of KV head i // G, one "KV head" per query head."""
    from efficient.attention.views import DenseView

    b, kh, s, h = view.k.shape
    heads, p, n = pages.shape[1], view.page_size, pages.shape[-1]
    source = jnp.arange(heads, dtype=jnp.int32) // (heads // kh)  # the KV head each row of pages reads
    rows = jnp.arange(b, dtype=jnp.int32)[:, None, None]

    def take(x: jax.Array) -> jax.Array:
        if heads == kh:
            paged = x.reshape(b, kh, s // p, p, h)
            return jnp.take_along_axis(paged, pages[..., None, None], axis=2).reshape(b, kh, n * p, h)
        return x.reshape(b, kh, s // p, p, h)[rows, source[None, :, None], pages].reshape(b, heads, n * p, h)

    slot = _page_slots(pages, p)
    positions = jnp.take_along_axis(jnp.broadcast_to(view.positions[:, None], (b, heads, s)), slot, axis=2)
    positions = jnp.where(slot < view.lengths[:, None, None], positions, -1).astype(jnp.int32)
    live = (positions >= 0)[..., None]
    zero = jnp.zeros((), view.k.dtype)
    return DenseView(k=jnp.where(live, take(view.k), zero), v=jnp.where(live, take(view.v), zero),
                     positions=positions, layout="BKSH")


def _gather_slots(x: jax.Array, view: QuestView, pages: Int[Array, "B K k"]) -> jax.Array:
    """x [B, T, S] (a mask or, T absent, [B, S] segment ids) at each head's selected
    slots: [B, K, T, k*P] (or [B, K, k*P]; N for pages chosen per query head)."""
    b, kh, n = pages.shape
    p = view.page_size
    slot = _page_slots(pages, p)
    if x.ndim == 2:
        return jnp.take_along_axis(jnp.broadcast_to(x[:, None], (b, kh, x.shape[1])), slot, axis=2)
    t = x.shape[1]
    wide = jnp.broadcast_to(x[:, None], (b, kh, t, x.shape[2]))
    return jnp.take_along_axis(wide, jnp.broadcast_to(slot[:, :, None], (b, kh, t, n * p)), axis=3)


def quest_attention(q: Float[Array, "B T N H"], view: QuestView, call, *, q_positions, mask, kv_segment_ids,  # noqa: ANN001, ANN201
                    scale: float | None = None):
    """Attention over a `QuestView` through `call(q, dense_view, mask, kv_segment_ids)` (an
    implementation over dense views): over the whole cache where the view does not select,
    else over the selected pages (ranked with the logit `scale`, the spec's). A mask or key
    segment ids over the S logical slots (a draft tree's) are gathered with the pages, and
    the call then runs once per KV head."""
    def dense(q: jax.Array):  # noqa: ANN202
        return call(q, view.dense(), mask, kv_segment_ids)

    def sparse(q: jax.Array):  # noqa: ANN202
        pages = select_pages(q, view, q_positions, scale)
        selected = gather_pages(view, pages)
        if mask is None and kv_segment_ids is None:
            return call(q, selected, None, None)
        b, t, n, h = q.shape
        kh = pages.shape[1]  # K, or N when each query head chose its own pages
        per_head_q = jnp.moveaxis(q.reshape(b, t, kh, n // kh, h), 2, 0)  # K B T G H
        head_mask = None if mask is None else jnp.moveaxis(_gather_slots(mask, view, pages), 1, 0)
        head_seg = None if kv_segment_ids is None else jnp.moveaxis(_gather_slots(kv_segment_ids, view, pages), 1, 0)

        def one_head(qk, k, v, pos, m, seg):  # noqa: ANN001, ANN202
            head = dataclasses.replace(selected, k=k[:, None], v=v[:, None], positions=pos)
            return call(qk, head, m, seg)

        outs = jax.vmap(one_head, in_axes=(0, 1, 1, 1, 0, 0))(
            per_head_q, selected.k, selected.v, selected.positions, head_mask, head_seg)
        # outs: [K, B, T, G, H] (and lse [K, B, T, G]) back to [B, T, N, ...]
        def merge(x: jax.Array) -> jax.Array:
            x = jnp.moveaxis(x, 0, 2)
            return x.reshape(b, t, n, *x.shape[4:])
        return jax.tree_util.tree_map(merge, outs)

    if not view.selects(q.shape[1]):
        return dense(q)
    if isinstance(view.sparse, bool):
        return sparse(q) if view.sparse else dense(q)
    return jax.lax.cond(view.sparse, sparse, dense, q)


def attention_mass_kept(
    q: Float[Array, "B T N H"], view: QuestView, *, spec=None, q_positions: Int[Array, "B T"] | None = None  # noqa: ANN001
) -> Float[Array, "B K T"]:
    """What the selection loses, measured: the fraction of dense attention mass (summed over
    each KV head's G query heads) that falls in the selected pages, per (row, KV head, query)
    ([B, N, T], per query head, when each query head chooses its own pages)."""
    from efficient.attention.dispatcher import attention
    from efficient.attention.spec import AttentionSpec, KeyStats

    spec = spec or AttentionSpec()
    seen = view.dense()
    if view.per_query_head:  # one "KV head" per query head: each head's own mass, [B, N, T, S]
        g = q.shape[2] // view.num_kv_heads
        seen = dataclasses.replace(seen, k=jnp.repeat(view.k, g, axis=1), v=jnp.repeat(view.v, g, axis=1))
    _, mass = attention(q, seen, spec=spec, q_positions=q_positions,
                        key_stats=KeyStats(per_kv_head=True, per_query=True), implementation="xla")
    pages = select_pages(q, view, q_positions, spec.logit_scale(view.head_dim))
    b, heads, t, s = mass.shape
    chosen = jnp.zeros((b, heads, view.num_pages), bool).at[
        jnp.arange(b)[:, None, None], jnp.arange(heads)[None, :, None], pages].set(True)
    chosen = jnp.repeat(chosen, view.page_size, axis=2)[:, :, None, :]  # B K 1 S
    total = jnp.sum(mass, axis=-1)
    return jnp.where(total > 0, jnp.sum(jnp.where(chosen, mass, 0.0), axis=-1) / jnp.where(total > 0, total, 1.0),
                     1.0)
