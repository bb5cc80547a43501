"""A paged KV cache with prefix sharing (PagedAttention, Kwon et al. 2023), in pure JAX.

Keys and values live in a pool of M pages of P slots, [L, M, P, K, H]; row b's
logical slot s (the s-th token appended to it, as in the dense cache) is slot
s % P of page `page_table[b, s // P]`. A page is allocated when a row first
writes into it and released when `truncate` drops every slot of it, so memory
follows the tokens held, not the capacity reserved.

Rows may share pages: `fork(source_rows)` makes each new row a copy-on-write
fork of a source row (N requests behind one system prompt share its pages, each
counted once by `used_nbytes`). `refcounts[m]` counts the rows whose page table
holds page m (0: free). `reserve` gives a row its own copy of a shared page
before its first write into it (copy on write) and takes new pages from the
free ones; all of it is array arithmetic inside jit (a page's rank among the
free ones is a cumulative sum), nothing reallocates.

If the free pages run out inside jit (a pool given fewer pages than its rows
could need, `oversubscribe=True`), the pages that could not be allocated are
not written and `exhausted` turns True and stays True: check it after a call
(nothing is silently lost without this flag saying so). The default pool holds
every row at full capacity and cannot run out.

`view` is a `PagedView` (the pool of one layer, the page table and the lengths):
attention reads the pages in place through the table.
"""

from __future__ import annotations

import dataclasses
from typing import Self

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from efficient.attention.views import PagedView, slot_positions
from efficient.cache.dense import (
    _floating_dtype,
    _from_storage,
    _storage_dtype,
    _to_storage,
    positions_after,
    positive_int,
)
from efficient.cache.layer_fields import PerLayerFields
from efficient.cache.protocol import tree_nbytes

NO_PAGE = -1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache(PerLayerFields):
    """Pool k/v [L, M, P, K, H] (a tuple of L [M, P, K, H] buffers after `split_layers`),
    positions per pool slot [M, P] (-1 never written), page table [B, R] (NO_PAGE:
    unallocated), reference counts [M], lengths [B] and the sticky `exhausted` flag.
    Capacity per row is R * P logical slots."""

    k_pages: Float[Array, "L M P K H"]
    v_pages: Float[Array, "L M P K H"]
    page_positions: Int[Array, "M P"]
    page_table: Int[Array, "B R"]
    refcounts: Int[Array, " M"]
    lengths: Int[Array, " B"]
    exhausted: Bool[Array, ""]
    dtype_name: str = dataclasses.field(default="float32", metadata=dict(static=True))

    @classmethod
    def init(
        cls,
        *,
        num_layers: int,
        batch_size: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int = 16,
        num_pages: int | None = None,
        oversubscribe: bool = False,
        dtype: jnp.dtype | str = jnp.float32,
    ) -> PagedKVCache:
        """Rows of `capacity` logical slots (a multiple of `page_size`) over a pool of
        `num_pages` pages (default: every row at full capacity). A smaller pool, for rows
        that will share prefixes, needs `oversubscribe=True`."""
        caller = "PagedKVCache.init"
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("capacity", capacity),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("page_size", page_size)):
            positive_int(value, name, caller)
        if capacity % page_size:
            raise ValueError(f"{caller}: page_size={page_size} must divide capacity={capacity} "
                             f"(round the capacity up to {-(-capacity // page_size) * page_size})")
        pages_per_row = capacity // page_size
        needed = batch_size * pages_per_row
        if num_pages is None:
            num_pages = needed
        positive_int(num_pages, "num_pages", caller)
        if num_pages < needed and not oversubscribe:
            raise ValueError(f"{caller}: num_pages={num_pages} is too small for the batch: {batch_size} rows of "
                             f"capacity {capacity} need up to {needed} pages of {page_size}; pass more pages, or "
                             "oversubscribe=True for rows that share a prefix (then check `exhausted`)")
        if num_pages < pages_per_row:
            raise ValueError(f"{caller}: num_pages={num_pages} cannot hold one row at capacity {capacity} "
                             f"({pages_per_row} pages of {page_size})")
        dtype = _floating_dtype(dtype, caller)
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        return cls(
            k_pages=jnp.zeros(shape, _storage_dtype(dtype)),
            v_pages=jnp.zeros(shape, _storage_dtype(dtype)),
            page_positions=jnp.full((num_pages, page_size), -1, jnp.int32),
            page_table=jnp.full((batch_size, pages_per_row), NO_PAGE, jnp.int32),
            refcounts=jnp.zeros((num_pages,), jnp.int32),
            lengths=jnp.zeros((batch_size,), jnp.int32),
            exhausted=jnp.zeros((), jnp.bool_),
            dtype_name=dtype.name,
        )

    @classmethod
    def for_model(cls, config, batch_size: int, capacity: int, dtype=None, *,  # noqa: ANN001
                  page_size: int = 16, num_pages: int | None = None, oversubscribe: bool = False) -> PagedKVCache:
        """A cache shaped for `config`; the capacity is rounded up to a page multiple."""
        positive_int(page_size, "page_size", "PagedKVCache.for_model")
        return cls.init(num_layers=config.num_layers, batch_size=batch_size,
                        capacity=-(-capacity // page_size) * page_size, num_kv_heads=config.num_kv_heads,
                        head_dim=config.head_dim, page_size=page_size, num_pages=num_pages,
                        oversubscribe=oversubscribe, dtype=dtype or config.dtype)

    # ------------------------------------------------------------ shapes
    @property
    def batch_size(self) -> int:
        return self.page_table.shape[0]

    @property
    def layer_fields(self) -> tuple[str, ...]:
        return ("k_pages", "v_pages")

    @property
    def num_layers(self) -> int:
        return self._layer_shape("k_pages")[0]

    @property
    def num_pages(self) -> int:  # M
        return self._layer_shape("k_pages")[1]

    @property
    def page_size(self) -> int:  # P
        return self._layer_shape("k_pages")[2]

    @property
    def num_kv_heads(self) -> int:
        return self._layer_shape("k_pages")[3]

    @property
    def head_dim(self) -> int:
        return self._layer_shape("k_pages")[4]

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype_name)

    @property
    def capacity(self) -> int:  # R * P
        return self.page_table.shape[1] * self.page_size

    # ---------------------------------------------------------- internals
    def _page_and_offset(self, slots: Int[Array, "B T"]) -> tuple[Int[Array, "B T"], Int[Array, "B T"]]:
        """Pool page and offset of logical `slots`; M (a dropped write) past the capacity
        or for an unallocated page."""
        p, r = self.page_size, self.page_table.shape[1]
        index = jnp.clip(slots // p, 0, r - 1)
        page = jnp.take_along_axis(self.page_table, index, axis=1)
        page = jnp.where((slots >= 0) & (slots < self.capacity) & (page != NO_PAGE), page, self.num_pages)
        return page, slots % p

    def _release(self, drop: Bool[Array, "B R"]) -> Self:
        """Unmap the pages where `drop` (refcount - 1 each; a page at 0 is free again)."""
        held = drop & (self.page_table != NO_PAGE)
        refcounts = self.refcounts.at[jnp.where(held, self.page_table, self.num_pages)].add(-1, mode="drop")
        return dataclasses.replace(self, refcounts=refcounts, page_table=jnp.where(held, NO_PAGE, self.page_table))

    def _allocate(self, first: Int[Array, " B"], wanted: Bool[Array, "B W"]) -> Self:
        """Give page-table entries first[b] + w (where `wanted`) a fresh page of their own: an
        unmapped entry gets an empty page, a shared one a copy of its page (copy on write).
        Entries that find no free page are unmapped and set `exhausted`. Only the W entries a
        forward touches are looked at, so a decode step copies at most one page per row."""
        m, r = self.num_pages, self.page_table.shape[1]
        b, w = wanted.shape
        index = first[:, None] + jnp.arange(w, dtype=jnp.int32)[None, :]
        wanted = wanted & (index < r)
        index = jnp.minimum(index, r - 1)
        old = jnp.take_along_axis(self.page_table, index, axis=1)
        shared = (old != NO_PAGE) & (self.refcounts[jnp.maximum(old, 0)] > 1)
        need = wanted & ((old == NO_PAGE) | shared)
        flat_need = need.reshape(-1)
        rank = jnp.cumsum(flat_need) - 1
        free = jnp.nonzero(self.refcounts == 0, size=m, fill_value=m)[0]
        got = (flat_need & (rank < jnp.sum(self.refcounts == 0))).reshape(need.shape)
        new = jnp.where(got, free[jnp.clip(rank, 0, m - 1)].reshape(need.shape), m)  # m: none
        failed = need & ~got
        # Pages the row leaves (shared ones, copied or not) lose one reference.
        refcounts = self.refcounts.at[jnp.where(need & (old != NO_PAGE), old, m)].add(-1, mode="drop")
        refcounts = refcounts.at[new].set(1, mode="drop")
        # Copy on write: the new page starts as the shared one (all layers, positions).
        copy_from = jnp.where(got & shared, old, 0).reshape(-1)
        copy_to = jnp.where(got & shared, new, m).reshape(-1)
        copy = lambda x, lead: x.at[(*lead, copy_to)].set(x[(*lead, copy_from)], mode="drop")  # noqa: E731
        k_pages, v_pages = self._per_layer_map("k_pages", copy), self._per_layer_map("v_pages", copy)
        page_positions = self.page_positions.at[copy_to].set(self.page_positions[copy_from], mode="drop")
        entries = jnp.where(need, jnp.where(got, new, NO_PAGE), old)
        rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, w))
        table = self.page_table.at[rows, jnp.where(wanted, index, r)].set(entries, mode="drop")
        return dataclasses.replace(
            self, k_pages=k_pages, v_pages=v_pages, page_positions=page_positions, page_table=table,
            refcounts=refcounts, exhausted=self.exhausted | jnp.any(failed))

    def _logical_positions(self) -> Int[Array, "B S"]:
        return slot_positions(self._paged_view(self._stored("k_pages", 0), self._stored("v_pages", 0)))

    def _paged_view(self, k: jax.Array, v: jax.Array) -> PagedView:
        return PagedView(k_pages=k, v_pages=v, page_table=jnp.maximum(self.page_table, 0),
                         positions=self.page_positions, lengths=self.lengths)

    # ----------------------------------------------------------- protocol
    def next_positions(self, num_tokens: int) -> Int[Array, "B T"]:
        """Positions following the last one held in each row."""
        return positions_after(jnp.max(self._logical_positions(), axis=1), num_tokens)

    def reserve(self, positions: Int[Array, "B T"]) -> tuple[Self, Int[Array, "B T"]]:
        """Take the next T logical slots of every row, mapping pages for them (fresh pages,
        or a private copy of a shared page); slots past the capacity are dropped."""
        b, t = positions.shape
        p = self.page_size
        slots = self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        first = self.lengths // p  # the page-table entries t tokens touch: first .. first + W - 1
        touched = first[:, None] + jnp.arange((t + p - 2) // p + 1, dtype=jnp.int32)[None, :]
        end = jnp.minimum(self.lengths + t, self.capacity)
        cache = self._allocate(first, touched * p < end[:, None])
        page, offset = cache._page_and_offset(slots)
        page_positions = cache.page_positions.at[page, offset].set(positions.astype(jnp.int32), mode="drop")
        return dataclasses.replace(cache, page_positions=page_positions, lengths=self.lengths + t), slots

    def update(
        self, layer: int, k: Float[Array, "B T K H"], v: Float[Array, "B T K H"], slots: Int[Array, "B T"]
    ) -> Self:
        """Write k/v [B, T, K, H] of layer `layer` (an int or traced index) at logical `slots`
        (their pages were mapped by `reserve`; slots past the capacity are dropped)."""
        page, offset = self._page_and_offset(slots)
        heads = jnp.arange(self.num_kv_heads, dtype=jnp.int32)[None, None, :]
        index = (page[:, :, None], offset[:, :, None], heads)
        new_k = self._set("k_pages", layer, index, _to_storage(k, self.dtype))
        new_v = self._set("v_pages", layer, index, _to_storage(v, self.dtype))
        return dataclasses.replace(self, k_pages=new_k, v_pages=new_v)

    def view(self, layer: int | Int[Array, ""], window: int | None = None) -> PagedView:
        """Layer `layer`'s pool, read in place through the page table (any window)."""
        del window
        return self._paged_view(_from_storage(self._stored("k_pages", layer), self.dtype),
                                _from_storage(self._stored("v_pages", layer), self.dtype))

    def truncate(self, lengths: Int[Array, " B"]) -> Self:
        """Keep the first `lengths[b]` slots of each row (never grows one) and release the
        pages past them."""
        lengths = jnp.minimum(jnp.asarray(lengths, jnp.int32), self.lengths)
        index = jnp.arange(self.page_table.shape[1], dtype=jnp.int32)[None, :] * self.page_size
        cache = self._release(index >= lengths[:, None])
        return dataclasses.replace(cache, lengths=lengths)

    def select(
        self, source_slots: Int[Array, "B C"], counts: Int[Array, " B"], start: Int[Array, " B"]
    ) -> Self:
        """Move `counts[b]` slots `source_slots[b, :counts[b]]` to `start[b] + i` (across page
        boundaries), then truncate the row there (compacts an accepted tree path). The
        destination slots lie in pages the row wrote this step, so none is shared."""
        b, c = source_slots.shape
        valid = jnp.arange(c, dtype=jnp.int32)[None, :] < counts[:, None]
        dest = jnp.where(valid, start[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :], self.capacity)
        src_page, src_off = self._page_and_offset(source_slots)
        dst_page, dst_off = self._page_and_offset(dest)
        src_page = jnp.minimum(src_page, self.num_pages - 1)
        move = lambda x, lead: x.at[(*lead, dst_page, dst_off)].set(x[(*lead, src_page, src_off)],  # noqa: E731
                                                                  mode="drop")
        k, v = self._per_layer_map("k_pages", move), self._per_layer_map("v_pages", move)
        positions = self.page_positions.at[dst_page, dst_off].set(self.page_positions[src_page, src_off],
                                                                  mode="drop")
        moved = dataclasses.replace(self, k_pages=k, v_pages=v, page_positions=positions)
        return moved.truncate(start + counts)

    def nbytes(self) -> int:
        """Bytes held: the whole pool and its tables (allocated up front)."""
        return tree_nbytes(self)

    # ------------------------------------------------------ paging extras
    def fork(self, source_rows: Int[Array, " N"]) -> PagedKVCache:
        """A cache of N rows over the same pool, row i a copy-on-write fork of row
        `source_rows[i]`: it maps the same pages (one more reference each) and has the same
        length. Prefill a shared prompt once in a one-row cache, then fork it N times."""
        source_rows = jnp.asarray(source_rows, jnp.int32)
        if source_rows.ndim != 1 or source_rows.shape[0] < 1:
            raise ValueError(f"PagedKVCache.fork: source_rows must be a non-empty int vector [N], got shape "
                             f"{tuple(source_rows.shape)}")
        table = self.page_table[source_rows]
        held = table != NO_PAGE
        # The forks' references replace the sources' (a source row not forked lets go).
        refcounts = self.refcounts.at[jnp.where(self.page_table != NO_PAGE, self.page_table, self.num_pages)].add(
            -1, mode="drop")
        refcounts = refcounts.at[jnp.where(held, table, self.num_pages)].add(1, mode="drop")
        return dataclasses.replace(self, page_table=table, refcounts=refcounts, lengths=self.lengths[source_rows])

    def pages_in_use(self) -> Int[Array, ""]:
        return jnp.sum(self.refcounts > 0)

    def used_nbytes(self) -> int:
        """Bytes of the pages in use (a shared page counted once), plus the tables: the
        memory a pool sized to the current contents would need."""
        page_bytes = (tree_nbytes((self.k_pages, self.v_pages)) + self.page_positions.nbytes) // self.num_pages
        tables = self.page_table.nbytes + self.refcounts.nbytes + self.lengths.nbytes
        return int(np.asarray(self.pages_in_use())) * page_bytes + tables
