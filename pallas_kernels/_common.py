"""Shared helpers of the kernels: padding, platform compiler parameters, counter-based random bits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Array = jax.Array
PLATFORMS = ("tpu", "gpu")
NEG_INF = float("-inf")


def check_platform(platform: str) -> None:
    """Raise on an unknown platform name."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n (n >= 1)."""
    return max(multiple, -(-n // multiple) * multiple)


def next_pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, (int(n) - 1).bit_length()))


def pad_axis(x: Array, axis: int, size: int, value=0) -> Array:
    """Pad `x` along `axis` up to `size` with `value` (no-op when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def lane_size(n: int, platform: str) -> int:
    """Padded size of a minor (lane) dimension: a multiple of 128 on TPU, a power of two >= 16 on GPU."""
    return round_up(n, 128) if platform == "tpu" else next_pow2(n, 16)


def row_size(n: int, platform: str) -> int:
    """Padded size of a second-minor (sublane / matmul row) dimension: x8 on TPU, power of two >= 16 on GPU."""
    return round_up(n, 8) if platform == "tpu" else next_pow2(n, 16)


def compiler_params(platform: str, semantics: tuple[str, ...], vmem_bytes: int | None = None, num_warps: int = 4):
    """Compiler parameters selecting Mosaic TPU or Triton (never Mosaic GPU) for a pallas_call."""
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        kw = {"vmem_limit_bytes": int(vmem_bytes)} if vmem_bytes else {}
        return pltpu.CompilerParams(dimension_semantics=semantics, **kw)
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=1)


def scalar_spec(platform: str, shape: tuple[int, ...]):
    """BlockSpec of a small int32 table read whole by every program (SMEM on TPU)."""
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def hash_uniform(seed: Array, index: Array, stream) -> Array:
    """Counter-based uniform in (0, 1) from a uint32 seed and an int32 index (same bits in kernel and jnp).

    A 32-bit integer mix (two rounds of the murmur3 finaliser) of seed, stream (int, may be traced)
    and index; the top
    24 bits give the uniform (0.5 + m) / 2^24. Identical in a kernel body and in plain jnp, so a
    kernel and its reference see the same random numbers.
    """
    salt = (jnp.asarray(stream, jnp.int32) + 1).astype(jnp.uint32) * jnp.uint32(0x9E3779B9)
    h = seed.astype(jnp.uint32) ^ salt
    h = h + index.astype(jnp.uint32) * jnp.uint32(0x85EBCA6B)
    for _ in range(2):
        h = h ^ (h >> 16)
        h = h * jnp.uint32(0x7FEB352D)
        h = h ^ (h >> 15)
        h = h * jnp.uint32(0x846CA68B)
        h = h ^ (h >> 16)
    mant = (h >> 8).astype(jnp.int32).astype(jnp.float32)
    return (mant + 0.5) * (1.0 / 16777216.0)


def gumbel(seed: Array, index: Array, stream) -> Array:
    """Standard Gumbel noise -log(-log(u)) from `hash_uniform`."""
    return -jnp.log(-jnp.log(hash_uniform(seed, index, stream)))
