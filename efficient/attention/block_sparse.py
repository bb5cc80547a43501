"""Block-sparse attention: each (row, query head, query block) attends to a list of key blocks.

The primitive under the sparse-attention methods (MInference's vertical-slash and
block-sparse patterns, Quest's page selection, ...): queries are cut into blocks of
`block_q`, keys into blocks of `block_k`, and `BlockSparseLayout` lists, for every (row,
query head, query block), the key blocks it reads (`index`, the first `count` entries
valid). Inside the listed blocks the usual masking rule applies (positions: causal, window;
segment ids; efficient.attention.spec), so a listed block that is partly in the future is
masked as the dense path would mask it, and listing every block gives dense attention.

The xla implementation really skips work: one query block at a time (`lax.map`), it walks
that block's lists in steps of c whole listed blocks (at most KEY_CHUNK keys, fewer for short
lists), gathering only those
key blocks of each head ([B, N, c * block_k, H]) and merging them with an online softmax;
the step count is set by the longest list of that query block, so at most c - 1 entries past
a list's end are gathered per step (masked, their values zeroed) and unlisted blocks are never
read otherwise. Time grows with the listed blocks, temporary memory with one step. Lists hold
distinct blocks (a repeated block would count twice); count <= M.
GQA: query head n reads KV head n // G. Fully masked queries (nothing listed, or nothing
visible) return zeros and log-sum-exp -inf, never NaN. Forward only (the inner loop has a
data-dependent trip count).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from efficient.attention.spec import AttentionSpec, default_positions
from kernels_pallas.block_sparse_attention.reference import listed_blocks

KEY_CHUNK = 512  # keys per online-softmax step at most (whole listed blocks), as the dense blockwise path
LIST_STEPS = 8  # measured at 8k, 11% density, 64-blocks: 2 blocks per step 145 ms, 8 blocks 156 ms


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSparseLayout:
    """Key blocks listed per (row b, query head n, query block i): index [B, N, Tb, M] int32
    (distinct blocks; entries past count are ignored), count [B, N, Tb] int32 <= M."""

    index: Int[Array, "B N Tb M"]
    count: Int[Array, "B N Tb"]
    block_q: int = dataclasses.field(default=64, metadata=dict(static=True))
    block_k: int = dataclasses.field(default=64, metadata=dict(static=True))

    @classmethod
    def from_block_mask(cls, block_mask: Bool[Array, "B N Tb Sb"], block_q: int, block_k: int,
                        max_blocks: int | None = None) -> BlockSparseLayout:
        """The layout listing the True blocks of `block_mask`, in ascending order; M is
        `max_blocks` (at least the largest count; default Sb)."""
        _check_block("block_q", block_q)
        _check_block("block_k", block_k)
        if block_mask.ndim != 4 or block_mask.dtype != jnp.bool_:
            raise ValueError(f"block_mask must be bool [B, N, Tb, Sb], got {block_mask.dtype}{tuple(block_mask.shape)}")
        sb = block_mask.shape[-1]
        m = sb if max_blocks is None else max_blocks
        if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= sb:
            raise ValueError(f"max_blocks must be an int in [1, Sb={sb}], got {max_blocks!r}")
        count = jnp.sum(block_mask, axis=-1, dtype=jnp.int32)
        if not isinstance(count, jax.core.Tracer) and int(jnp.max(count)) > m:
            raise ValueError(f"max_blocks={m} is below the {int(jnp.max(count))} blocks the mask lists for one "
                             "query block")
        index = jnp.argsort(~block_mask, axis=-1, stable=True)[..., :m].astype(jnp.int32)
        return cls(index=index, count=jnp.minimum(count, m), block_q=block_q, block_k=block_k)

    @classmethod
    def dense(cls, batch: int, heads: int, t: int, s: int, block_q: int, block_k: int) -> BlockSparseLayout:
        """Every key block listed for every query block (dense attention)."""
        _check_divides("block_q", block_q, "T", t)
        _check_divides("block_k", block_k, "S", s)
        return cls.from_block_mask(jnp.ones((batch, heads, t // block_q, s // block_k), jnp.bool_), block_q, block_k)

    def block_mask(self, num_key_blocks: int) -> Bool[Array, "B N Tb Sb"]:
        """The listed blocks as a boolean [B, N, Tb, Sb] mask."""
        return listed_blocks(self.index, self.count, num_key_blocks)

    def density(self, num_key_blocks: int) -> Float[Array, ""]:
        """Listed blocks over all blocks (not counting what the causal rule masks inside them)."""
        return jnp.sum(self.count) / (self.count.size * num_key_blocks)


def _check_block(name: str, size: object) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"{name} must be a positive int, got {size!r}")


def _check_divides(name: str, size: int, axis: str, length: int) -> None:
    _check_block(name, size)
    if length % size:
        raise ValueError(f"{name}={size} does not divide {axis}={length}; pad the sequence to a multiple of it")


def block_sparse_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    layout: BlockSparseLayout,
    *,
    spec: AttentionSpec = AttentionSpec(),
    q_positions: Int[Array, "B T"] | None = None,
    kv_positions: Int[Array, "B S"] | None = None,
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
    interpret: object = False,
) -> Float[Array, "B T N H"] | tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """Attention of q over the key blocks `layout` lists (module docstring): out [B, T, N, H]
    in q's dtype and, with `return_lse`, the float32 log-sum-exp [B, T, N]. implementation:
    "xla" (matmuls in the input dtype, float32 accumulation, as the "xla" attention) or
    "pallas_tpu" (kernels_pallas/block_sparse_attention: skips the DMA of unlisted blocks;
    no segment ids; `interpret` for CPU tests); None: "pallas_tpu" on a TPU, else "xla"."""
    if implementation is None:
        implementation = "pallas_tpu" if jax.default_backend() == "tpu" and q_segment_ids is None else "xla"
    if implementation not in ("xla", "pallas_tpu"):
        raise ValueError(f"implementation must be 'xla', 'pallas_tpu' or None, got {implementation!r}")
    if implementation == "pallas_tpu":
        if q_segment_ids is not None or kv_segment_ids is not None:
            raise ValueError("implementation='pallas_tpu' does not serve segment ids; use 'xla'")
        from kernels_pallas.block_sparse_attention import block_sparse_attention as kernel

        return kernel(q, k, v, layout.index, layout.count, block_q=layout.block_q, block_k=layout.block_k,
                      q_positions=q_positions, kv_positions=kv_positions, causal=spec.causal, window=spec.window,
                      softcap=spec.softcap, scale=spec.scale, return_lse=return_lse, interpret=interpret)
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if k.shape != (b, s, kh, h) or v.shape != k.shape:
        raise ValueError(f"k and v must be [B={b}, S, K, H={h}] and equal, got {tuple(k.shape)} and {tuple(v.shape)}")
    if n % kh:
        raise ValueError(f"query heads N={n} must be a multiple of KV heads K={kh}")
    bq, bk = layout.block_q, layout.block_k
    _check_divides("block_q", bq, "T", t)
    _check_divides("block_k", bk, "S", s)
    tb, sb = t // bq, s // bk
    m = layout.index.shape[-1]
    if tuple(layout.index.shape) != (b, n, tb, m) or tuple(layout.count.shape) != (b, n, tb):
        raise ValueError(f"layout.index must be [B, N, T/block_q, M] = {(b, n, tb, 'M')} and layout.count "
                         f"{(b, n, tb)}, got {tuple(layout.index.shape)} and {tuple(layout.count.shape)}")
    for name, x in (("layout.index", layout.index), ("layout.count", layout.count)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be integer, got {x.dtype}")
    if m < 1:
        raise ValueError("layout.index must list at least one entry per query block (M >= 1)")
    if not isinstance(layout.count, jax.core.Tracer) and layout.count.size and int(jnp.max(layout.count)) > m:
        raise ValueError(f"layout.count={int(jnp.max(layout.count))} exceeds the M={m} entries of layout.index")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    if q_positions is None or kv_positions is None:
        dq, dk = default_positions(b, t, s)
        q_positions = dq if q_positions is None else q_positions
        kv_positions = dk if kv_positions is None else kv_positions

    g = n // kh
    scale = spec.logit_scale(h)
    # Listed blocks per inner step: at most KEY_CHUNK keys, and about LIST_STEPS steps for the
    # longest list, so short lists (sparse layouts) waste little on a last, partly empty step.
    c = max(1, min(m, KEY_CHUNK // bk, -(-m // LIST_STEPS)))
    chunks = -(-m // c)
    pad = chunks * c - m
    index = jnp.pad(layout.index.astype(jnp.int32), ((0, 0), (0, 0), (0, 0), (0, pad)))
    # K/V per KV head as contiguous [block_k, H] slabs: a listed block is one slab to gather.
    k_blocks = jnp.transpose(k.reshape(b, sb, bk, kh, h), (0, 3, 1, 2, 4))  # B K Sb bk H
    v_blocks = jnp.transpose(v.reshape(b, sb, bk, kh, h), (0, 3, 1, 2, 4))
    kv_pos = kv_positions.astype(jnp.int32).reshape(b, sb, bk)
    kv_seg = None if kv_segment_ids is None else kv_segment_ids.reshape(b, sb, bk)
    rows = jnp.arange(b)[:, None, None]
    heads = (jnp.arange(n) // g)[None, :, None]
    per_block = lambda x: jnp.moveaxis(x.reshape(b, tb, bq, *x.shape[2:]), 1, 0)  # noqa: E731  Tb B bq ...
    xs = dict(q=per_block(q), pos=per_block(q_positions.astype(jnp.int32)), index=jnp.moveaxis(index, 2, 0),
              count=jnp.moveaxis(jnp.clip(layout.count.astype(jnp.int32), 0, m), 2, 0))
    if q_segment_ids is not None:
        xs["seg"] = per_block(q_segment_ids)

    def one_query_block(x: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        qp = x["pos"][:, None, :, None]  # B 1 bq 1

        def step(j: jax.Array, acc: tuple[jax.Array, jax.Array, jax.Array]) -> tuple:
            """Online softmax over listed blocks j*c .. j*c + c - 1 of every head."""
            out, run_max, run_sum = acc  # B N bq H, B N bq, B N bq
            slot = j * c + jnp.arange(c)
            index = jnp.clip(jax.lax.dynamic_slice_in_dim(x["index"], j * c, c, axis=2), 0, sb - 1)  # B N c
            keys = k_blocks[rows, heads, index].reshape(b, n, c * bk, h)
            kp = kv_pos[rows, index].reshape(b, n, 1, c * bk)
            listed = jnp.repeat(slot[None, None, :] < x["count"][..., None], bk, axis=2)[:, :, None]  # B N 1 cbk
            # Entries past a list's end (gathered with the step) and padding keys (position -1) may
            # hold anything, NaN included: their values are zeroed, as their probabilities are.
            values = jnp.where((listed & (kp >= 0))[:, :, 0, :, None],
                               v_blocks[rows, heads, index].reshape(b, n, c * bk, h), jnp.zeros((), v.dtype))
            logits = jnp.einsum("bqnh,bnsh->bnqs", x["q"], keys.astype(q.dtype),
                                preferred_element_type=jnp.float32) * scale
            if spec.softcap is not None:
                logits = spec.softcap * jnp.tanh(logits / spec.softcap)
            visible = listed & (qp >= 0) & (kp >= 0)
            if spec.causal:
                visible &= kp <= qp
            if spec.window is not None:
                visible &= qp - kp < spec.window
            if "seg" in x:
                visible &= x["seg"][:, None, :, None] == kv_seg[rows, index].reshape(b, n, 1, c * bk)
            logits = jnp.where(visible, logits, -jnp.inf)
            new_max = jnp.maximum(run_max, jnp.max(logits, axis=-1))
            safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            p = jnp.where(visible, jnp.exp(logits - safe_max[..., None]), 0.0)
            rescale = jnp.where(jnp.isfinite(run_max), jnp.exp(run_max - safe_max), 0.0)
            pv = jnp.einsum("bnqs,bnsh->bnqh", p.astype(q.dtype), values.astype(q.dtype),
                            preferred_element_type=jnp.float32)
            return out * rescale[..., None] + pv, new_max, run_sum * rescale + jnp.sum(p, axis=-1)

        acc = (jnp.zeros((b, n, bq, h), jnp.float32), jnp.full((b, n, bq), -jnp.inf, jnp.float32),
               jnp.zeros((b, n, bq), jnp.float32))
        # Only as many steps as this query block's longest list needs (padding is never computed).
        steps = -(-jnp.max(x["count"]) // c)
        out, run_max, run_sum = jax.lax.fori_loop(0, steps, step, acc)
        safe = jnp.where(run_sum > 0, run_sum, 1.0)
        lse = jnp.where(run_sum > 0, run_max + jnp.log(safe), -jnp.inf)
        out = jnp.swapaxes(out / safe[..., None], 1, 2)
        return out.astype(q.dtype), jnp.swapaxes(lse, 1, 2)  # B bq N H, B bq N

    out, lse = jax.lax.map(one_query_block, xs)  # Tb B bq ...
    out = jnp.moveaxis(out, 0, 1).reshape(b, t, n, h)
    if not return_lse:
        return out
    return out, jnp.moveaxis(lse, 0, 1).reshape(b, t, n)
