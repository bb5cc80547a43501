"""Ring attention (Liu, Zaharia & Abbeel, 2023) over a mesh axis, forward and backward.

Queries, keys and values are split along the sequence over the mesh axis `axis` (n
devices). Each device keeps its query block and passes its key/value block (with the
keys' positions) around the ring with `ppermute`: after n - 1 hops every query block has
met every key block, accumulated with an online softmax in float32. Masking is by
positions, so the sequence may be laid out in any order across devices: the causal
load balance of LightSeq / striped attention is `zigzag_order`, a permutation of the
tokens, not a different kernel. A block pair with no visible key is skipped
(`lax.cond`), which is where the balance pays: with contiguous blocks the last device
does n times the first one's work, with zig-zag blocks each does about the same.

The backward pass is a second ring: each device recomputes its blocks' probabilities
from the saved log-sum-exp, keeps its query gradient, and sends the visiting block's key
and value gradients along with it, so they are home after n hops. Per-device memory is
one query block, two key/value blocks and their gradients: 1/n of the sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Float, Int

from efficient.attention.reference import grouped_logits, grouped_visibility
from efficient.attention.spec import AttentionSpec, visibility_mask

Stats = tuple[jax.Array, jax.Array, jax.Array]  # running max m, sum l [B K G T], weighted sum [B K G T H]


def _probs(q: jax.Array, k: jax.Array, q_pos: jax.Array, kv_pos: jax.Array, spec: AttentionSpec
           ) -> tuple[jax.Array, jax.Array]:
    """float32 logits [B, K, G, T, S] (-inf where hidden) and whether any key is visible."""
    logits = grouped_logits(q, k, spec=spec, exact=False)
    visible = grouped_visibility(spec, q_pos, kv_pos, None, None, None)
    return jnp.where(visible, logits, -jnp.inf), jnp.any(visible)


def _accumulate(stats: Stats, q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                kv_pos: jax.Array, spec: AttentionSpec) -> Stats:
    """One block pair into the online softmax (skipped when no key is visible)."""
    logits, any_visible = _probs(q, k, q_pos, kv_pos, spec)

    def update(stats: Stats) -> Stats:
        m, total, acc = stats
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(logits - m_safe[..., None])
        correction = jnp.exp(m - m_safe)
        pv = jnp.einsum("bkgts,bskh->bkgth", p, v.astype(jnp.float32))
        return m_new, total * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv

    return jax.lax.cond(any_visible, update, lambda s: s, stats)


def _pass_on(x: object, axis: str, n: int) -> object:
    """Each device's `x` (a pytree) to the next device around the ring (nothing to pass on
    a ring of one)."""
    return x if n == 1 else jax.lax.ppermute(x, axis, [(i, (i + 1) % n) for i in range(n)])


def _chunks(x: jax.Array, c: int, axis: int) -> list[jax.Array]:
    return jnp.split(x, c, axis=axis) if c > 1 else [x]


def _accumulate_blocks(stats: Stats, q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                       kv_pos: jax.Array, spec: AttentionSpec, c: int) -> Stats:
    """A device's query block against a visiting key block, as c x c sub-block pairs, each
    skipped when it has no visible key (half of a zig-zag block pair, under causality)."""
    qs, qps = _chunks(q, c, 1), _chunks(q_pos, c, 1)
    ks, vs, kps = _chunks(k, c, 1), _chunks(v, c, 1), _chunks(kv_pos, c, 1)
    parts = [_chunks(x, c, 3) for x in stats]  # stats split along T (axis 3)
    done = []
    for i in range(c):
        sub = tuple(p[i] for p in parts)
        for j in range(c):
            sub = _accumulate(sub, qs[i], ks[j], vs[j], qps[i], kps[j], spec)
        done.append(sub)
    return tuple(jnp.concatenate([d[n] for d in done], axis=3) for n in range(3))


def _forward(q, k, v, q_pos, kv_pos, spec: AttentionSpec, axis: str, n: int, c: int, unroll: bool):  # noqa: ANN001, ANN202
    b, t, heads, h = q.shape
    kv_heads = k.shape[2]
    g = heads // kv_heads
    stats = (jnp.full((b, kv_heads, g, t), -jnp.inf, jnp.float32), jnp.zeros((b, kv_heads, g, t), jnp.float32),
             jnp.zeros((b, kv_heads, g, t, h), jnp.float32))

    def hop(carry: tuple, _: None) -> tuple[tuple, None]:
        stats, k, v, kv_pos = carry
        stats = _accumulate_blocks(stats, q, k, v, q_pos, kv_pos, spec, c)
        k, v, kv_pos = _pass_on((k, v, kv_pos), axis, n)
        return (stats, k, v, kv_pos), None

    (stats, k, v, kv_pos), _ = jax.lax.scan(hop, (stats, k, v, kv_pos), None, length=n - 1,
                                             unroll=unroll or 1)
    m, total, acc = _accumulate_blocks(stats, q, k, v, q_pos, kv_pos, spec, c)
    out = jnp.where(total[..., None] > 0, acc / jnp.maximum(total, 1e-30)[..., None], 0.0)
    lse = jnp.where(total > 0, m + jnp.log(jnp.maximum(total, 1e-30)), -jnp.inf)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, heads, h).astype(q.dtype), lse


def _block_grads(q, k, v, q_pos, kv_pos, out_g, lse, dout_g, spec: AttentionSpec):  # noqa: ANN001, ANN202
    """(dq, dk, dv) of one block pair, from the saved log-sum-exp: the gradient of
    sum_j p_ij (v_j - out_i) with p and out held at their final values is exactly the
    block's share of attention's gradient (the -out_i term is the softmax normaliser's)."""
    def contribution(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        logits, _ = _probs(q, k, q_pos, kv_pos, spec)
        finite = jnp.isfinite(lse)[..., None]
        p = jnp.where(finite, jnp.exp(logits - jnp.where(finite, lse[..., None], 0.0)), 0.0)
        pv = jnp.einsum("bkgts,bskh->bkgth", p, v.astype(jnp.float32))
        return pv - jnp.sum(p, axis=-1)[..., None] * out_g

    _, pullback = jax.vjp(contribution, q, k, v)
    return pullback(dout_g)


def _grads_blocks(q, k, v, q_pos, kv_pos, out_g, lse, dout_g, spec: AttentionSpec, c: int):  # noqa: ANN001, ANN202
    """(dq, dk, dv) of a device's query block against a visiting key block, sub-block
    pairs with no visible key skipped."""
    qs, qps, outs, lses, douts = (_chunks(x, c, a) for x, a in
                                  ((q, 1), (q_pos, 1), (out_g, 3), (lse, 3), (dout_g, 3)))
    ks, vs, kps = _chunks(k, c, 1), _chunks(v, c, 1), _chunks(kv_pos, c, 1)
    dq = [jnp.zeros_like(x) for x in qs]
    dk = [jnp.zeros_like(x) for x in ks]
    dv = [jnp.zeros_like(x) for x in vs]
    for i in range(c):
        for j in range(c):
            visible = jnp.any(grouped_visibility(spec, qps[i], kps[j], None, None, None))
            zeros = (jnp.zeros_like(qs[i]), jnp.zeros_like(ks[j]), jnp.zeros_like(vs[j]))
            ddq, ddk, ddv = jax.lax.cond(visible, functools.partial(
                _block_grads, qs[i], ks[j], vs[j], qps[i], kps[j], outs[i], lses[i], douts[i], spec), lambda z=zeros: z)
            dq[i], dk[j], dv[j] = dq[i] + ddq, dk[j] + ddk, dv[j] + ddv
    return tuple(jnp.concatenate(parts, axis=1) for parts in (dq, dk, dv))


def _backward(q, k, v, q_pos, kv_pos, out, lse, dout, spec: AttentionSpec, axis: str, n: int, c: int,
              unroll: bool):  # noqa: ANN001, ANN202
    b, t, heads, h = q.shape
    kv_heads = k.shape[2]
    g = heads // kv_heads

    def grouped(x: jax.Array) -> jax.Array:  # [B T N H] -> [B K G T H] float32
        return jnp.transpose(x.astype(jnp.float32).reshape(b, t, kv_heads, g, h), (0, 2, 3, 1, 4))

    out_g, dout_g = grouped(out), grouped(dout)

    def hop(carry: tuple, _: None) -> tuple[tuple, None]:
        dq, k, v, kv_pos, dk, dv = carry
        ddq, ddk, ddv = _grads_blocks(q, k, v, q_pos, kv_pos, out_g, lse, dout_g, spec, c)
        k, v, kv_pos, dk, dv = _pass_on((k, v, kv_pos, dk + ddk, dv + ddv), axis, n)
        return (dq + ddq, k, v, kv_pos, dk, dv), None

    init = (jnp.zeros_like(q), k, v, kv_pos, jnp.zeros_like(k), jnp.zeros_like(v))
    (dq, _, _, _, dk, dv), _ = jax.lax.scan(hop, init, None, length=n, unroll=unroll or 1)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _ring_local(q, k, v, q_pos, kv_pos, spec: AttentionSpec, axis: str, n: int, c: int, unroll: bool):  # noqa: ANN001, ANN202
    return _forward(q, k, v, q_pos, kv_pos, spec, axis, n, c, unroll)[0]


def _ring_local_fwd(q, k, v, q_pos, kv_pos, spec, axis, n, c, unroll):  # noqa: ANN001, ANN202
    out, lse = _forward(q, k, v, q_pos, kv_pos, spec, axis, n, c, unroll)
    return out, (q, k, v, q_pos, kv_pos, out, lse)


def _ring_local_bwd(spec, axis, n, c, unroll, residuals, dout):  # noqa: ANN001, ANN202
    q, k, v, q_pos, kv_pos, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, q_pos, kv_pos, out, lse, dout, spec, axis, n, c, unroll)
    return dq, dk, dv, None, None


_ring_local.defvjp(_ring_local_fwd, _ring_local_bwd)


def check_sequence_split(mesh: Mesh, axis: str, lengths: dict[str, int], caller: str) -> int:
    """The size of mesh axis `axis`; ValueError (before compiling) if the mesh lacks it or
    a sequence length is not a multiple of it."""
    if axis not in mesh.axis_names:
        raise ValueError(f"{caller}: axis {axis!r} is not an axis of the mesh {mesh.axis_names}")
    n = mesh.shape[axis]
    for name, length in lengths.items():
        if length % n:
            raise ValueError(f"{caller}: {name} length {length} cannot be split evenly across the {n} devices of "
                             f"mesh axis {axis!r}; pad it to a multiple of {n}")
    return n


def ring_attention(
    q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"], *,
    mesh: Mesh, q_positions: Int[Array, "B T"], kv_positions: Int[Array, "B S"],
    spec: AttentionSpec = AttentionSpec(), axis: str = "sequence", batch_axis: str | None = None,
    head_axis: str | None = None, sub_blocks: int = 2, unroll_hops: bool = False,
) -> Float[Array, "B T N H"]:
    """Attention with q, k, v split along tokens over mesh axis `axis` (and optionally the
    batch over `batch_axis` and the query and KV heads over `head_axis`, which must divide
    both); equal to the dense oracle with the same positions. Positions may be in any order
    (`zigzag_order` balances causal work); -1 marks padding.

    sub_blocks: each device's block is computed as sub_blocks x sub_blocks pairs, each
        skipped when nothing in it is visible (2 matches the zig-zag layout's two
        halves); 1 when the local block lengths are not multiples of it.
    unroll_hops: unroll the hop loops (XLA may then overlap a hop's transfer with the
        previous hop's compute; every transfer is a separate op in the compiled HLO)."""
    n = check_sequence_split(mesh, axis, {"q": q.shape[1], "kv": k.shape[1]}, "ring_attention")
    if not isinstance(sub_blocks, int) or isinstance(sub_blocks, bool) or sub_blocks < 1:
        raise ValueError(f"ring_attention: sub_blocks must be a positive int, got {sub_blocks!r}")
    c = sub_blocks if (q.shape[1] // n) % sub_blocks == 0 and (k.shape[1] // n) % sub_blocks == 0 else 1
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"ring_attention: query heads N={q.shape[2]} must be a multiple of KV heads K={k.shape[2]}")
    if head_axis is not None and (q.shape[2] % mesh.shape[head_axis] or k.shape[2] % mesh.shape[head_axis]):
        raise ValueError(f"ring_attention: head_axis {head_axis!r} of size {mesh.shape[head_axis]} must divide the "
                         f"query heads N={q.shape[2]} and KV heads K={k.shape[2]}")
    tokens, heads = PartitionSpec(batch_axis, axis), PartitionSpec(batch_axis, axis, head_axis)
    local = functools.partial(_ring_local, spec=spec, axis=axis, n=n, c=c, unroll=bool(unroll_hops))
    return jax.shard_map(lambda *a: local(*a), mesh=mesh, in_specs=(heads, heads, heads, tokens, tokens),
                         out_specs=heads, check_vma=False)(q, k, v, jnp.asarray(q_positions, jnp.int32),
                                                           jnp.asarray(kv_positions, jnp.int32))


def zigzag_order(length: int, num_shards: int) -> np.ndarray:
    """A token order for causal load balance (LightSeq's zig-zag): the sequence cut into
    2n chunks, device i holding chunks i and 2n-1-i. `x[:, order]` lays a sequence out;
    `inverse_order(order)` undoes it. Requires `length` divisible by 2n."""
    if length % (2 * num_shards):
        raise ValueError(f"zigzag_order: length {length} must be a multiple of 2 x num_shards = {2 * num_shards}")
    chunks = np.arange(length).reshape(2 * num_shards, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * num_shards - 1 - i]])
                           for i in range(num_shards)])


def inverse_order(order: np.ndarray) -> np.ndarray:
    return np.argsort(order)


def ring_work(q_positions: np.ndarray, kv_positions: np.ndarray, num_shards: int,
              spec: AttentionSpec = AttentionSpec(), sub_blocks: int = 2) -> dict[str, object]:
    """What `ring_attention` computes for these positions, counted in sub-block pairs (the
    unit it skips): "per_device" (int[n], the pairs each device computes over all hops) and
    "critical_path" (the sum over hops of the busiest device's pairs: hops are
    synchronous, so this is the time). Causal contiguous blocks leave the last device
    busiest at every hop; zig-zag blocks even the work out."""
    c = sub_blocks
    seen = np.asarray(visibility_mask(spec, jnp.asarray(q_positions), jnp.asarray(kv_positions)))  # B T S
    b, t, s = seen.shape
    blocks = num_shards * c
    visible = seen.reshape(b, blocks, t // blocks, blocks, s // blocks).any(axis=(0, 2, 4))  # [q block, kv block]
    work = np.zeros((num_shards, num_shards), int)  # [hop, device]
    for hop in range(num_shards):
        for device in range(num_shards):
            source = (device - hop) % num_shards
            work[hop, device] = visible[device * c:(device + 1) * c, source * c:(source + 1) * c].sum()
    return {"per_device": work.sum(axis=0), "critical_path": int(work.max(axis=1).sum()),
            "total": int(work.sum())}
