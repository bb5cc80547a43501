"""Block-sparse attention for prefill (splash-attention style; the primitive under MInference's
patterns): each (row, query head, query block) attends to its listed key blocks.

`block_sparse_attention(q[B,T,N,H], k[B,S,K,H], v[B,S,K,H], index[B,N,T/bq,M], count[B,N,T/bq],
*, block_q, block_k, q_positions, kv_positions, causal, window, softcap, scale, return_lse,
interpret)`: jitted, validated, forward only. Lists must hold distinct blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.block_sparse_attention import tpu
from kernels_pallas.block_sparse_attention.reference import block_sparse_reference, listed_blocks
from kernels_pallas.flash_attention.reference import default_positions

__all__ = ["block_sparse_attention", "block_sparse_reference", "listed_blocks"]


def validate(q: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array, count: jax.Array, block_q: int,
             block_k: int) -> None:
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if k.shape != (b, s, kh, h) or v.shape != k.shape or n % kh:
        raise ValueError(f"k/v must be [B={b}, S, K, H={h}] with K dividing N={n}, got {k.shape} and {v.shape}")
    for name, size, axis, length in (("block_q", block_q, "T", t), ("block_k", block_k, "S", s)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1 or length % size:
            raise ValueError(f"{name}={size!r} must be a positive int dividing {axis}={length}")
    tb = t // block_q
    if index.ndim != 4 or tuple(index.shape[:3]) != (b, n, tb) or tuple(count.shape) != (b, n, tb):
        raise ValueError(f"index must be [B, N, T/block_q, M] = {(b, n, tb, 'M')} and count {(b, n, tb)}, got "
                         f"{tuple(index.shape)} and {tuple(count.shape)}")
    if index.shape[-1] < 1:
        raise ValueError("index must list at least one entry per query block (M >= 1)")
    for name, x in (("index", index), ("count", count)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer array, got {x.dtype}")


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "causal", "window", "softcap", "scale",
                                             "return_lse", "interpret"))
def block_sparse_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array, count: jax.Array, *, block_q: int, block_k: int,
    q_positions: jax.Array | None = None, kv_positions: jax.Array | None = None, causal: bool = True,
    window: int | None = None, softcap: float | None = None, scale: float | None = None, return_lse: bool = False,
    interpret: object = False,
):  # noqa: ANN201  out [B, T, N, H] or (out, lse [B, T, N])
    validate(q, k, v, index, count, block_q, block_k)
    b, t, n, h = q.shape
    s = k.shape[1]
    dq, dk = default_positions(b, t, s)
    qp = (dq if q_positions is None else q_positions).astype(jnp.int32)[:, :, None]  # B T 1
    kp = (dk if kv_positions is None else kv_positions).astype(jnp.int32)[:, None, :]  # B 1 S
    sb, m = s // block_k, index.shape[-1]
    cfg = tpu.Config(causal=causal, window=window, softcap=softcap, scale=float(h**-0.5 if scale is None else scale),
                     block_q=block_q, block_k=block_k, heads=n, query_blocks=t // block_q, entries=m,
                     interpret=interpret)
    out, lse = tpu.forward(cfg, q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), qp, kp,
                           jnp.clip(index.astype(jnp.int32), 0, sb - 1).reshape(-1),
                           jnp.clip(count.astype(jnp.int32), 0, m).reshape(-1))
    out = out.transpose(0, 2, 1, 3)
    return (out, lse[..., 0].transpose(0, 2, 1)) if return_lse else out
