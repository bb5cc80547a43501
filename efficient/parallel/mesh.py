"""A device mesh with named axes (data, model, sequence), checked before anything compiles.

    mesh = make_mesh(data=2, model=4)        # 8 devices: batch split 2 ways, heads 4 ways

Axes of size 1 are kept, so one set of sharding rules serves every mesh shape. The axes
are `Auto` (XLA's partitioner propagates shardings between the constraints we place),
whatever `jax.make_mesh`'s default is in the installed jax.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("data", "model", "sequence")


def make_mesh(*, data: int = 1, model: int = 1, sequence: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model, sequence) mesh over `devices` (default: all of `jax.devices()`).

    The product of the axis sizes must equal the number of devices: a ValueError names the
    sizes and the device count otherwise (no device is silently left idle)."""
    sizes = {"data": data, "model": model, "sequence": sequence}
    for name, size in sizes.items():
        if not isinstance(size, int | np.integer) or isinstance(size, bool) or size < 1:
            raise ValueError(f"make_mesh: {name} must be a positive int, got {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    product = data * model * sequence
    if product != len(devices):
        raise ValueError(f"make_mesh: data={data} x model={model} x sequence={sequence} = {product} devices, "
                         f"but {len(devices)} are given; the mesh must use every device exactly once")
    grid = np.asarray(devices, dtype=object).reshape(data, model, sequence)
    auto = getattr(jax.sharding, "AxisType", None)
    if auto is None:  # an older jax: every mesh axis is automatic
        return Mesh(grid, MESH_AXES)
    return Mesh(grid, MESH_AXES, axis_types=(auto.Auto,) * len(MESH_AXES))


def mesh_shape(mesh: Mesh) -> str:
    """"data x model x sequence" sizes, e.g. "4x2x1" (for logs and results)."""
    return "x".join(str(mesh.shape[name]) for name in mesh.axis_names)
