"""Parameters on a mesh: Megatron-style tensor parallelism (Shoeybi et al., 2019).

Column-parallel: q/k/v projections and the MLP's gate/up split their output units
(heads, KV heads, hidden units) across "model"; row-parallel: o_proj and down_proj split
their input units, so each device's partial products are summed once per block (XLA
inserts the all-reduce). The embedding and an untied LM head are vocabulary-parallel.
Norms are replicated. Stacked layers keep their leading L axis unsplit.

    model = shard_model(from_pretrained("smollm2"), make_mesh(data=2, model=4))
    # or load straight into the shards:
    model = from_pretrained("smollm2", sharding=ModelSharding(mesh))

The model then carries its `ModelSharding` (a static attribute, so jitted functions of
a sharded model compile apart from those of an unsharded one), and `forward` places
sharding constraints on the hidden state at every layer boundary and on the cache.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from efficient.models.checks import check_model
from efficient.models.config import ModelConfig
from efficient.parallel.rules import AxisRules, ModelSharding

_KERNEL_AXES = {
    "q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"), "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"), "lm_head": ("embed", "vocab"),
}
_BIAS_AXES = {"q_proj": ("heads",), "k_proj": ("kv_heads",), "v_proj": ("kv_heads",),
              "gate_proj": ("mlp",), "up_proj": ("mlp",)}


def param_axes(path: tuple[object, ...], ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter at state `path` (e.g. ("layers", "self_attn",
    "q_proj", "kernel")) with `ndim` dimensions; leading extra dimensions are stacked
    layers. Unknown parameters (norm weights, ...) are replicated."""
    names = [str(p) for p in path]
    module, leaf = (names[-2], names[-1]) if len(names) >= 2 else ("", names[-1])
    if leaf == "embedding":
        base: tuple[str | None, ...] = ("vocab", "embed")
    elif leaf == "kernel" and module in _KERNEL_AXES:
        base = _KERNEL_AXES[module]
    elif leaf == "bias" and module in _BIAS_AXES:
        base = _BIAS_AXES[module]
    else:
        return (None,) * ndim
    if ndim < len(base):
        return (None,) * ndim
    return ("layers",) * (ndim - len(base)) + base


def param_units(config: ModelConfig) -> dict[str, int]:
    """Whole units per logical axis: a head is never split across devices."""
    return {"heads": config.num_heads, "kv_heads": config.num_kv_heads, "mlp": config.intermediate_size,
            "vocab": config.vocab_size}


def param_sharding(sharding: ModelSharding, config: ModelConfig, path: tuple[object, ...],
                   shape: tuple[int, ...]) -> jax.sharding.NamedSharding:
    return sharding.named(param_axes(path, len(shape)), shape, param_units(config))


def as_sharding(sharding: ModelSharding | jax.sharding.Mesh,
                rules: Mapping[str, str | None] | AxisRules | None = None) -> ModelSharding:
    """A `ModelSharding` from one, or from a mesh and rules (default: Megatron)."""
    if isinstance(sharding, ModelSharding):
        if rules is not None:
            raise ValueError("rules: pass them inside the ModelSharding, not beside it")
        return sharding
    return ModelSharding(sharding, AxisRules.of(rules))


def param_shardings(params: object, config: ModelConfig, sharding: ModelSharding) -> object:
    """A pytree like `params` (an nnx.State, concrete or abstract) of NamedShardings."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: param_sharding(sharding, config, _keys(path), tuple(x.shape)), params)


def place_params(params: object, config: ModelConfig, sharding: ModelSharding) -> object:
    """`params` moved to their shards (e.g. a training run's initial parameters)."""
    return jax.device_put(params, param_shardings(params, config, sharding))


def shard_model(model: nnx.Module, sharding: ModelSharding | jax.sharding.Mesh,
                rules: Mapping[str, str | None] | AxisRules | None = None) -> nnx.Module:
    """Move every parameter of `model` to its shards and attach the sharding (in place;
    returns `model`). Each device then holds its slice only, once the caller drops other
    references to the unsharded arrays."""
    config = check_model(model, "shard_model")
    sharding = as_sharding(sharding, rules)
    nnx.update(model, place_params(nnx.state(model, nnx.Param), config, sharding))
    model.sharding = sharding
    return model


def _keys(path: tuple[object, ...]) -> tuple[object, ...]:
    """Attribute names / indices of a pytree key path (GetAttrKey, DictKey, SequenceKey)."""
    out = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                out.append(getattr(key, attr))
                break
    return tuple(o for o in out if o != "value")


def device_bytes(tree: object) -> dict[jax.Device, int]:
    """Bytes each device holds of the arrays in `tree` (its shards, replicas counted on
    every device that holds them)."""
    held: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + int(np.prod(shard.data.shape)) * leaf.dtype.itemsize
    return held
