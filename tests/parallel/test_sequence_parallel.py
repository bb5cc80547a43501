"""Ring attention and DeepSpeed-Ulysses under shard_map equal the dense oracle, forward and
backward; the zig-zag layout balances causal work; bad splits are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient.attention import AttentionSpec
from efficient.attention.reference import attention_reference
from efficient.parallel import inverse_order, make_mesh, ring_attention, ring_work, ulysses_attention, zigzag_order

B, T, N, K, H = 2, 32, 8, 2, 8


def _inputs() -> tuple[jax.Array, ...]:
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.randn(B, T, heads, H), jnp.float32) for heads in (N, K, K))
    positions = np.tile(np.arange(T), (B, 1))
    positions[1, -5:] = -1  # a padded row: its queries and keys take part in nothing
    return q, k, v, jnp.asarray(positions, jnp.int32)


CASES = {
    "causal, 8-way": (dict(sequence=8), None, AttentionSpec()),
    "window + softcap, 2x4 batch x sequence": (dict(data=2, sequence=4), "data", AttentionSpec(window=7, softcap=5.0)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["ring", "ulysses"])
def test_sequence_parallel_attention_equals_the_oracle(case: str, method: str) -> None:
    mesh_shape, batch_axis, spec = CASES[case]
    mesh = make_mesh(**mesh_shape)
    q, k, v, pos = _inputs()
    run = ring_attention if method == "ring" else ulysses_attention

    def loss(fn, q, k, v):  # noqa: ANN001, ANN202
        return jnp.sum(jnp.sin(fn(q, k, v)))

    def oracle(q, k, v):  # noqa: ANN001, ANN202
        return attention_reference(q, k, v, spec=spec, q_positions=pos, kv_positions=pos)

    def parallel(q, k, v):  # noqa: ANN001, ANN202
        return run(q, k, v, mesh=mesh, q_positions=pos, kv_positions=pos, spec=spec, batch_axis=batch_axis)

    out, grads = jax.jit(lambda *a: (parallel(*a), jax.grad(lambda *b: loss(parallel, *b), argnums=(0, 1, 2))(*a)))(
        q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(oracle(q, k, v)), atol=2e-6)
    expected = jax.grad(lambda *b: loss(oracle, *b), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_zigzag_layout_is_a_permutation_that_halves_the_critical_path() -> None:
    q, k, v, pos = _inputs()
    order = zigzag_order(T, 8)
    out = ring_attention(q[:, order], k[:, order], v[:, order], mesh=make_mesh(sequence=8),
                         q_positions=pos[:, order], kv_positions=pos[:, order])
    want = attention_reference(q, k, v, q_positions=pos, kv_positions=pos)
    np.testing.assert_allclose(np.asarray(out[:, inverse_order(order)]), np.asarray(want), atol=2e-6)
    contiguous = ring_work(np.arange(T)[None], np.arange(T)[None], 8)
    zigzag = ring_work(order[None], order[None], 8)
    assert contiguous["total"] == zigzag["total"] == 8 * 17  # the same causal sub-block pairs
    assert list(contiguous["per_device"]) == [3, 7, 11, 15, 19, 23, 27, 31]  # the last device does most
    assert list(zigzag["per_device"]) == [17] * 8
    assert (contiguous["critical_path"], zigzag["critical_path"]) == (31, 17)


def test_bad_splits_are_refused_before_compiling() -> None:
    q, k, v, pos = _inputs()
    mesh = make_mesh(data=2, sequence=4)
    with pytest.raises(ValueError, match=r"q length 30 cannot be split evenly across the 4 devices"):
        ring_attention(q[:, :30], k[:, :30], v[:, :30], mesh=mesh, q_positions=pos[:, :30],
                       kv_positions=pos[:, :30])
    with pytest.raises(ValueError, match=r"axis 'ring' is not an axis of the mesh"):
        ring_attention(q, k, v, mesh=mesh, q_positions=pos, kv_positions=pos, axis="ring")
    with pytest.raises(ValueError, match=r"query heads N=2 cannot be split across the 4 devices"):
        ulysses_attention(q[:, :, :2], k, v, mesh=mesh, q_positions=pos, kv_positions=pos)
    with pytest.raises(ValueError, match="zigzag_order: length 30 must be a multiple of 2 x num_shards = 8"):
        zigzag_order(30, 4)
