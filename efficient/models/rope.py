"""Rotary position embeddings with the scaling variants of Llama-family checkpoints.

- default: RoFormer (Su et al., 2021).
- linear: position interpolation (Chen et al., 2023): frequencies / factor.
- dynamic: dynamic NTK scaling: the base grows with the current length.
- llama3: Llama 3.1's piecewise frequency rescaling.
- yarn: YaRN (Peng et al., 2023): ramped interpolation plus attention factor.

Frequencies follow the Hugging Face definitions exactly (float32), so loaded
checkpoints reproduce their reference logits.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from efficient.models.config import RopeConfig


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def _llama3_inv_freq(rope: RopeConfig, dim: int) -> np.ndarray:
    inv_freq = _base_inv_freq(rope.theta, dim)
    old_len = float(rope.original_max_position_embeddings)
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    factor, base = rope.factor, rope.theta
    original = float(rope.original_max_position_embeddings)
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (factor * pos_freqs)
    inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    return inv_freq.astype(np.float32), attention_factor


def static_inv_freq(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [H/2] and the cos/sin scaling, for non-dynamic types."""
    if rope.rope_type == "default" or rope.rope_type == "dynamic":
        return _base_inv_freq(rope.theta, dim), 1.0
    if rope.rope_type == "linear":
        return (_base_inv_freq(rope.theta, dim) / np.float32(rope.factor)).astype(np.float32), 1.0
    if rope.rope_type == "llama3":
        return _llama3_inv_freq(rope, dim), 1.0
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(rope, dim)
    raise NotImplementedError(f"rope_type {rope.rope_type!r}")


def inv_freq_for(
    rope: RopeConfig, dim: int, max_position_embeddings: int, positions: Int[Array, "B T"]
) -> tuple[Float[Array, " H2"], float]:
    """Inverse frequencies for this call; dynamic NTK depends on the largest position."""
    if rope.rope_type != "dynamic":
        inv_freq, scaling = static_inv_freq(rope, dim)
        return jnp.asarray(inv_freq), scaling
    seq_len = jnp.maximum(jnp.max(positions) + 1, max_position_embeddings).astype(jnp.float32)
    factor = rope.factor
    base = rope.theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (base**exponents), 1.0


def rotary_cos_sin(
    rope: RopeConfig, dim: int, max_position_embeddings: int, positions: Int[Array, "B T"]
) -> tuple[Float[Array, "B T H"], Float[Array, "B T H"]]:
    """cos and sin tables for the given positions (negative positions are padding)."""
    inv_freq, scaling = inv_freq_for(rope, dim, max_position_embeddings, positions)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # B T H/2
    angles = jnp.concatenate([angles, angles], axis=-1)  # B T H
    return jnp.cos(angles) * scaling, jnp.sin(angles) * scaling


def apply_rotary(
    x: Float[Array, "B T N H"], cos: Float[Array, "B T H"], sin: Float[Array, "B T H"]
) -> Float[Array, "B T N H"]:
    """x * cos + rotate_half(x) * sin (the HF half-split convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
