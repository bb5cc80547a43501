"""Tolerances of every attention test, per dtype, in one place (never loosened to pass).

Forward: float32 about 1e-5; bfloat16 about 5e-3 relative to the float32
reference evaluated on the same (bfloat16-representable) inputs. Gradients:
JAX's test defaults (`jax._src.public_test_util.default_gradient_tolerance`).
Also the interpreter settings every kernel test uses: uninitialised memory is
NaN and out-of-bounds reads raise.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

FORWARD = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 5e-3}
GRADIENT = {jnp.dtype(jnp.float32): 2e-3, jnp.dtype(jnp.bfloat16): 1e-1}

INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")


def assert_close(actual, expected, dtype, *, kind: str = "forward", what: str = "") -> None:  # noqa: ANN001
    """|actual - expected| <= tol * (1 + |expected|) elementwise, in float32; NaN never passes."""
    tol = (FORWARD if kind == "forward" else GRADIENT)[jnp.dtype(dtype)]
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol, err_msg=what)


def assert_lse_close(actual, expected, *, what: str = "lse") -> None:  # noqa: ANN001
    """Log-sum-exp is float32 statistics for every input dtype: -inf where the row is empty."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg=what)
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=1e-5, atol=1e-5, err_msg=what)


def random_inputs(seed: int, b: int, t: int, s: int, n: int, k: int, h: int, dtype) -> tuple:  # noqa: ANN001
    """q [B,T,N,H], k/v [B,S,K,H] standard normal, rounded to `dtype`."""
    rng = np.random.default_rng(seed)
    make = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)  # noqa: E731
    return make(b, t, n, h), make(b, s, k, h), make(b, s, k, h)


def packed_segments(seed: int, b: int, t: int, s: int) -> tuple:
    """Segment ids of packed prompts (Prepacking) over positions S-T .. S-1 (queries) and 0 .. S-1."""
    rng = np.random.default_rng(seed)
    total = max(s, t)
    ids = np.cumsum(rng.random((b, total)) < 4.0 / total, axis=1).astype(np.int32)
    return jnp.asarray(ids[:, total - t :]), jnp.asarray(ids[:, total - s :])


def attention_arrays(q, k, v, *, kv_positions=None, **kw):  # noqa: ANN001, ANN003, ANN201
    """The dispatcher called with plain arrays (wrapped in a DenseView)."""
    from efficient.attention import DenseView, attention

    return attention(q, DenseView(k, v, kv_positions), **kw)
