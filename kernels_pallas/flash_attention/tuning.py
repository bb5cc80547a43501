"""Block sizes of the flash attention kernels (FlashAttention-2 tiling, Dao 2023).

`block_q` rows of queries meet `block_kv` keys per grid step; the backward pass
has its own pair. On TPU a logits tile is (block_q, block_kv): block_q must be a
multiple of 8 (sublanes) and block_kv of 128 (lanes). Short sequences shrink the
blocks to the padded length, so tiny shapes do not pay for a full tile.
"""

from __future__ import annotations

import dataclasses

SUBLANES = 8
LANES = 128


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes; validated at construction (ValueError naming the field)."""

    block_q: int = 128
    block_kv: int = 128
    block_q_bwd: int = 128
    block_kv_bwd: int = 128

    def __post_init__(self) -> None:
        for name, multiple in (
            ("block_q", SUBLANES),
            ("block_kv", LANES),
            ("block_q_bwd", SUBLANES),
            ("block_kv_bwd", LANES),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")
            if value % multiple:
                raise ValueError(
                    f"BlockSizes.{name} must be a multiple of {multiple} (TPU tiling), got {value}"
                )

    def fitted(self, q_len: int, kv_len: int) -> BlockSizes:
        """Shrink each block to the padded sequence length it tiles."""
        tq, tk = round_up(q_len, SUBLANES), round_up(kv_len, LANES)
        return BlockSizes(
            block_q=min(self.block_q, tq),
            block_kv=min(self.block_kv, tk),
            block_q_bwd=min(self.block_q_bwd, tq),
            block_kv_bwd=min(self.block_kv_bwd, tk),
        )


def default_block_sizes(q_len: int, kv_len: int, head_dim: int) -> BlockSizes:
    """A reasonable default: 128-row query tiles, 256-512 key tiles when long."""
    block_kv = 512 if kv_len >= 2048 and head_dim <= 128 else 256 if kv_len >= 512 else 128
    return BlockSizes(block_q=128, block_kv=block_kv).fitted(q_len, kv_len)
