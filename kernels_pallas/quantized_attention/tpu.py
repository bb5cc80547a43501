"""Decode attention over a KIVI-quantized cache as a Pallas Mosaic TPU kernel.

KIVI (Liu et al. 2024) keeps keys as b-bit codes per channel (one scale/zero
per channel and group of g token slots) and values per token (one per token and
group of g channels), packed along H into uint8, low bits first. The kernel
reads the codes and scales in place, block by block, and dequantizes in VMEM:
no float copy of the cache is ever written to HBM.

Grid (row b, kv head k, key block i of `block_kv` slots, a multiple of g). All
G query heads of the group and the T <= 16 new tokens are one (G*T, H) matrix,
so each block is read once per group. The row lengths are scalar-prefetched:
the index maps clamp i to the row's last non-empty block, so blocks past the
length repeat the previous block index and Pallas issues no copy for them;
`pl.when` skips their compute. Mosaic tiles a block's last two axes, so a kv
head's block of the [B, S, K, ...] arrays (K squeezed second-to-last) lowers only
for K == 1; kv_layout="BKSH" (head-major arrays) reads contiguous [slots, ...]
slabs and lowers for any K.

Unpacking without lane shuffles: byte j of a row holds the codes of channels
j*per + p (per = 8 // b codes per byte, p = 0 .. per-1), so "plane" p =
(byte >> p*b) & (2^b - 1) is the [block, H/per] matrix of channels p, per+p,
2per+p, ... Attention is computed plane by plane in that channel order: q is
split into planes outside the kernel (q-sized), each plane of the key scales
is selected by a 0/1 matmul, the value scales (whose channel groups are the
same in every plane, as per divides g) are spread over their g channels by a
0/1 matmul, and the output planes are interleaved back outside (output-sized).
Empty slots (past the length: NaN scales allowed) get zero scales and zeros
before any matmul and masked logits; the online softmax runs in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Bool, Float, Int, UInt8

from kernels_pallas import online_softmax
from kernels_pallas.decode_attention.reference import decode_positions
from kernels_pallas.flash_attention.reference import soft_cap, visible

DEFAULT_BLOCK_KV = 512
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Config:
    bits: int
    group_size: int
    block_kv: int
    causal: bool
    window: int | None
    softcap: float | None
    scale: float
    has_mask: bool
    layout: str
    interpret: object

    @property
    def per_byte(self) -> int:
        return 8 // self.bits


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int] = (1, 0)) -> jax.Array:
    """float32 2-D matmul (exact for the 0/1 selection matrices)."""
    return jax.lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())), precision=HIGHEST, preferred_element_type=jnp.float32
    )


def _iota(shape: tuple[int, int], dim: int) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def kv_block_index(i: jax.Array, length: jax.Array, block_kv: int) -> jax.Array:
    """Key block fetched at grid step i: i, clamped to the row's last non-empty block (0 for
    an empty row), so the steps past the length repeat the index and Pallas copies nothing."""
    return jnp.minimum(i, jnp.maximum(jax.lax.div(length + block_kv - 1, block_kv) - 1, 0))


def _kernel(cfg: Config, lens_ref, *refs) -> None:  # noqa: ANN001
    """One (row, kv head, key block) step of the online softmax over the dequantized block."""
    qp_ref, kp_ref, *refs = refs
    mask_ref = refs.pop(0) if cfg.has_mask else None
    q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    i = pl.program_id(2)
    g, bits, per = cfg.group_size, cfg.bits, cfg.per_byte
    bk, hp = kc_ref.shape  # slots, bytes per slot
    h = hp * per
    length = lens_ref[pl.program_id(0)]
    first = i * bk

    @pl.when(i == 0)
    def _init() -> None:
        online_softmax.reset(m_ref, l_ref, acc_ref)

    @pl.when(first < length)
    def _update() -> None:
        f32 = jnp.float32
        # Empty slots (and key groups starting past the length) may hold NaN: zero their
        # scales and zeros first, so no matmul below mixes a NaN into a live slot.
        group_live = first + _iota((bk // g, 1), 0) * g < length
        slot_live = first + _iota((bk, 1), 0) < length
        ks = jnp.where(group_live, ks_ref[...].astype(f32), 0.0)  # bk/g H
        kz = jnp.where(group_live, kz_ref[...].astype(f32), 0.0)
        vs = jnp.where(slot_live, vs_ref[...].astype(f32), 0.0)  # bk H/g
        vz = jnp.where(slot_live, vz_ref[...].astype(f32), 0.0)
        # Value channel j*per + p of plane p lies in group j // (g/per) for every p.
        spread = (jax.lax.div(_iota((h // g, hp), 1), g // per) == _iota((h // g, hp), 0)).astype(f32)
        vs, vz = _dot(vs, spread), _dot(vz, spread)  # bk hp
        kc, vc = kc_ref[...].astype(jnp.int32), vc_ref[...].astype(jnp.int32)  # bk hp
        code_mask = (1 << bits) - 1
        logits = jnp.zeros((q_ref.shape[1], bk), f32)
        v_planes = []
        for p in range(per):
            select = (_iota((h, hp), 0) == _iota((h, hp), 1) * per + p).astype(f32)  # H hp
            k_scale, k_zero = (
                jnp.broadcast_to(_dot(x, select)[:, None, :], (bk // g, g, hp)).reshape(bk, hp) for x in (ks, kz)
            )
            k_plane = ((kc >> (p * bits)) & code_mask).astype(f32) * k_scale + k_zero
            logits += _dot(q_ref[p].astype(f32), k_plane, (1, 1))  # R bk
            v_planes.append(((vc >> (p * bits)) & code_mask).astype(f32) * vs + vz)
        logits = soft_cap(logits * cfg.scale, cfg.softcap)
        vis = visible(qp_ref[...], kp_ref[...], None, None, causal=cfg.causal, window=cfg.window)
        vis &= first + _iota((1, bk), 1) < length
        if mask_ref is not None:
            vis &= mask_ref[...] != 0
        logits = jnp.where(vis, logits, -jnp.inf)
        prob, alpha = online_softmax.advance(m_ref, l_ref, logits)
        for p in range(per):
            acc_ref[p] = alpha * acc_ref[p] + _dot(prob, v_planes[p])

    @pl.when(i == pl.num_programs(2) - 1)
    def _emit() -> None:
        online_softmax.emit(m_ref, l_ref, acc_ref[...], o_ref, lse_ref, expand=lambda l: l[None])


def _kernel_call(cfg: Config, q, kc, ks, kz, vc, vs, vz, lengths, qp, kp, mask):  # noqa: ANN001, ANN202
    """q planes [B, K, per, R, hp]; codes/scales as stored; qp [B, R, 1], kp [B, 1, S],
    mask int32 [B, R, S] | None. Returns out planes [B, K, per, R, hp] and lse [B, K, R, 1]."""
    b, kh, per, r, hp = q.shape
    s = kc.shape[cfg.layout.index("S")]
    h, g = hp * per, cfg.group_size
    bk = cfg.block_kv
    num_blocks = -(-s // bk)

    block = lambda i, lens, b_: kv_block_index(i, lens[b_], bk)  # noqa: E731
    row = lambda b_, k_, i, lens: (b_, 0, 0)  # noqa: E731
    slots = lambda b_, k_, i, lens: (b_, 0, block(i, lens, b_))  # noqa: E731
    if cfg.layout == "BKSH":  # one contiguous [slots, bytes] slab per (row, kv head)
        cache = lambda b_, k_, i, lens: (b_, k_, block(i, lens, b_), 0)  # noqa: E731
        tile = lambda rows, cols: (None, None, rows, cols)  # noqa: E731
    else:
        cache = lambda b_, k_, i, lens: (b_, block(i, lens, b_), k_, 0)  # noqa: E731
        tile = lambda rows, cols: (None, rows, None, cols)  # noqa: E731
    in_specs = [pl.BlockSpec((None, r, 1), row), pl.BlockSpec((None, 1, bk), slots)]
    if mask is not None:
        in_specs.append(pl.BlockSpec((None, r, bk), slots))
    in_specs += [
        pl.BlockSpec((None, None, per, r, hp), lambda b_, k_, i, lens: (b_, k_, 0, 0, 0)),
        pl.BlockSpec(tile(bk, hp), cache),  # key codes
        pl.BlockSpec(tile(bk // g, h), cache),  # key scales
        pl.BlockSpec(tile(bk // g, h), cache),  # key zeros
        pl.BlockSpec(tile(bk, hp), cache),  # value codes
        pl.BlockSpec(tile(bk, h // g), cache),  # value scales
        pl.BlockSpec(tile(bk, h // g), cache),  # value zeros
    ]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, kh, num_blocks),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, per, r, hp), lambda b_, k_, i, lens: (b_, k_, 0, 0, 0)),
            pl.BlockSpec((None, None, r, 1), lambda b_, k_, i, lens: (b_, k_, 0, 0)),
        ],
        scratch_shapes=[
            pltpu.VMEM((r, 1), jnp.float32),
            pltpu.VMEM((r, 1), jnp.float32),
            pltpu.VMEM((per, r, hp), jnp.float32),
        ],
    )
    operands = [qp, kp] + ([] if mask is None else [mask]) + [q, kc, ks, kz, vc, vs, vz]
    return pl.pallas_call(
        functools.partial(_kernel, cfg),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((b, kh, per, r, hp), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, r, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="quantized_decode_attention",
    )(lengths, *operands)


def quantized_decode_attention(
    q: Float[Array, "B T N H"],
    k_codes: UInt8[Array, "B S K Hp"] | UInt8[Array, "B K S Hp"],
    k_scale: Float[Array, "B Sg K H"] | Float[Array, "B K Sg H"],
    k_zero: Float[Array, "B Sg K H"] | Float[Array, "B K Sg H"],
    v_codes: UInt8[Array, "B S K Hp"] | UInt8[Array, "B K S Hp"],
    v_scale: Float[Array, "B S K Hg"] | Float[Array, "B K S Hg"],
    v_zero: Float[Array, "B S K Hg"] | Float[Array, "B K S Hg"],
    lengths: Int[Array, " B"],
    *,
    bits: int,
    group_size: int,
    q_positions: Int[Array, "B T"] | None = None,
    kv_positions: Int[Array, "B S"] | None = None,
    mask: Bool[Array, "B T S"] | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    block_kv: int | None = None,
    kv_layout: str = "BSKH",
    interpret: object = False,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """Unvalidated kernel entry (see the package's `quantized_decode_attention`):
    q [B, T, N, H] -> query planes, kernel, output planes -> (out [B, T, N, H], lse)."""
    b, t, n, h = q.shape
    s, kh = k_codes.shape[kv_layout.index("S")], k_codes.shape[kv_layout.index("K")]
    g, per = n // kh, 8 // bits
    hp = h // per
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, s)
    dq, dk = decode_positions(lengths, t, s)
    qp = dq if q_positions is None else q_positions.astype(jnp.int32)
    kp = dk if kv_positions is None else kv_positions.astype(jnp.int32)
    cfg = Config(
        bits=bits,
        group_size=group_size,
        block_kv=min(DEFAULT_BLOCK_KV if block_kv is None else block_kv, s),
        causal=causal,
        window=window,
        softcap=softcap,
        scale=float(h**-0.5 if scale is None else scale),
        has_mask=mask is not None,
        layout=kv_layout,
        interpret=interpret,
    )
    # Query head k*G + j, channel c*per + p -> [B, K, plane p, row j*T + t, c].
    qk = q.reshape(b, t, kh, g, hp, per).transpose(0, 2, 5, 3, 1, 4).reshape(b, kh, per, g * t, hp)
    qp = jnp.tile(qp, (1, g))[:, :, None]  # B G*T 1
    if mask is not None:
        mask = jnp.tile(mask, (1, g, 1)).astype(jnp.int32)  # B G*T S
    out, lse = _kernel_call(
        cfg, qk, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, qp, kp[:, None, :], mask
    )
    out = out.reshape(b, kh, per, g, t, hp).transpose(0, 4, 1, 3, 5, 2).reshape(b, t, n, h)
    lse = lse.reshape(b, kh, g, t).transpose(0, 3, 1, 2).reshape(b, t, n)
    return out.astype(q.dtype), lse
