"""Perplexity and bits per byte over held-out `EvalWindows`, through any KV cache.

    windows = select_windows(eval_windows(docs, tokenizer, 512), tokenizer, max_windows=16)
    result = perplexity(model, windows, cache=DenseKVCache.for_model, chunk=128)
    result.bits_per_byte

With a cache factory, each window is prefilled through the cache in chunks of
`chunk` tokens and every chunk's logits are scored, so a lossy cache (evicting,
quantized, ...) is measured on what it keeps: tokens of chunk c attend to the
cache's version of chunks < c. With `cache=None` each window is one cacheless
forward (the exact reference). bits/byte = summed NLL (nats) / ln 2 / bytes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from efficient.cache.protocol import KVCache
from efficient.data import EvalWindows, Tokenizer
from efficient.models import LlamaModel, ModelConfig, forward

CacheFactory = Callable[[ModelConfig, int, int], KVCache]
Progress = Callable[[int, int], None]  # (windows done, windows in all)


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Summed NLL (nats) over `tokens` scored targets that stand for `bytes` UTF-8 bytes."""

    nll: float
    tokens: int
    bytes: int

    @property
    def nats_per_token(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2.0) / self.bytes if self.bytes else math.nan

    def as_dict(self) -> dict[str, float]:
        return dict(nll=self.nll, tokens=self.tokens, bytes=self.bytes, nats_per_token=self.nats_per_token,
                    perplexity=self.perplexity, bits_per_byte=self.bits_per_byte)


def select_windows(windows: EvalWindows, tokenizer: Tokenizer, max_windows: int = 0) -> EvalWindows:
    """All windows (max_windows=0), or `max_windows` evenly spaced ones; the bytes of a
    subset are counted with `tokenizer.num_bytes` over its scored targets."""
    if not isinstance(max_windows, int | np.integer) or max_windows < 0:
        raise ValueError(f"max_windows: expected an int >= 0, got {max_windows!r}")
    count = len(windows.tokens)
    if max_windows == 0 or max_windows >= count:
        return windows
    keep = np.unique(np.linspace(0, count - 1, max_windows).round().astype(np.int64))
    tokens, mask = windows.tokens[keep], windows.mask[keep]
    num_bytes = int(tokenizer.num_bytes(tokens[:, 1:][mask].tolist()))
    return EvalWindows(tokens=tokens, mask=mask, num_tokens=int(mask.sum()), num_bytes=num_bytes)


def _masked_nll(logits: Float[Array, "B T V"], targets: Int[Array, "B T"], mask: Bool[Array, "B T"]) -> Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, nll, 0.0))


@jax.jit(static_argnums=(0, 1))
def _window_nll(graphdef: nnx.GraphDef, implementation: object, params: nnx.State, inputs: Array,
                targets: Array, mask: Array) -> Array:
    logits, _ = forward(nnx.merge(graphdef, params), inputs, implementation=implementation)
    return _masked_nll(logits, targets, mask)


@jax.jit(static_argnums=(0, 1), donate_argnums=3)
def _chunk_nll(graphdef: nnx.GraphDef, implementation: object, params: nnx.State, cache: KVCache,
               inputs: Array, targets: Array, mask: Array, start: Array) -> tuple[Array, KVCache]:
    b, c = inputs.shape
    positions = jnp.broadcast_to(start + jnp.arange(c, dtype=jnp.int32)[None, :], (b, c))
    logits, cache = forward(nnx.merge(graphdef, params), inputs, positions=positions, cache=cache,
                            implementation=implementation)
    return _masked_nll(logits, targets, mask), cache


def perplexity(
    model: LlamaModel,
    windows: EvalWindows,
    *,
    cache: CacheFactory | None = None,
    chunk: int = 128,
    batch_size: int = 8,
    implementation: str | tuple[str, ...] | None = None,
    progress: Progress | None = None,
) -> PerplexityResult:
    """Summed NLL of every scored target of `windows` under `model`.

    cache: a factory `(config, batch, capacity) -> KVCache`; each batch of windows
        is prefilled through a fresh cache of capacity T, `chunk` tokens at a time.
        None: one cacheless forward per window (`chunk` unused).
    """
    config = model.config
    tokens, mask = np.asarray(windows.tokens), np.asarray(windows.mask)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or mask.shape != (tokens.shape[0], tokens.shape[1] - 1):
        raise ValueError(f"windows: expected tokens [W, T+1] and mask [W, T], got {tokens.shape} and {mask.shape}")
    seq_len = tokens.shape[1] - 1
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"windows: length {seq_len} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    for name, value in (("chunk", chunk), ("batch_size", batch_size)):
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    graphdef, params = nnx.split(model)
    total, count, done = 0.0, 0, 0
    for batch_tokens, batch_mask in windows.batches(batch_size):
        inputs, targets = jnp.asarray(batch_tokens[:, :-1]), jnp.asarray(batch_tokens[:, 1:])
        if cache is None:
            total += float(_window_nll(graphdef, implementation, params, inputs, targets, jnp.asarray(batch_mask)))
        else:
            kv = cache(config, batch_size, seq_len)
            for s in range(0, seq_len, chunk):
                e = min(s + chunk, seq_len)
                nll, kv = _chunk_nll(graphdef, implementation, params, kv, inputs[:, s:e], targets[:, s:e],
                                     jnp.asarray(batch_mask[:, s:e]), jnp.int32(s))
                total += float(nll)
        count += int(batch_mask.sum())
        done = min(done + batch_size, len(tokens))
        if progress is not None:
            progress(done, len(tokens))
    return PerplexityResult(nll=total, tokens=count, bytes=int(windows.num_bytes))
