"""DeepSpeed-Ulysses sequence parallelism (Jacobs et al., 2023) over a mesh axis.

Inputs arrive split along tokens over `axis` (n devices). One all-to-all turns each
device's [B, T/n, N, H] queries (and keys, values) into [B, T, N/n, H]: the whole
sequence for a 1/n slice of the heads. Attention then runs locally through the
dispatcher (any implementation that serves a `DenseView`), and a second all-to-all
turns the output back into token blocks. Communication per device is O(T·N·H/n) per
all-to-all; it needs N (and K, or K is expanded to N first) divisible by n.
Differentiable: the transpose of an all-to-all is the reverse all-to-all.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Float, Int

from efficient.attention import DenseView, attention
from efficient.attention.spec import AttentionSpec
from efficient.parallel.ring_attention import check_sequence_split


def _ulysses_local(q, k, v, q_pos, kv_pos, *, spec: AttentionSpec, axis: str,  # noqa: ANN001, ANN202
                   implementation: str | tuple[str, ...]):
    def heads_to_sequence(x: jax.Array) -> jax.Array:  # [B, T/n, X, H] -> [B, T, X/n, H]
        return jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)

    q, k, v = heads_to_sequence(q), heads_to_sequence(k), heads_to_sequence(v)
    q_pos = jax.lax.all_gather(q_pos, axis, axis=1, tiled=True)
    kv_pos = jax.lax.all_gather(kv_pos, axis, axis=1, tiled=True)
    out = attention(q, DenseView(k=k, v=v, positions=kv_pos), spec=spec, q_positions=q_pos,
                    implementation=implementation)
    return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


def ulysses_attention(
    q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"], *,
    mesh: Mesh, q_positions: Int[Array, "B T"], kv_positions: Int[Array, "B S"],
    spec: AttentionSpec = AttentionSpec(), axis: str = "sequence", batch_axis: str | None = None,
    head_axis: str | None = None, implementation: str | tuple[str, ...] = "xla",
) -> Float[Array, "B T N H"]:
    """Attention with q, k, v split along tokens over mesh axis `axis` (and optionally the
    batch over `batch_axis` and the heads over `head_axis`), computed head-split after an
    all-to-all; equal to the dense oracle with the same positions. KV heads that the axes
    do not divide are repeated to the query heads first (GQA expanded)."""
    n = check_sequence_split(mesh, axis, {"q": q.shape[1], "kv": k.shape[1]}, "ulysses_attention")
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"ulysses_attention: query heads N={heads} must be a multiple of KV heads K={kv_heads}")
    split = n * (mesh.shape[head_axis] if head_axis is not None else 1)
    if heads % split:
        raise ValueError(f"ulysses_attention: query heads N={heads} cannot be split across the {split} devices of "
                         f"mesh axes {axis!r}{f' x {head_axis!r}' if head_axis else ''}; use ring_attention, "
                         "which splits tokens only")
    if kv_heads % split:
        k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
    tokens, per_head = PartitionSpec(batch_axis, axis), PartitionSpec(batch_axis, axis, head_axis)
    local = functools.partial(_ulysses_local, spec=spec, axis=axis, implementation=implementation)
    return jax.shard_map(local, mesh=mesh, in_specs=(per_head, per_head, per_head, tokens, tokens),
                         out_specs=per_head, check_vma=False)(
        q, k, v, jnp.asarray(q_positions, jnp.int32), jnp.asarray(kv_positions, jnp.int32))
