"""Benchmark attention implementations: prefill TFLOP/s and decode GB/s, side by side.

Prefill FLOPs are 4·B·N·T·S·H (halved when causal), the backward pass 2.5x the
forward; decode bytes are the K and V read. Each figure is also given as a
fraction of the device's peak (table below) and of a copy bandwidth measured
in the same run. Peers from jax.experimental.pallas.ops run where their
hardware is. Writes results/bench_attention/<run>/{config.json, metrics.json,
bench_attention.png} and prints a table. See configs/bench_attention.py.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import efficient.attention.backends  # noqa: E402, F401  (registers pallas_tpu, cudnn)
from efficient.attention import DenseView, attention  # noqa: E402
from efficient.eval.timing import median_seconds  # noqa: E402
from experiments.common import write_run  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_attention.py")

# Dense bf16 peak FLOP/s per chip/GPU, by device-kind substring (None: unknown, e.g. CPU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "v4": 275e12, "v5 lite": 197e12,
              "v5e": 197e12, "v5p": 459e12, "v6": 918e12}


def peak_flops(kind: str) -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


def copy_bandwidth(mib: int, warmup: int, iters: int) -> float:
    """Bytes/s of reading and writing one array (x + 1)."""
    x = jnp.zeros((mib * 2**18,), jnp.float32)
    seconds = median_seconds(jax.jit(lambda a: a + 1.0), x, warmup=warmup, iters=iters)
    return 2 * x.nbytes / seconds


def _repeat_kv(k: jax.Array, n: int) -> jax.Array:
    return jnp.repeat(k, n // k.shape[2], axis=2)


def prefill_fn(name: str, causal: bool) -> Callable:
    """(q [B,T,N,H], k, v [B,S,K,H]) -> out; raises NotImplementedError where it cannot run."""
    backend = jax.default_backend()
    if name == "jax_ops_tpu_flash":
        if backend != "tpu":
            raise NotImplementedError("jax.experimental.pallas.ops.tpu.flash_attention needs a TPU")
        from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

        def fn(q, k, v):  # noqa: ANN001, ANN202  (no GQA: K/V repeated to N heads)
            t = lambda x: _repeat_kv(x, q.shape[2]).transpose(0, 2, 1, 3)  # noqa: E731
            return flash_attention(t(q), t(k), t(v), causal=causal, sm_scale=q.shape[-1] ** -0.5)

        return fn
    if name == "jax_ops_gpu_mha":
        if backend != "gpu":
            raise NotImplementedError("jax.experimental.pallas.ops.gpu.attention.mha needs a GPU")
        from jax.experimental.pallas.ops.gpu.attention import mha

        def fn(q, k, v):  # noqa: ANN001, ANN202
            n = q.shape[2]
            return mha(q, _repeat_kv(k, n), _repeat_kv(v, n), None, sm_scale=q.shape[-1] ** -0.5, causal=causal)

        return fn
    if name.startswith("jax_ops_"):
        raise NotImplementedError(f"{name} is not a prefill kernel")
    from efficient.attention import AttentionSpec

    return lambda q, k, v: attention(q, DenseView(k, v), spec=AttentionSpec(causal=causal), implementation=name)


def decode_fn(name: str) -> Callable:
    """(q [B,1,N,H], k, v) -> out; k/v [B,S,K,H] for jax's kernels, and for ours [B,K,S,H]
    with row lengths: the dense cache's view, read in place by the decode kernel."""
    if name == "jax_ops_gpu_decode":
        if jax.default_backend() != "gpu":
            raise NotImplementedError("jax.experimental.pallas.ops.gpu.decode_attention needs a GPU")
        from jax.experimental.pallas.ops.gpu.decode_attention import gqa

        return lambda q, k, v: gqa(q[:, 0], k, v)[:, None]
    if name.startswith("jax_ops_"):
        raise NotImplementedError(f"{name} is not a decode kernel")
    def fn(q, k, v):  # noqa: ANN001, ANN202
        lengths = jnp.full((k.shape[0],), k.shape[2], jnp.int32)
        return attention(q, DenseView(k, v, lengths=lengths, layout="BKSH"), implementation=name)

    return fn


def _measure(make: Callable, args: tuple, grad: bool, cfg) -> tuple[float | None, str]:  # noqa: ANN001
    try:
        fn = make()
        if grad:
            inner = fn
            fn = jax.grad(lambda q, k, v: inner(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))
        return median_seconds(jax.jit(fn), *args, warmup=cfg.warmup, iters=cfg.iters), "ok"
    except NotImplementedError as err:
        return None, f"skipped: {err}"


def run(cfg) -> dict:  # noqa: ANN001
    dtype = jnp.dtype(cfg.dtype)
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind)
    copy_bw = copy_bandwidth(cfg.copy_mib, cfg.warmup, cfg.iters)
    key = jax.random.PRNGKey(0)
    rows = []
    b, n, kh, h = cfg.batch, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    for length in cfg.prefill_lengths:
        q = jax.random.normal(key, (b, length, n, h), dtype)
        k = jax.random.normal(key, (b, length, kh, h), dtype)
        flops = 4 * b * n * length * length * h / (2 if cfg.causal else 1)
        for name in cfg.implementations:
            for phase, grad, work in (("fwd", False, flops), ("fwd+bwd", True, 3.5 * flops)):
                if grad and not cfg.backward:
                    continue
                seconds, status = _measure(lambda: prefill_fn(name, cfg.causal), (q, k, k), grad, cfg)
                tflops = None if seconds is None else work / seconds / 1e12
                rows.append(dict(kind="prefill", phase=phase, impl=name, length=length, seconds=seconds,
                                 status=status, tflops=tflops,
                                 frac_peak=None if tflops is None or peak is None else tflops * 1e12 / peak))
    for length in cfg.decode_lengths:
        q = jax.random.normal(key, (cfg.decode_batch, 1, n, h), dtype)
        k = jax.random.normal(key, (cfg.decode_batch, length, kh, h), dtype)
        nbytes = 2 * k.nbytes
        for name in cfg.implementations:
            kv = k if name.startswith("jax_ops_") else jnp.swapaxes(k, 1, 2)  # ours: the cache's layout
            seconds, status = _measure(lambda: decode_fn(name), (q, kv, kv), False, cfg)
            gbs = None if seconds is None else nbytes / seconds / 1e9
            rows.append(dict(kind="decode", phase="fwd", impl=name, length=length, seconds=seconds,
                             status=status, gbs=gbs, frac_copy=None if gbs is None else gbs * 1e9 / copy_bw))
    return dict(device=device.device_kind, backend=jax.default_backend(), peak_flops=peak,
                copy_bandwidth_gbs=copy_bw / 1e9, rows=rows)


def plot(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (kind, value, label) in zip(axes, (("prefill", "tflops", "TFLOP/s (fwd)"), ("decode", "gbs", "GB/s"))):
        rows = [r for r in metrics["rows"] if r["kind"] == kind and r["phase"] == "fwd" and r["seconds"]]
        for impl in sorted({r["impl"] for r in rows}):
            pts = sorted((r["length"], r[value]) for r in rows if r["impl"] == impl)
            ax.plot(*zip(*pts), marker="o", label=impl)
        if kind == "decode":
            ax.axhline(metrics["copy_bandwidth_gbs"], ls="--", c="gray", label="copy")
        ax.set(xscale="log", xlabel="sequence length", ylabel=label, title=f"{kind} on {metrics['device']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
    del argv
    cfg = _CONFIG.value
    metrics = run(cfg)
    run_dir = write_run(cfg, metrics)
    plot(metrics, run_dir / "bench_attention.png")
    print(f"{'kind':8} {'phase':8} {'impl':20} {'len':>7} {'ms':>9} {'TFLOP/s|GB/s':>13}  status")
    for r in metrics["rows"]:
        ms = "-" if r["seconds"] is None else f"{r['seconds'] * 1e3:9.3f}"
        val = r.get("tflops") if r["kind"] == "prefill" else r.get("gbs")
        val = "-" if val is None else f"{val:13.3f}"
        print(f"{r['kind']:8} {r['phase']:8} {r['impl']:20} {r['length']:7d} {ms:>9} {val:>13}  {r['status'][:60]}")
    print(f"copy bandwidth {metrics['copy_bandwidth_gbs']:.1f} GB/s; results in {run_dir}")


if __name__ == "__main__":
    app.run(main)
