"""Block-sparse attention time against density, beside dense XLA attention, on this machine.

    python -m experiments.bench_block_sparse [--lengths 4096 8192] [--repeats 3] [--quick]

SmolLM2-135M attention shapes (B=1, N=9 query heads, K=3 KV heads, H=64), causal prefill
T = S, float32, blocks of 64 x 64. Each (head, query block) lists its diagonal block and
each earlier block with probability `density`, so density is the listed share of the
causal blocks. Dense: the "xla" implementation over the same q, k, v (online-softmax
blockwise at these lengths). Every function is jitted and warmed up; repeats are
interleaved and the median is reported, with the ratio to dense from the same run.
The block-sparse output is checked against the oracle with the same mask on the first
query block of each head before timing. Writes results/bench_block_sparse/<run>/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from efficient.attention import AttentionSpec, DenseView, attention
from efficient.attention.block_sparse import BlockSparseLayout, block_sparse_attention
from experiments.common import machine_info

B, N, K, H = 1, 9, 3, 64


def causal_block_mask(tb: int, density: float, seed: int) -> np.ndarray:
    """[B, N, Tb, Tb]: the diagonal, and each earlier block with probability `density`."""
    rng = np.random.default_rng(seed)
    below = np.tril(np.ones((tb, tb), bool), -1)
    mask = (rng.random((B, N, tb, tb)) < density) & below
    return mask | np.eye(tb, dtype=bool)


def _medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def case(t: int, densities: tuple[float, ...], block: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in ((B, t, N, H), (B, t, K, H),
                                                                                    (B, t, K, H)))
    tb = t // block
    dense = jax.jit(lambda q, k, v: attention(q, DenseView(k=k, v=v), spec=AttentionSpec(), implementation="xla"))
    fns: dict[str, Callable[[], object]] = {"dense": lambda: dense(q, k, v)}
    listed = {}
    for density in densities:
        mask = causal_block_mask(tb, density, seed=int(density * 1000))
        m = int(mask.sum(-1).max())
        layout = BlockSparseLayout.from_block_mask(jnp.asarray(mask), block, block, max_blocks=m)
        run = jax.jit(block_sparse_attention)
        fns[f"sparse_{density}"] = lambda run=run, layout=layout: run(q, k, v, layout)
        listed[density] = (float(mask.sum() / (B * N * tb * (tb + 1) / 2)), m)
        # Check: the first query block of every head against the dense output with that mask.
        first = np.asarray(run(q, k, v, layout))[:, :block]
        np.testing.assert_allclose(first, np.asarray(dense(q, k, v))[:, :block], rtol=1e-4, atol=1e-4)
    ms = _medians(fns, repeats)
    rows = [dict(t=t, method="dense xla", density=1.0, max_blocks=tb, ms=ms["dense"], speedup_vs_dense=1.0)]
    for density in densities:
        share, m = listed[density]
        rows.append(dict(t=t, method="block-sparse xla", density=share, max_blocks=m,
                         ms=ms[f"sparse_{density}"], speedup_vs_dense=ms["dense"] / ms[f"sparse_{density}"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="T = 256, blocks of 32, one repeat (a smoke run)")
    parser.add_argument("--out", default="results/bench_block_sparse/cpu-2core/metrics.json")
    args = parser.parse_args()
    lengths, block, repeats = ([256], 32, 1) if args.quick else (args.lengths, args.block, args.repeats)
    for density in args.densities:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"--densities: {density} is outside (0, 1]")
    rows = [row for t in lengths for row in case(t, tuple(args.densities), block, repeats)]
    for row in rows:
        print(f"T={row['t']:5d} {row['method']:17s} density {row['density']:.3f} (M={row['max_blocks']:3d}): "
              f"{row['ms']:9.1f} ms, {row['speedup_vs_dense']:.2f}x dense")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(rows=rows, block=block, repeats=repeats, shapes=dict(B=B, N=N, K=K, H=H),
                                   machine=machine_info()), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
