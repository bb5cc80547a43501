"""Block sizes of the split-K decode kernel (Flash-Decoding; Lean Attention stream-K).

`block_kv` keys are read per grid step (a multiple of 128, the TPU lane width);
`num_workers` programs share the total work of all rows evenly (stream-K), so a
ragged batch (one long row, many short ones) keeps every worker equally busy.
"""

from __future__ import annotations

import dataclasses

LANES = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Decode tiling; validated at construction (ValueError naming the field)."""

    block_kv: int = 512
    num_workers: int = 8

    def __post_init__(self) -> None:
        for name in ("block_kv", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")
        if self.block_kv % LANES:
            raise ValueError(
                f"BlockSizes.block_kv must be a multiple of {LANES} (TPU lanes), got {self.block_kv}"
            )

    def fitted(self, kv_len: int) -> BlockSizes:
        """Shrink the key block to the padded cache length."""
        padded = -(-kv_len // LANES) * LANES
        return dataclasses.replace(self, block_kv=min(self.block_kv, padded))
