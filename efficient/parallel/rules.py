"""Logical axes to mesh axes: which dimension of which array is split across which devices.

Every array is described by logical axis names (the DESIGN's axis letters spelled out):
"batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers",
"slots". `AxisRules` maps each to a mesh axis or None (replicated). The default is
Megatron-style tensor parallelism over "model" (Shoeybi et al., 2019): query heads,
KV heads, the MLP's hidden units and the vocabulary split on "model", the batch on
"data"; a sequence rule ("seq" -> "sequence") splits activations along tokens.

A dimension is split only when the mesh axis size divides its count of whole units
(heads for the flattened [N*H] projection outputs, not channels), so no head is cut in
two; otherwise it is replicated (e.g. 3 KV heads on a model axis of 2: the keys and
values are computed on every device of the axis, as Megatron does with fewer KV heads
than devices). `ModelSharding` (a mesh plus rules) is what a sharded model carries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_AXES = ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers", "slots")

DEFAULT_RULES: dict[str, str | None] = {"batch": "data", "heads": "model", "kv_heads": "model",
                                        "mlp": "model", "vocab": "model"}

# FSDP / ZeRO-3 (Rajbhandari et al., 2020): parameters (and so optimizer state) also split
# along the model dimension over "data"; XLA gathers each layer's weights where used.
FSDP_RULES: dict[str, str | None] = {**DEFAULT_RULES, "embed": "data"}
NAMED_RULES = {"megatron": DEFAULT_RULES, "fsdp": FSDP_RULES}  # what an experiment config names


@dataclasses.dataclass(frozen=True)
class AxisRules:
    """Logical axis -> mesh axis (absent or None: replicated). Hashable (a jit static)."""

    pairs: tuple[tuple[str, str | None], ...] = tuple(DEFAULT_RULES.items())

    @classmethod
    def of(cls, rules: Mapping[str, str | None] | AxisRules | None = None) -> AxisRules:
        """Rules from a mapping (None: the Megatron defaults). Unknown logical axes are
        refused with a ValueError naming them."""
        if isinstance(rules, AxisRules):
            return rules
        rules = DEFAULT_RULES if rules is None else dict(rules)
        unknown = sorted(set(rules) - set(LOGICAL_AXES))
        if unknown:
            raise ValueError(f"axis rules name unknown logical axes {unknown}; known: {LOGICAL_AXES}")
        return cls(tuple(sorted(rules.items())))

    def mesh_axis(self, logical: str | None) -> str | None:
        return dict(self.pairs).get(logical) if logical is not None else None

    def check(self, mesh: Mesh) -> None:
        """ValueError if a rule names an axis `mesh` lacks (before anything compiles)."""
        missing = sorted({axis for _, axis in self.pairs if axis is not None and axis not in mesh.axis_names})
        if missing:
            raise ValueError(f"axis rules name mesh axes {missing} that the mesh (axes {mesh.axis_names}) lacks")


@dataclasses.dataclass(frozen=True)
class ModelSharding:
    """A mesh and the rules placing parameters, activations and caches on it."""

    mesh: Mesh
    rules: AxisRules = AxisRules()
    sequence_parallel: str = "ring"  # a prefill split by tokens attends by "ring" or "ulysses"

    def __post_init__(self) -> None:
        if not isinstance(self.mesh, Mesh):
            raise TypeError(f"ModelSharding: mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}")
        if self.sequence_parallel not in ("ring", "ulysses"):
            raise ValueError(f"ModelSharding: sequence_parallel must be 'ring' or 'ulysses', got "
                             f"{self.sequence_parallel!r}")
        self.rules.check(self.mesh)

    def spec(self, axes: tuple[str | None, ...], shape: tuple[int, ...],
             units: Mapping[str, int] | None = None) -> PartitionSpec:
        """The PartitionSpec of an array of `shape` with logical `axes`. `units[axis]`: the
        number of whole units along that dimension (heads of a flattened projection), which
        the mesh axis size must divide for the dimension to be split. A mesh axis is used
        at most once (the first dimension asking for it gets it)."""
        if len(axes) != len(shape):
            raise ValueError(f"logical axes {axes} do not match shape {shape}")
        used: set[str] = set()
        parts: list[str | None] = []
        for axis, size in zip(axes, shape, strict=True):
            mesh_axis = self.rules.mesh_axis(axis)
            count = (units or {}).get(axis, size)
            if (mesh_axis is None or mesh_axis in used or self.mesh.shape[mesh_axis] == 1
                    or count % self.mesh.shape[mesh_axis] or size % self.mesh.shape[mesh_axis]):
                parts.append(None)
                continue
            used.add(mesh_axis)
            parts.append(mesh_axis)
        return PartitionSpec(*parts)

    def named(self, axes: tuple[str | None, ...], shape: tuple[int, ...],
              units: Mapping[str, int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape, units))

    def constrain(self, x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
        """`x` constrained to its logical axes' sharding (inside jit: a layer boundary)."""
        return jax.lax.with_sharding_constraint(x, self.named(axes, tuple(x.shape)))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def sequence_axis(self) -> str | None:
        """The mesh axis tokens are split on (the "seq" rule), when it has more than one device."""
        axis = self.rules.mesh_axis("seq")
        return axis if axis is not None and self.mesh.shape[axis] > 1 else None

    def sequence_attention(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, spec: object
                           ) -> jax.Array:
        """Self-attention of a prefill's new tokens split over the sequence axis, by ring
        attention or DeepSpeed-Ulysses (`sequence_parallel`), batch and heads split as the
        rules say where they divide."""
        from efficient.parallel.ring_attention import ring_attention  # they import the attention package
        from efficient.parallel.ulysses import ulysses_attention

        def axis_for(logical: str, *sizes: int) -> str | None:
            axis = self.rules.mesh_axis(logical)
            if axis is None or axis == self.sequence_axis() or any(size % self.mesh.shape[axis] for size in sizes):
                return None
            return axis

        method = ring_attention if self.sequence_parallel == "ring" else ulysses_attention
        return method(q, k, v, mesh=self.mesh, q_positions=positions, kv_positions=positions, spec=spec,
                      axis=self.sequence_axis(), batch_axis=axis_for("batch", q.shape[0]),
                      head_axis=axis_for("heads", q.shape[2], k.shape[2]))

    def constrain_cache(self, cache: object) -> object:
        """`cache` constrained field by field (batch on "data", KV heads on "model")."""
        from efficient.parallel.cache import constrain_cache  # cache.py imports this module

        return constrain_cache(cache, self)
