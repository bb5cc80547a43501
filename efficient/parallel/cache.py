"""Caches on a mesh: every array field split by batch ("data") and KV heads ("model").

A cache field's axes are read from its jaxtyping annotation, whose letters are the
DESIGN's axis letters (`k: Float[Array, "L B K S H"]`): B is the batch, K the KV heads,
N the query heads; other axes stay whole. So every cache layout (dense, ring, paged,
quantized, evicting, Quest, hybrid: nested caches are followed) is sharded by the same
rule, with no per-cache code; a field without an annotation is replicated. A dimension
the mesh axis does not divide is replicated (3 KV heads on a model axis of 2).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable

import jax

from efficient.parallel.rules import ModelSharding

_LETTERS = {"B": "batch", "K": "kv_heads", "N": "heads"}


@functools.cache
def _field_dims(cls: type) -> dict[str, tuple[str, ...]]:
    """Field name -> the dimension strings of its annotation (one per array form: a stacked
    "L B K S H" and a per-layer tuple of "B K S H")."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: replicate the fields
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for name, hint in hints.items():
        found: list[str] = []
        stack = [hint]
        while stack:
            h = stack.pop()
            dims = getattr(h, "dim_str", None)
            if isinstance(dims, str):
                found.append(dims)
            stack.extend(typing.get_args(h))
        out[name] = tuple(found)
    return out


def _leaf_axes(cache: object, path: tuple, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the leaf at `path` in `cache`, from the field annotation of the
    innermost dataclass on the path whose rank matches."""
    owner, field, node = None, None, cache
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            if dataclasses.is_dataclass(node):
                owner, field = type(node), key.name
            node = getattr(node, key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            node = node[key.idx]
        elif isinstance(key, jax.tree_util.DictKey):
            node = node[key.key]
        else:  # a flattened index (a custom pytree): the field is unknown
            return (None,) * ndim
    if owner is None:
        return (None,) * ndim
    for dims in _field_dims(owner).get(field, ()):
        letters = dims.split()
        if len(letters) == ndim:
            return tuple(_LETTERS.get(letter) for letter in letters)
    return (None,) * ndim


def cache_shardings(cache: object, sharding: ModelSharding) -> object:
    """A pytree like `cache` (concrete or abstract) of each leaf's NamedSharding."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(cache)
    return jax.tree_util.tree_unflatten(treedef, [
        sharding.named(_leaf_axes(cache, path, leaf.ndim), tuple(leaf.shape)) for path, leaf in leaves])


def constrain_cache(cache: object, sharding: ModelSharding) -> object:
    """`cache` with a sharding constraint on every field (inside jit)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.lax.with_sharding_constraint(
            x, sharding.named(_leaf_axes(cache, path, x.ndim), tuple(x.shape))), cache)


def shard_cache(cache: object, sharding: ModelSharding) -> object:
    """`cache` moved to its shards (outside jit)."""
    return jax.device_put(cache, cache_shardings(cache, sharding))


def build_cache(factory: Callable[..., object], config: object, batch: int, capacity: int,
                sharding: ModelSharding | None) -> object:
    """`factory(config, batch, capacity)`, built directly in its shards when `sharding` is
    given (compiled with the shardings as outputs: no device ever holds the whole cache)."""
    if sharding is None:
        return factory(config, batch, capacity)
    abstract = jax.eval_shape(lambda: factory(config, batch, capacity))
    return jax.jit(lambda: factory(config, batch, capacity), out_shardings=cache_shardings(abstract, sharding))()
