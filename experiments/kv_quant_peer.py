"""The peer for our quantized KV caches: transformers' `QuantizedCache` (KIVI-style, optimum-quanto
or HQQ backend), scored in bits/byte exactly as `efficient.eval.perplexity(model, windows,
cache=factory, chunk=C)` scores ours.

    from experiments.kv_quant_peer import transformers_cache_bits_per_byte
    row = transformers_cache_bits_per_byte("smollm2", windows, chunk=128, nbits=2)
    row["bits_per_byte"]

Each window of `windows` (an `EvalWindows`, built with our tokenizer and data classes so both
sides score the same tokens and divide by the same bytes) is prefilled through a fresh cache,
`chunk` tokens at a time, with the cache passed as the model's `cache` (`past_key_values` before
transformers 5.24); every chunk's logits are scored against the window's masked targets and the
summed NLL (nats) / ln 2 / `windows.num_bytes` is the bits/byte. nbits=None uses `DynamicCache`:
the float control, which must agree with our dense cache.

transformers' quantized layer (`QuantizedLayer.update`): the first chunk is quantized into the
cache and attends to its own float keys; each later chunk attends to [dequantized states,
float residual, its own float states], and when residual + chunk >= residual_length everything
is re-quantized (from the dequantized old states) and the residual emptied. With quanto,
axis 0 groups `q_group_size` contiguous elements of the [batch, kv heads, tokens, head_dim]
tensor: with head_dim == q_group_size (SmolLM2: 64) one asymmetric min/max scale and shift per
token and head, for keys and values alike (not KIVI's per-channel keys).

The optional dependency (not imported by the library): `optimum-quanto>=0.2.5` (transformers
refuses older); on CPU its first use JIT-compiles a small C++ extension (`quanto_cpp`, needs a
C++ compiler and ninja) into its own package folder, about a minute once.

    python -m experiments.kv_quant_peer [--model smollm2] [--seq-len 1024] [--windows 4] [--chunk 128]
        [--threads 2] [--out results/kv_quant_peer/metrics.json]
prints the dense (ours), DynamicCache, 2-bit and 4-bit rows.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from efficient.data import EvalWindows
from efficient.models import resolve_model_path

QUANTO_DEFAULTS = dict(axis_key=0, axis_value=0, group_size=64, residual_length=128)  # transformers' defaults


@functools.lru_cache(maxsize=1)
def _peer_model(path: Path, dtype: str, threads: int) -> Any:
    """bench_peer's transformers loader (GGUF file or HF folder, torch CPU); the last one is kept
    so that several rows on one model load it once."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
    from experiments.bench_peer import Transformers

    return Transformers(path, dtype, threads)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def transformers_cache_bits_per_byte(
    model_path: str | os.PathLike[str],
    windows: EvalWindows,
    *,
    chunk: int,
    nbits: int | None,
    backend: str = "quanto",
    residual_length: int = QUANTO_DEFAULTS["residual_length"],
    group_size: int = QUANTO_DEFAULTS["group_size"],
    axis_key: int = QUANTO_DEFAULTS["axis_key"],
    axis_value: int = QUANTO_DEFAULTS["axis_value"],
    dtype: str = "float32",
    threads: int = 2,
) -> dict[str, Any]:
    """Bits/byte of `windows` under transformers on `model_path` (a packaged name such as
    "smollm2", a .gguf file or an HF folder), each window prefilled `chunk` tokens at a time
    through a fresh `QuantizedCache(backend, nbits, ...)`, or a `DynamicCache` if nbits is None.

    Returns bits_per_byte, nll (nats), tokens (scored targets), bytes, nats_per_token,
    perplexity, seconds (the scoring loop), load_seconds and settings (what the cache was built
    with, read back from its layers, plus the versions).
    """
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    tokens, mask = np.asarray(windows.tokens), np.asarray(windows.mask)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or mask.shape != (tokens.shape[0], tokens.shape[1] - 1):
        raise ValueError(f"windows: expected tokens [W, T+1] and mask [W, T], got {tokens.shape} and {mask.shape}")
    start = time.perf_counter()
    peer = _peer_model(resolve_model_path(model_path), dtype, threads)
    load_seconds = time.perf_counter() - start
    torch, model = peer.torch, peer.model
    import transformers

    # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def fresh_cache() -> Any:
        if nbits is None:
            return transformers.DynamicCache(config=model.config)
        return transformers.QuantizedCache(backend=backend, config=model.config, nbits=nbits, axis_key=axis_key,
                                           axis_value=axis_value, q_group_size=group_size,
                                           residual_length=residual_length)

    total, count, cache = 0.0, 0, None
    start = time.perf_counter()
    with torch.inference_mode():
        for window, window_mask in zip(tokens, mask, strict=True):
            inputs = torch.as_tensor(window[None, :-1], dtype=torch.long)
            targets = torch.as_tensor(window[None, 1:], dtype=torch.long)
            keep = torch.as_tensor(window_mask[None])
            cache = fresh_cache()
            for s in range(0, inputs.shape[1], chunk):
                e = min(s + chunk, inputs.shape[1])
                logits = model(input_ids=inputs[:, s:e], use_cache=True, **{cache_arg: cache}).logits
                logp = torch.log_softmax(logits.float(), dim=-1)
                nll = -logp.gather(-1, targets[:, s:e, None])[..., 0]
                total += float(torch.where(keep[:, s:e], nll, 0.0).sum())
            count += int(window_mask.sum())
    seconds = time.perf_counter() - start

    settings: dict[str, Any] = dict(cache=type(cache).__name__ if cache is not None else None, chunk=chunk,
                                    dtype=dtype, threads=threads, nbits=nbits, cache_argument=cache_arg,
                                    attn_implementation=getattr(model.config, "_attn_implementation", None),
                                    torch=_version("torch"), transformers=_version("transformers"))
    if nbits is not None:
        layer = cache.layers[0] if cache is not None else None
        settings.update(backend=backend, layer=type(layer).__name__ if layer is not None else None,
                        **{name: getattr(layer, name, None) for name in
                           ("nbits", "axis_key", "axis_value", "q_group_size", "residual_length")})
        settings["optimizer"] = type(getattr(layer, "optimizer", None)).__name__ if backend == "quanto" else None
        settings[backend] = _version("optimum-quanto" if backend == "quanto" else backend)
    nbytes = int(windows.num_bytes)
    return dict(bits_per_byte=total / math.log(2.0) / nbytes if nbytes else math.nan, nll=total, tokens=count,
                bytes=nbytes, nats_per_token=total / max(count, 1), perplexity=math.exp(total / max(count, 1)),
                seconds=seconds, load_seconds=load_seconds, settings=settings)


def measure(model: str = "smollm2", *, seq_len: int = 1024, max_windows: int = 4, chunk: int = 128,
            threads: int = 2, bits: tuple[int, ...] = (2, 4), log: Any = print) -> dict[str, Any]:
    """Ours (dense cache) and transformers' DynamicCache and quanto rows on the same held-out
    stdlib windows (the quickstart's corpus: the test split of the stdlib's .py files)."""
    from efficient.cache import DenseKVCache
    from efficient.data import eval_windows
    from efficient.eval import perplexity, select_windows
    from experiments.common import load_documents, load_model, load_tokenizer_for

    ours = load_model(model, dtype="float32")
    tokenizer = load_tokenizer_for(model, "auto", ours.config.vocab_size)
    documents = load_documents("stdlib", (".py",), "test")
    windows = select_windows(eval_windows(documents, tokenizer, seq_len), tokenizer, max_windows)
    log(f"{len(windows.tokens)} windows of {seq_len} tokens: {int(windows.mask.sum())} targets, "
        f"{windows.num_bytes} bytes")
    rows = []
    start = time.perf_counter()
    dense = perplexity(ours, windows, cache=DenseKVCache.for_model, chunk=chunk, batch_size=1)
    rows.append(dict(side="efficient", cache="DenseKVCache", nbits=None, **dense.as_dict(),
                     seconds=time.perf_counter() - start))
    log(f"ours dense: {dense.bits_per_byte:.5f} bits/byte ({rows[-1]['seconds']:.1f} s, compile included)")
    del ours
    for nbits in (None, *bits):
        row = transformers_cache_bits_per_byte(model, windows, chunk=chunk, nbits=nbits, threads=threads)
        rows.append(dict(side="transformers", cache=row["settings"]["cache"], nbits=nbits, **row))
        log(f"transformers {row['settings']['cache']} nbits={nbits}: {row['bits_per_byte']:.5f} bits/byte "
            f"({row['seconds']:.1f} s, load {row['load_seconds']:.1f} s)")
    control = rows[1]["bits_per_byte"]
    return dict(model=str(resolve_model_path(model)), seq_len=seq_len, windows=len(windows.tokens), chunk=chunk,
                rows=rows, control_minus_ours=control - dense.bits_per_byte,
                control_relative_difference=(control - dense.bits_per_byte) / dense.bits_per_byte)


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    metrics = measure(args.model, seq_len=args.seq_len, max_windows=args.windows, chunk=args.chunk,
                      threads=args.threads)
    print(f"control - ours: {metrics['control_minus_ours']:+.2e} bits/byte "
          f"({metrics['control_relative_difference']:+.2e} relative)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
