"""Collectives in a compiled XLA program: which ones, how many, how many bytes each moves.

    collectives = hlo_collectives(jax.jit(fn).lower(*args).compile().as_text())

Used by the sharding experiment (traffic of ring attention against Ulysses, the decode
step's collectives) and by the test that the decode step never gathers the cache.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ITEMSIZE = {"f32": 4, "s32": 4, "bf16": 2, "f16": 2, "u32": 4, "pred": 1, "u8": 1, "s8": 1, "u16": 2, "f64": 8}
_OP = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")


def hlo_collectives(hlo: str) -> dict[str, Any]:
    """Counts of each collective in a compiled HLO text, and each op's result bytes per
    device (a tuple result, as XLA emits for a combined or decomposed op, summed; of an
    async start's (operand, result, ...) tuple only the result)."""
    counts = {name: 0 for name in COLLECTIVES}
    sizes: dict[str, list[int]] = {name: [] for name in COLLECTIVES}
    for line in hlo.splitlines():
        match = _OP.match(line)
        if not match:
            continue
        shapes = re.findall(r"(\w+)\[([\d,]*)\]", match.group(1))
        if match.group(3) and match.group(2) in ("all-gather", "collective-permute") and len(shapes) > 1:
            shapes = shapes[1:2]
        counts[match.group(2)] += 1
        sizes[match.group(2)].append(sum(int(np.prod([int(d) for d in dims.split(",") if d])) * _ITEMSIZE.get(dtype, 4)
                                         for dtype, dims in shapes))
    return {"counts": counts, "bytes": sizes}
