"""Benchmark blockwise vs materialised XLA attention vs torch SDPA on CPU.

    python -m experiments.bench_blockwise [--repeats 5] [--quick]

SmolLM2-135M attention shapes (B=1, N=9, K=3, H=64), float32 and bfloat16:
causal prefill T=S in {512, 2048, 4096, 8192} (materialised path skipped where
its logits and probabilities would need > 4 GB), decode T=1 into a cache of
capacity S=8192 holding L in {256, 4096, 8192} tokens, and a small-size sweep
that sets `prefers_blockwise`. Everything is jitted and warmed up; repeats are
interleaved across implementations and the median is reported. Torch runs
`scaled_dot_product_attention` with 2 threads on the L valid tokens (what a
growing torch cache does). Writes results/bench_blockwise/metrics.json.
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch: spin-waiting threads starve a shared CPU

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from efficient.attention.blockwise import attention_blockwise  # noqa: E402
from efficient.attention.xla import attention_xla  # noqa: E402

B, N, K, H = 1, 9, 3, 64
MATERIALISED_LIMIT = 4 * 2**30  # bytes of float32 logits + probabilities
DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}


def _inputs(t: int, s: int, dtype: str, seed: int = 0) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    make = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(DTYPES[dtype][0])  # noqa: E731
    return make(B, t, N, H), make(B, s, K, H), make(B, s, K, H)


def _torch(x: jax.Array, dtype: str) -> torch.Tensor:
    """[B, L, heads, H] jax -> [B, heads, L, H] torch (contiguous)."""
    return torch.from_numpy(np.array(x.astype(jnp.float32))).to(DTYPES[dtype][1]).transpose(1, 2).contiguous()


def _interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per function; one warm-up each, then `repeats` rounds, one call per function."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _jax_call(fn: Callable, *args: jax.Array) -> Callable[[], object]:
    jitted = jax.jit(fn)
    return lambda: jax.block_until_ready(jitted(*args))


def prefill_case(t: int, dtype: str, repeats: int, materialised: bool = True) -> dict[str, float]:
    q, k, v = _inputs(t, t, dtype)
    fns = {"blockwise": _jax_call(lambda q, k, v: attention_blockwise(q, k, v), q, k, v)}
    if materialised and 2 * B * N * t * t * 4 <= MATERIALISED_LIMIT:
        fns["xla"] = _jax_call(lambda q, k, v: attention_xla(q, k, v), q, k, v)
    tq, tk, tv = (_torch(x, dtype) for x in (q, k, v))

    def torch_fn() -> torch.Tensor:
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)

    if materialised:
        fns["torch"] = torch_fn
    return _interleaved_medians(fns, repeats)


def decode_case(s: int, length: int, dtype: str, repeats: int, torch_too: bool = True) -> dict[str, float]:
    q, k, v = _inputs(1, s, dtype)
    slot = jnp.arange(s, dtype=jnp.int32)
    kv_pos = jnp.where(slot < length, slot, -1)[None]
    q_pos = jnp.full((B, 1), length - 1, jnp.int32)
    lengths = jnp.full((B,), length, jnp.int32)
    fns = {
        "blockwise": _jax_call(
            lambda q, k, v, qp, kp, ln: attention_blockwise(q, k, v, q_positions=qp, kv_positions=kp, lengths=ln),
            q, k, v, q_pos, kv_pos, lengths),
        "xla": _jax_call(lambda q, k, v, qp, kp: attention_xla(q, k, v, q_positions=qp, kv_positions=kp),
                         q, k, v, q_pos, kv_pos),
    }
    if torch_too:
        tq, tk, tv = _torch(q, dtype), _torch(k[:, :length], dtype), _torch(v[:, :length], dtype)

        def torch_fn() -> torch.Tensor:
            with torch.no_grad():
                return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)

        fns["torch"] = torch_fn
    return _interleaved_medians(fns, repeats)


def _row(kind: str, dtype: str, t: int, s: int, length: int, ms: dict[str, float]) -> dict:
    row = dict(kind=kind, dtype=dtype, T=t, S=s, L=length, ms={n: round(x * 1e3, 3) for n, x in ms.items()})
    for other in ("xla", "torch"):
        if other in ms:
            row[f"{other}_over_blockwise"] = round(ms[other] / ms["blockwise"], 3)
    print(f"{kind:8s} {dtype:8s} T={t:5d} S={s:5d} L={length:5d}  "
          + "  ".join(f"{n} {x * 1e3:9.2f} ms" for n, x in ms.items())
          + "  " + "  ".join(f"{k}={v}" for k, v in row.items() if k.endswith("_over_blockwise")), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="skip T=S=8192 and the threshold sweep")
    parser.add_argument("--out", default="results/bench_blockwise/metrics.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for dtype in DTYPES:
        for t in (512, 2048, 4096) + (() if args.quick else (8192,)):
            rows.append(_row("prefill", dtype, t, t, t, prefill_case(t, dtype, args.repeats if t < 8192 else 3)))
        for length in (256, 4096, 8192):
            rows.append(_row("decode", dtype, 1, 8192, length, decode_case(8192, length, dtype, 4 * args.repeats)))
    if not args.quick:  # where does blockwise start to win? (float32; bfloat16 behaves alike)
        for t in (64, 128, 256, 384, 512, 1024):
            ms = prefill_case(t, "float32", 2 * args.repeats)
            rows.append(_row("sweep", "float32", t, t, t, ms))
        for s in (256, 1024, 2048, 4096):
            rows.append(_row("sweep", "float32", 1, s, s, decode_case(s, s, "float32", 4 * args.repeats, False)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics = dict(
        machine=dict(processor=platform.processor(), machine=platform.machine(), cpu_count=os.cpu_count(),
                     jax=jax.__version__, torch=torch.__version__, torch_threads=torch.get_num_threads(),
                     load_average=os.getloadavg()),
        shapes=dict(B=B, N=N, K=K, H=H),
        note="medians of interleaved repeats after a warm-up; torch decode attends the L valid tokens only",
        rows=rows,
    )
    out.write_text(json.dumps(metrics, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
