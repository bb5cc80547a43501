"""One parameterised test base run against every registered attention implementation.

The capability table (`efficient.attention.capabilities`) is the single source
of what each implementation serves: a case inside its capabilities must match
the float32 oracle; a case outside must be refused by the dispatcher with the
table's reason (NotImplementedError naming it), without calling the
implementation.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tolerances import assert_close, assert_lse_close, packed_segments, random_inputs  # noqa: E402

import efficient.attention.backends  # noqa: E402, F401  (registers pallas_tpu, cudnn)
from efficient.attention import (  # noqa: E402
    CAPABILITIES,
    AttentionSpec,
    DenseView,
    attention,
    attention_reference,
    registered_implementations,
    unsupported,
)

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


def _call(q, k, v, kw: dict) -> tuple:  # noqa: ANN001
    """(view, the dispatcher's keyword arguments) for one case."""
    kw = dict(kw)
    return DenseView(k, v, kw.pop("kv_positions", None)), kw


def test_every_registered_implementation_declares_capabilities() -> None:
    assert set(registered_implementations()) <= set(CAPABILITIES)
    assert {"xla", "reference", "pallas_tpu", "cudnn"} <= set(registered_implementations())


@pytest.mark.parametrize("case", sample_cases(2, seed=0), ids=str)
@pytest.mark.parametrize("name", sorted(CAPABILITIES))
def test_forward_matches_oracle(name: str, case: Case) -> None:
    (q, k, v), kw = build(case)
    view, kw = _call(q, k, v, kw)
    reason = unsupported(name, q, view, return_lse=True, **kw)
    if reason is not None:
        with pytest.raises(NotImplementedError, match=re.escape(f"{name}: {reason}")):
            attention(q, view, return_lse=True, implementation=name, **kw)
        return
    out, lse = attention(q, view, return_lse=True, implementation=name, **kw)
    kw["kv_positions"] = view.positions
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
    (q, k, v), kw = build(case)
    view, call = _call(q, k, v, kw)
    reason = unsupported(name, q, view, **call)
    if reason is not None:
        pytest.skip(f"{name} does not serve {case}: {reason} (the forward test checks the refusal)")
    cot = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape, np.float32))

    def loss(fn, q, k, v, **extra):  # noqa: ANN001, ANN202
        return jnp.sum(fn(q, k, v, **kw, **extra).astype(jnp.float32) * cot)

    def dispatched(q, k, v, kv_positions=None, **rest):  # noqa: ANN001, ANN003, ANN202
        return attention(q, DenseView(k, v, kv_positions), **rest)

    got = jax.grad(loss, (1, 2, 3))(dispatched, q, k, v, implementation=name)
    want = jax.grad(loss, (1, 2, 3))(attention_reference, *(x.astype(jnp.float32) for x in (q, k, v)))
    for axis, g, w in zip("qkv", got, want):
        assert g.dtype == q.dtype
        assert_close(g, w, case.dtype, kind="gradient", what=f"d{axis} {case}")
