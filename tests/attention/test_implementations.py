"""One parameterised test base run against every registered attention implementation.

Each implementation declares its capabilities; a case inside them must match
the float32 oracle, a case outside them must raise NotImplementedError (so
the dispatcher can fall through). Only an implementation whose backend is
absent (cudnn on CPU) is skipped, with the reason.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tolerances import assert_close, assert_lse_close, attention_arrays, packed_segments, random_inputs  # noqa: E402

import efficient.attention.backends  # noqa: E402, F401  (registers pallas_tpu, cudnn)
from efficient.attention import AttentionSpec, attention, attention_reference, registered_implementations  # noqa: E402

F32, BF16, F16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)


@dataclasses.dataclass(frozen=True)
class Capabilities:
    backends: tuple[str, ...]
    dtypes: tuple[jnp.dtype, ...]
    head_dims: tuple[int, ...] | None = None  # None: any
    window: bool = True
    softcap: bool = True
    segments: bool = True
    positions: bool = True
    lse: bool = True
    mask_max_t: int | None = None  # arbitrary `mask` for T <= this (None: any T)
    causal_needs_t_eq_s: bool = False


CAPABILITIES = {
    "xla": Capabilities(backends=("cpu", "gpu", "tpu"), dtypes=(F32, BF16, F16)),
    "reference": Capabilities(backends=("cpu", "gpu", "tpu"), dtypes=(F32, BF16, F16)),
    "pallas_tpu": Capabilities(backends=("cpu", "tpu"), dtypes=(F32, BF16), head_dims=(64, 128, 256), mask_max_t=16),
    "cudnn": Capabilities(
        backends=("gpu",), dtypes=(BF16, F16), head_dims=(64, 128), softcap=False, segments=False,
        positions=False, lse=False, mask_max_t=0, causal_needs_t_eq_s=True,
    ),
}

LENGTHS = (1, 7, 64, 127, 128, 129, 300, 513)
FEATURES = ("causal", "bidirectional", "window", "softcap", "segments", "padded", "mask")


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    t: int
    s: int
    ratio: int
    h: int
    feature: str
    dtype: str

    def __str__(self) -> str:
        return f"B{self.b}-T{self.t}-S{self.s}-G{self.ratio}-H{self.h}-{self.feature}-{self.dtype}"


def sample_cases(per_feature: int, seed: int) -> list[Case]:
    """A deterministic sample of the grid, stratified so that every feature appears."""
    rng = random.Random(seed)
    rest = list(itertools.product((1, 2, 3), LENGTHS, LENGTHS, (1, 4, 8), (64, 128)))
    return [
        Case(*shape, feature, rng.choice(("float32", "bfloat16")))
        for feature in FEATURES
        for shape in rng.sample(rest, per_feature)
    ]


def unsupported(caps: Capabilities, case: Case) -> str | None:
    """Why `caps` does not cover `case` (None if it does)."""
    causal = case.feature != "bidirectional"
    checks = {
        "dtype": jnp.dtype(case.dtype) not in caps.dtypes,
        "head_dim": caps.head_dims is not None and case.h not in caps.head_dims,
        "window": case.feature == "window" and not caps.window,
        "softcap": case.feature == "softcap" and not caps.softcap,
        "segments": case.feature == "segments" and not caps.segments,
        "positions": case.feature == "padded" and not caps.positions,
        "mask": case.feature == "mask" and caps.mask_max_t is not None and case.t > caps.mask_max_t,
        "lse": not caps.lse,
        "causal T != S": causal and caps.causal_needs_t_eq_s and case.t != case.s,
    }
    return next((what for what, missing in checks.items() if missing), None)


def build(case: Case) -> tuple[tuple, dict]:
    """Inputs and keyword arguments of the dispatcher for one case."""
    n_kv = 2 if case.ratio == 1 else 1
    q, k, v = random_inputs(case.t * 1000 + case.s, case.b, case.t, case.s, case.ratio * n_kv, n_kv, case.h, case.dtype)
    kw: dict = dict(spec=AttentionSpec(causal=case.feature != "bidirectional"))
    if case.feature == "window":
        kw["spec"] = AttentionSpec(window=max(1, case.s // 3))
    elif case.feature == "softcap":
        kw["spec"] = AttentionSpec(softcap=2.0)
    elif case.feature == "segments":
        kw["q_segment_ids"], kw["kv_segment_ids"] = packed_segments(case.s, case.b, case.t, case.s)
    elif case.feature == "padded":  # right-padded cache rows and left-padded queries
        rng = np.random.default_rng(case.s)
        n_valid = rng.integers(0, case.s + 1, size=(case.b, 1))
        kv_pos = np.where(np.arange(case.s)[None] < n_valid, np.arange(case.s)[None], -1)
        q_pos = n_valid - case.t + np.arange(case.t)[None]
        kw["q_positions"], kw["kv_positions"] = jnp.asarray(q_pos, jnp.int32), jnp.asarray(kv_pos, jnp.int32)
    elif case.feature == "mask":
        kw["mask"] = jnp.asarray(np.random.default_rng(case.t).random((case.b, case.t, case.s)) < 0.7)
    return (q, k, v), kw


def _check_backend(name: str) -> Capabilities:
    caps = CAPABILITIES[name]
    backend = jax.default_backend()
    if backend not in caps.backends:
        pytest.skip(f"{name} runs on {caps.backends}, this backend is {backend}")
    return caps


def test_every_registered_implementation_declares_capabilities() -> None:
    assert set(registered_implementations()) <= set(CAPABILITIES)


@pytest.mark.parametrize("case", sample_cases(2, seed=0), ids=str)
@pytest.mark.parametrize("name", sorted(CAPABILITIES))
def test_forward_matches_oracle(name: str, case: Case) -> None:
    caps = _check_backend(name)
    (q, k, v), kw = build(case)
    reason = unsupported(caps, case)
    if reason is not None:
        with pytest.raises(NotImplementedError):
            attention_arrays(q, k, v, return_lse=True, implementation=name, **kw)
        return
    out, lse = attention_arrays(q, k, v, return_lse=True, implementation=name, **kw)
    ref, ref_lse = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), return_lse=True, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, case.dtype, what=str(case))
    assert_lse_close(lse, ref_lse, what=str(case))


GRAD_CASES = (
    Case(2, 129, 129, 4, 64, "segments", "float32"),
    Case(1, 64, 300, 8, 128, "window", "bfloat16"),
)


@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
@pytest.mark.parametrize("name", sorted(CAPABILITIES))
def test_gradients_match_oracle(name: str, case: Case) -> None:
    caps = _check_backend(name)
    if unsupported(caps, case) not in (None, "lse"):
        pytest.skip(f"{name} does not serve {case} (forward test checks that it raises)")
    (q, k, v), kw = build(case)
    cot = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape, np.float32))

    def loss(fn, q, k, v, **extra):  # noqa: ANN001, ANN202
        return jnp.sum(fn(q, k, v, **kw, **extra).astype(jnp.float32) * cot)

    got = jax.grad(loss, (1, 2, 3))(attention, q, k, v, implementation=name)
    want = jax.grad(loss, (1, 2, 3))(attention_reference, *(x.astype(jnp.float32) for x in (q, k, v)))
    for axis, g, w in zip("qkv", got, want):
        assert g.dtype == q.dtype
        assert_close(g, w, case.dtype, kind="gradient", what=f"d{axis} {case}")
