"""One matmul per (shape, dtype), jax on XLA:CPU against torch, interleaved repetitions,
medians (`configs/bench_cpu_matmul.py`). Also reads the compiled HLO: whether XLA kept
the dot in bfloat16 or converted its operands to float32 first (XLA:CPU's float
normalisation does so where the backend has no bfloat16 dot). Writes
results/bench_cpu_matmul/<run>/{config.json, metrics.json} and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting threads starve a shared CPU

import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments.common import machine_info, write_run  # noqa: E402

DTYPES = ("float32", "bfloat16")


def dot_dtype_in_hlo(compiled_text: str) -> str:
    """The element type XLA:CPU's optimised HLO runs the dot in ("f32", "bf16", ...)."""
    found = re.search(r"= (\w+)\[[\d,]*\]\{[\d,]*\} dot\(", compiled_text)
    if found is None:
        raise ValueError("no dot instruction in the compiled HLO")
    return found.group(1)


def _median_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up (and compile)
        fn()
    for _ in range(repeats):  # interleaved
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def run(config: Any) -> dict:
    for dtype in config.dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"config.dtypes: {dtype!r} is not one of {DTYPES}")
    if config.peer not in ("transformers", "none"):
        raise ValueError(f"config.peer must be 'transformers' or 'none', got {config.peer!r}")
    torch = None
    if config.peer == "transformers":
        import torch

        torch.set_num_threads(config.threads)
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n in config.shapes:
        x32 = rng.standard_normal((m, k)).astype(np.float32)
        w32 = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        for dtype in config.dtypes:
            x, w = jnp.asarray(x32, dtype), jnp.asarray(w32, dtype)
            matmul = jax.jit(jnp.matmul)
            fns: dict[str, Callable[[], Any]] = {"jax": lambda: matmul(x, w).block_until_ready()}
            if torch is not None:
                tx, tw = torch.from_numpy(x32).to(getattr(torch, dtype)), torch.from_numpy(w32).to(getattr(torch, dtype))
                fns["torch"] = lambda: torch.matmul(tx, tw)
            ms = _median_ms(fns, config.repeats)
            gflop = 2 * m * k * n / 1e9
            row = dict(m=m, k=k, n=n, dtype=dtype, jax_ms=ms["jax"], jax_gflops=gflop / ms["jax"] * 1e3,
                       xla_dot_dtype=dot_dtype_in_hlo(matmul.lower(x, w).compile().as_text()))
            if torch is not None:
                row.update(torch_ms=ms["torch"], torch_gflops=gflop / ms["torch"] * 1e3,
                           torch_over_jax=ms["jax"] / ms["torch"])
            rows.append(row)
            print(f"{m}x{k}x{n} {dtype:9s} jax {row['jax_gflops']:6.0f} GFLOP/s (XLA dot in {row['xla_dot_dtype']})"
                  + (f"  torch {row['torch_gflops']:6.0f} GFLOP/s" if torch is not None else ""), flush=True)
    return dict(rows=rows, machine=machine_info(), xla_flags=os.environ.get("XLA_FLAGS", ""))


_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_cpu_matmul.py")


def main(argv: list[str]) -> None:
    del argv
    out = write_run(_CONFIG.value, run(_CONFIG.value))
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
