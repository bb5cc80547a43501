"""MInference's offline pattern search, attention recall, and pattern files.

MInference (Jiang et al. 2024) picks each head's pattern once, offline, by the recall of
dense attention each candidate keeps on a calibration prompt at a fixed compute budget.
Here every candidate's layout is built exactly as at prefill time (sparse_layout over the
calibration prompt's own queries and keys), its density is counted in causal blocks, and
its recall is the dense attention mass inside its blocks, averaged over queries; each head
takes the candidate of highest recall among those within the density budget.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from efficient.attention.spec import AttentionSpec
from kernels_pallas.flash_attention.reference import visible
from efficient.attention.sparse_prefill import PATTERNS, HeadPattern, PrefillIndex, SparsePrefill, sparse_layout

# Candidate budgets, fractions of the keys S (a head's measured density decides what it costs).
CANDIDATE_BUDGETS = {"a_shape": (0.01, 0.025, 0.05, 0.1, 0.2, 0.4),
                     "vertical_slash": ((0.005, 0.01), (0.01, 0.02), (0.02, 0.05), (0.05, 0.1)),
                     "block_sparse": (0.01, 0.025, 0.05, 0.1, 0.2, 0.4)}


def query_block_mass(
    q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], q_positions: Int[Array, "B T"],
    kv_positions: Int[Array, "B S"], *, spec: AttentionSpec = AttentionSpec(), block: int = 64,
) -> Float[Array, "B N Tb S"]:
    """Dense attention probabilities summed over each query block, per key, float32: each
    valid query contributes 1 in total (T a multiple of `block`). One query block at a time."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    kx = jnp.repeat(k, n // kh, axis=2).astype(jnp.float32)
    kp = kv_positions[:, None, None, :]

    def one(x: tuple[jax.Array, jax.Array]) -> jax.Array:
        qb, pb = x  # B bq N H, B bq
        logits = jnp.einsum("bqnh,bsnh->bnqs", qb.astype(jnp.float32), kx) * spec.logit_scale(h)
        if spec.softcap is not None:
            logits = spec.softcap * jnp.tanh(logits / spec.softcap)
        seen = visible(pb[:, None, :, None], kp, None, None, causal=spec.causal, window=spec.window)
        probs = jnp.where(seen, jax.nn.softmax(jnp.where(seen, logits, -jnp.inf), axis=-1), 0.0)
        return jnp.sum(probs, axis=2)  # B N S

    xs = (jnp.moveaxis(q.reshape(b, t // block, block, n, h), 1, 0),
          jnp.moveaxis(q_positions.reshape(b, t // block, block), 1, 0))
    return jnp.moveaxis(jax.lax.map(one, xs), 0, 2)


def index_recall(mass: Float[Array, "B N Tb S"], index: PrefillIndex, q_positions: Int[Array, "B T"]
                 ) -> Float[Array, "B N"]:
    """Fraction of the dense attention mass on the keys the index covers, averaged over valid
    queries (one minus the mass left out, so that a small loss is not rounded away against 1)."""
    lost = jnp.sum(jnp.where(index.covered(mass.shape[-1]), 0.0, mass), axis=(2, 3))
    return 1.0 - lost / jnp.maximum(jnp.sum(q_positions >= 0, axis=1), 1)[:, None]


def causal_density(index: PrefillIndex, q_positions: Int[Array, "B T"], kv_positions: Int[Array, "B S"]
                   ) -> Float[Array, "B N"]:
    """Keys covered over the keys a dense causal prefill computes, per query block (a listed
    block below the diagonal counts its `block` keys, a vertical column one key)."""
    block = index.layout.block_q
    b, t = q_positions.shape
    qh = jnp.max(jnp.where(q_positions >= 0, q_positions, -1).reshape(b, -1, block), axis=-1)  # B Tb
    causal = (kv_positions[:, None, :] >= 0) & (kv_positions[:, None, :] <= qh[:, :, None])  # B Tb S
    covered = jnp.sum(index.covered(kv_positions.shape[1]) & causal[:, None], axis=(2, 3))
    return covered / jnp.maximum(jnp.sum(causal, axis=(1, 2)), 1)[:, None]


def candidates() -> list[HeadPattern]:
    """The patterns tried per head (CANDIDATE_BUDGETS), dense last."""
    out = [HeadPattern("a_shape", x) for x in CANDIDATE_BUDGETS["a_shape"]]
    out += [HeadPattern("vertical_slash", v, s) for v, s in CANDIDATE_BUDGETS["vertical_slash"]]
    out += [HeadPattern("block_sparse", x) for x in CANDIDATE_BUDGETS["block_sparse"]]
    return out + [HeadPattern("dense")]


def allocate(recall: np.ndarray, density: np.ndarray, target: float) -> np.ndarray:
    """A candidate per head [H] (from recall and density [H, C]) maximising the summed recall
    with the mean density at most `target`: every head starts at its sparsest candidate, then
    the upgrade of best recall gained per density spent is taken while the budget allows
    (greedy over the heads' recall-density curves)."""
    heads = np.arange(recall.shape[0])
    choice = np.argmin(density, axis=1)
    budget = target * recall.shape[0]
    while True:
        gain = recall - recall[heads, choice][:, None]
        cost = density - density[heads, choice][:, None]
        left = budget - density[heads, choice].sum()
        slope = np.where(cost > 0, gain / np.where(cost > 0, cost, 1.0), np.inf)
        slope = np.where((gain > 0) & (cost <= left + 1e-12), slope, -np.inf)
        # Ties go to the later candidate (dense is last): a sparse shape that happened to list every
        # block of the calibration prompt is no cheaper than dense and lists fewer on others.
        flat = np.argmax(slope[:, ::-1])
        best = (flat // slope.shape[1], slope.shape[1] - 1 - flat % slope.shape[1])
        if not np.isfinite(slope[best]) and slope[best] < 0:
            return choice
        choice[best[0]] = best[1]


@dataclasses.dataclass(frozen=True)
class HeadSearch:
    """What the search measured per (layer, head) for the chosen pattern, and per candidate."""

    recall: np.ndarray  # [L, N] chosen pattern's recall on the calibration prompt
    density: np.ndarray  # [L, N] its causal-block density
    candidate_recall: np.ndarray  # [L, N, C]
    candidate_density: np.ndarray  # [L, N, C]


def _padded(q: jax.Array, k: jax.Array, positions: jax.Array, block: int) -> tuple[jax.Array, ...]:
    from efficient.attention.sparse_prefill import _pad_to

    return _pad_to(q, block, 0), _pad_to(k, block, 0), _pad_to(positions.astype(jnp.int32), block, -1)


def search_layer(q: jax.Array, k: jax.Array, positions: jax.Array, spec: AttentionSpec,
                 tried: list[HeadPattern], block: int, last_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(recall [N, C], density [N, C]) of every candidate for one layer's q, k, averaged over rows."""
    qx, kx, p = _padded(q, k, positions, block)
    mass = query_block_mass(qx, kx, p, p, spec=spec, block=block)
    n = q.shape[2]
    recalls, densities = [], []
    for pattern in tried:
        kind = jnp.full((n,), PATTERNS.index(pattern.kind), jnp.int32)
        index = sparse_layout(qx, kx, p, p, kind, jnp.full((n,), pattern.budget), jnp.full((n,), pattern.budget2),
                              spec=spec, block=block, last_queries=last_queries,
                              max_budget=SparsePrefill.uniform(pattern, 1, 1).max_budgets())
        recalls.append(np.asarray(index_recall(mass, index, p)).mean(0))  # mean over the calibration rows
        densities.append(np.asarray(causal_density(index, p, p)).mean(0))
    return np.stack(recalls, -1), np.stack(densities, -1)


def visit_layers(model: object, tokens: Int[Array, "B T"], visit: Callable[..., Any]) -> list[Any]:
    """One dense forward over `tokens`, calling `visit(q, k, positions, spec)` on the host with
    each layer's queries [B, T, N, H] and keys [B, T, K, H] as they are attended, in layer
    order; returns what each call returned (one entry per layer)."""
    from efficient.attention.capabilities import CAPABILITIES
    from efficient.attention.dispatcher import register_implementation, unregister_implementation
    from efficient.attention.xla import xla_implementation
    from efficient.models.checks import check_model
    from efficient.models.forward import forward

    config = check_model(model, "visit_layers")
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] < 1:
        raise ValueError(f"tokens must be prompts [B, T], got shape {tuple(tokens.shape)}")
    found: list[Any] = []
    name = "sparse_prefill_visit"

    def record(q, view, *, spec, q_positions, **kwargs):  # noqa: ANN001, ANN202
        def host(q: np.ndarray, k: np.ndarray, positions: np.ndarray) -> None:
            found.append(visit(jnp.asarray(q), jnp.asarray(k), jnp.asarray(positions), spec))

        jax.debug.callback(host, q, view.k, q_positions, ordered=True)
        return xla_implementation(q, view, spec=spec, q_positions=q_positions, **kwargs)

    previous = getattr(model, "sparse_prefill", None)
    model.sparse_prefill = None  # the dense forward is the reference
    register_implementation(name, record, CAPABILITIES["xla"])
    try:
        forward(model, tokens, implementation=name, logits_indices=jnp.zeros((tokens.shape[0], 1), jnp.int32))
        jax.effects_barrier()
    finally:
        unregister_implementation(name)
        model.sparse_prefill = previous
    if len(found) != config.num_layers:
        raise RuntimeError(f"visit_layers: saw {len(found)} layers, expected {config.num_layers}")
    return found


def search_patterns(model: object, tokens: Int[Array, "B T"], density: float | Sequence[float], *,
                    block: int = 64, last_queries: int = 64, min_tokens: int = 1024
                    ) -> tuple[SparsePrefill, HeadSearch] | list[tuple[SparsePrefill, HeadSearch]]:
    """Each head's pattern from calibration prompts `tokens` [B, T] (MInference uses one):
    every candidate (`candidates()`) measured on them (recall and density averaged over rows), then `allocate`d so that the mean causal-block density
    over all heads is at most `density` where the sparsest candidates allow it (the sink block
    and local band alone are 3 blocks per query block: 9% at 4k, 5% at 8k in blocks of 64),
    heads with diffuse attention getting more blocks, heads with concentrated attention fewer.
    A sequence of densities shares the one measuring forward and returns one result each."""
    densities = [density] if isinstance(density, float | int) else list(density)
    for d in densities:
        if not isinstance(d, float | int) or isinstance(d, bool) or not 0.0 < d <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {d!r}")
    tried = candidates()
    found = visit_layers(model, tokens, lambda q, k, p, spec: search_layer(q, k, p, spec, tried, block,
                                                                           last_queries))
    recall = np.stack([r for r, _ in found])  # L N C
    dens = np.stack([d for _, d in found])
    layers, heads_per_layer, count = recall.shape
    results = []
    for d in densities:
        choice = allocate(recall.reshape(-1, count), dens.reshape(-1, count), float(d)).reshape(layers,
                                                                                              heads_per_layer)
        heads = tuple(tuple(tried[c] for c in row) for row in choice)
        pick = lambda x: np.take_along_axis(x, choice[..., None], -1)[..., 0]  # noqa: E731
        patterns = SparsePrefill(heads=heads, block=block, last_queries=last_queries, min_tokens=min_tokens)
        results.append((patterns, HeadSearch(pick(recall), pick(dens), recall, dens)))
    return results[0] if isinstance(density, float | int) else results


def measure_patterns(model: object, tokens: Int[Array, "1 T"], patterns: SparsePrefill | Sequence[SparsePrefill]
                     ) -> tuple[np.ndarray, np.ndarray] | list[tuple[np.ndarray, np.ndarray]]:
    """(recall, causal-block density), each [L, N], of `patterns` on the prompt `tokens` [1, T];
    a sequence of pattern sets shares the one forward and each layer's dense attention mass."""
    sets = [patterns] if isinstance(patterns, SparsePrefill) else list(patterns)
    layer = iter(range(model.config.num_layers))

    def one(q: jax.Array, k: jax.Array, positions: jax.Array, spec: AttentionSpec) -> list[tuple[np.ndarray, ...]]:
        i, masses, out = next(layer), {}, []
        for p_set in sets:
            kind, budget, budget2 = p_set.table()
            qx, kx, p = _padded(q, k, positions, p_set.block)
            if p_set.block not in masses:
                masses[p_set.block] = query_block_mass(qx, kx, p, p, spec=spec, block=p_set.block)
            index = sparse_layout(qx, kx, p, p, jnp.asarray(kind[i]), jnp.asarray(budget[i]),
                                  jnp.asarray(budget2[i]), spec=spec, block=p_set.block,
                                  last_queries=p_set.last_queries, max_budget=p_set.max_budgets())
            out.append((np.asarray(index_recall(masses[p_set.block], index, p))[0],
                        np.asarray(causal_density(index, p, p))[0]))
        return out

    found = visit_layers(model, tokens, one)
    results = [(np.stack([f[j][0] for f in found]), np.stack([f[j][1] for f in found])) for j in range(len(sets))]
    return results[0] if isinstance(patterns, SparsePrefill) else results


def save_patterns(path: str | Path, patterns: SparsePrefill, config: object, meta: dict[str, Any] | None = None
                  ) -> Path:
    """A JSON pattern file with the model's fingerprint (and `meta`: how it was searched)."""
    from efficient.train.distill import target_fingerprint

    body = {"target": target_fingerprint(config), "block": patterns.block, "last_queries": patterns.last_queries,
            "min_tokens": patterns.min_tokens,
            "heads": [[[p.kind, p.budget, p.budget2] for p in row] for row in patterns.heads], "meta": meta or {}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1))
    return path


def load_patterns(path: str | Path, config: object) -> SparsePrefill:
    """The patterns of `save_patterns`; a file made for another model is refused, naming the field."""
    from efficient.train.distill import check_fingerprint

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pattern file {str(path)!r} does not exist")
    body = json.loads(path.read_text())
    check_fingerprint(body.get("target", {}), config, f"sparse prefill patterns {str(path)!r}")
    heads = tuple(tuple(HeadPattern(kind, float(a), float(b)) for kind, a, b in row) for row in body["heads"])
    return SparsePrefill(heads=heads, block=int(body["block"]), last_queries=int(body["last_queries"]),
                         min_tokens=int(body["min_tokens"]))

