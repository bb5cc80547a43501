"""Checks of the arguments a model entry point receives, run before anything compiles.

    config = check_model(model, "forward")
    check_cache_matches(config, cache, batch, "forward")

`forward`, `generate` and `speculative_generate` call these first, so a wrong
argument (a config instead of a model, a cache built for another model, a cache
factory that returns too few slots, float positions) raises a typed error that
names the argument, its value and what was expected, instead of a silently wrong
output or a deep shape error from inside a compiled loop.

Cache checks are generic: a cache is compared on whatever it exposes among
`num_layers`, `num_kv_heads`, `head_dim`, `dtype`, `batch_size` and `capacity`
(a layout that does not expose one is not checked on it).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from efficient.cache.protocol import KVCache
from efficient.models.config import ModelConfig
from efficient.models.model import DecoderModel

__all__ = ["check_cache_factory", "check_cache_matches", "check_int_array", "check_logits_indices", "check_model",
           "check_positions", "check_sampling"]


def _is_concrete(x: object) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_model(model: object, caller: str) -> ModelConfig:
    """The config of `model`; TypeError unless it is a `DecoderModel` (a `ModelConfig`
    given in its place gets a hint)."""
    if isinstance(model, DecoderModel):
        return model.config
    hint = ""
    if isinstance(model, ModelConfig):
        hint = "; build one with LlamaModel(config, rngs=nnx.Rngs(0)) or load one with from_pretrained"
    raise TypeError(f"{caller}: model must be an efficient.models.DecoderModel (LlamaModel), got "
                    f"{type(model).__name__}{hint}")


def check_int_array(value: object, name: str, caller: str, rank: int | None = None) -> None:
    """TypeError unless `value` is a jax/numpy array of integers (a Python list is refused:
    its dtype would be guessed); ValueError if its rank is not `rank`."""
    if not isinstance(value, jax.Array | np.ndarray):
        raise TypeError(f"{caller}: {name} must be an integer jax or numpy array, got {type(value).__name__}"
                        + (" (wrap it with jnp.asarray)" if isinstance(value, list | tuple) else ""))
    if value.dtype == np.bool_ or not jnp.issubdtype(value.dtype, jnp.integer):
        raise TypeError(f"{caller}: {name} must hold integers, got dtype {value.dtype}")
    if rank is not None and value.ndim != rank:
        raise ValueError(f"{caller}: {name} must have rank {rank}, got shape {tuple(value.shape)}")


def check_positions(positions: object, config: ModelConfig, caller: str) -> None:
    """Integer dtype (a float array would be truncated); when concrete, every position
    below `config.max_position_embeddings` (dynamic-NTK RoPE excepted: it scales past it)."""
    check_int_array(positions, "positions", caller)
    if not _is_concrete(positions) or positions.size == 0 or config.rope.rope_type == "dynamic":
        return
    top = int(np.max(np.asarray(positions)))
    if top >= config.max_position_embeddings:
        raise ValueError(f"{caller}: positions reach {top}, past the model's max_position_embeddings "
                         f"{config.max_position_embeddings} (positions must be < it)")


def check_logits_indices(indices: object, batch: int, length: int, caller: str) -> None:
    """An integer array [batch, I] whose (concrete) entries lie in [0, length)."""
    check_int_array(indices, "logits_indices", caller, rank=2)
    if indices.shape[0] != batch:
        raise ValueError(f"{caller}: logits_indices must have shape [{batch}, I], got {tuple(indices.shape)}")
    if _is_concrete(indices) and indices.size:
        values = np.asarray(indices)
        if values.min() < 0 or values.max() >= length:
            raise ValueError(f"{caller}: logits_indices must lie in [0, {length}), got {values.tolist()}")


def _cache_dims(cache: object) -> dict[str, object]:
    """What `cache` exposes among the compared properties (missing ones are skipped)."""
    dims = {}
    for name in ("num_layers", "num_kv_heads", "head_dim", "dtype", "batch_size", "capacity"):
        try:
            value = getattr(cache, name)
        except (AttributeError, NotImplementedError):
            continue
        if value is not None:
            dims[name] = value
    return dims


def check_cache_matches(
    config: ModelConfig, cache: object, batch: int, caller: str, *, capacity: int | None = None
) -> None:
    """Raise unless `cache` fits a model of `config` run on `batch` rows.

    TypeError: not a KV cache. ValueError: its layers, KV heads or head size differ from
    the model's, its batch from `batch`, its dtype is not floating (it would round keys
    and values), or (with `capacity`) it holds fewer slots than were requested.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"{caller}: cache must be a KV cache (efficient.cache.KVCache: reserve, update, view, "
                        f"truncate, ...), got {type(cache).__name__}")
    dims = _cache_dims(cache)
    for name, label in (("num_layers", "layers"), ("num_kv_heads", "KV heads"), ("head_dim", "head size")):
        if name in dims and int(dims[name]) != getattr(config, name):
            raise ValueError(f"{caller}: cache has {label} ({name}) {dims[name]}, the model has "
                             f"{getattr(config, name)} (cache built for another model?)")
    if "dtype" in dims and not jnp.issubdtype(jnp.dtype(dims["dtype"]), jnp.floating):
        raise ValueError(f"{caller}: cache dtype {jnp.dtype(dims['dtype'])} is not a floating dtype: it would "
                         "round keys and values")
    if "batch_size" in dims and int(dims["batch_size"]) != batch:
        raise ValueError(f"{caller}: cache batch_size {dims['batch_size']} != batch size {batch} of the "
                         "tokens or prompts")
    if capacity is not None and "capacity" in dims and int(dims["capacity"]) < capacity:
        raise ValueError(f"{caller}: the cache factory returned a cache with capacity {dims['capacity']}, "
                         f"fewer than the {capacity} slots requested")


def check_cache_factory(factory: object, caller: str) -> None:
    """TypeError unless `factory` is None or a callable `(config, batch, capacity) -> cache`."""
    if factory is None or callable(factory):
        return
    hint = " (pass a factory, e.g. DenseKVCache.for_model, not a cache)" if isinstance(factory, KVCache) else ""
    raise TypeError(f"{caller}: cache must be a factory (config, batch, capacity) -> cache or None, got "
                    f"{type(factory).__name__}{hint}")


def check_sampling(rule: object, caller: str) -> None:
    """TypeError unless `rule` is a sampling rule (`Greedy()` or `Sample(...)`)."""
    from efficient.decoding.sampling import Greedy, Sample  # decoding imports models

    if not isinstance(rule, Greedy | Sample):
        raise TypeError(f"{caller}: sampling must be Greedy() or Sample(...) (efficient.decoding), got "
                        f"{type(rule).__name__} {rule!r}")

