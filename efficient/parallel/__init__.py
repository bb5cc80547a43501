"""Past one device with jax.sharding: a named mesh, logical-axis rules, sharded parameters
and caches (so `generate` and speculative decoding run unchanged under a mesh), and
sequence-parallel attention (ring attention, DeepSpeed-Ulysses) under `shard_map`."""

from efficient.parallel.cache import build_cache, cache_shardings, constrain_cache, shard_cache
from efficient.parallel.mesh import MESH_AXES, make_mesh, mesh_shape
from efficient.parallel.params import (
    device_bytes,
    param_axes,
    param_sharding,
    param_shardings,
    place_params,
    shard_model,
)
from efficient.parallel.rules import DEFAULT_RULES, FSDP_RULES, LOGICAL_AXES, NAMED_RULES, AxisRules, ModelSharding

__all__ = [
    "DEFAULT_RULES",
    "FSDP_RULES",
    "LOGICAL_AXES",
    "MESH_AXES",
    "NAMED_RULES",
    "AxisRules",
    "ModelSharding",
    "build_cache",
    "cache_shardings",
    "constrain_cache",
    "device_bytes",
    "make_mesh",
    "mesh_shape",
    "param_axes",
    "param_sharding",
    "param_shardings",
    "place_params",
    "shard_cache",
    "shard_model",
]

from efficient.parallel.ring_attention import inverse_order, ring_attention, ring_work, zigzag_order  # noqa: E402
from efficient.parallel.ulysses import ulysses_attention  # noqa: E402

__all__ += ["inverse_order", "ring_attention", "ulysses_attention", "ring_work", "zigzag_order"]
from efficient.parallel.distributed import initialize_distributed  # noqa: E402

__all__ += ["initialize_distributed"]
