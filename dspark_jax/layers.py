"""Base layers shared by the target model and the DSpark drafter.

Tiny on purpose: RMSNorm, rotary embeddings (HF rotate-half convention), a projection with logical
axis names, the gated SiLU MLP, and masked GQA attention with a finite result for fully masked
rows, and `cached_attention`, which attends over a static-capacity KV cache at the cost of the live
length (a `lax.switch` over a few static key-length buckets). Numerics that decide correctness (norm statistics, softmax) run in float32.

Shape letters: B batch, T query length, S key length, H query heads, K kv heads, G = H // K,
D head dim, E embedding (hidden) size, F MLP width, V vocabulary.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dspark_jax.sharding import constrain

__all__ = [
    "RMSNorm", "Projection", "GatedMLP", "apply_rope", "gqa_attention", "cached_attention", "live_buckets",
    "dtype_of", "dense_init",
]

Array = jax.Array


def dtype_of(name: str) -> jnp.dtype:
    """'float32' / 'bfloat16' / 'float16' -> jnp dtype."""
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def dense_init(std: float, axes: Sequence[str | None]):
    """Normal(0, std) initializer (HF `initializer_range`) annotated with logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), tuple(axes))


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis: statistics and scale in float32, output in `dtype`."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        # HF casts the normalised activations to the input dtype before the weight multiply.
        y = y.astype(x.dtype).astype(jnp.float32) * scale.astype(jnp.float32)
        return y.astype(self.dtype)


class Projection(nn.Module):
    """Linear map `[..., in] -> [..., features]` whose kernel carries logical axis names (HF `nn.Linear`)."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = False
    std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", dense_init(self.std, self.axes),
                            (x.shape[-1], self.features), self.param_dtype)
        # float32 accumulation, one rounding to `dtype`: a contraction split over devices (tensor
        # parallelism) then sums float32 partials, and bfloat16 results match one device.
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype),
                       preferred_element_type=jnp.float32).astype(self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class GatedMLP(nn.Module):
    """`down(silu(gate(x)) * up(x))` — the Qwen3/Llama MLP."""

    intermediate_size: int
    use_bias: bool = False
    std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # x: [..., E]
        kw = dict(use_bias=self.use_bias, std=self.std, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = Projection(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = Projection(self.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return Projection(x.shape[-1], ("mlp", "embed"), name="down_proj", **kw)(h)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotate `x` [B, T, N, D] at integer `positions` [B, T] (HF half-split rotate_half convention).

    Angles are computed in float32; the rotation is applied in float32 and cast back to x.dtype.
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def gqa_attention(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
    """Grouped-query attention with a boolean mask; fully masked rows return zeros (never NaN).

    q: [B, T, H, D]; k, v: [B, S, K, D]; mask: [B, T, S] (True = may attend). Returns [B, T, H, D].
    Scores and softmax run in float32. A single query per row (T == 1, the decode step) takes
    `_single_query_attention`, which reads k / v in place.
    """
    b, t, h, d = q.shape
    if t == 1:
        return _single_query_attention(q, k, v, mask, scale)
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    m = mask[:, None, None, :, :]  # [B, 1, 1, T, S]
    scores = jnp.where(m, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(m, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def live_buckets(capacity: int, smallest: int, max_buckets: int = 8) -> tuple[int, ...]:
    """Static key lengths for a cache of `capacity`: powers of two from `smallest` below it, then `capacity`.

    At most `max_buckets` (the largest ones); `smallest <= 0` or `capacity <= smallest` -> (capacity,).
    """
    if smallest <= 0 or capacity <= smallest:
        return (capacity,)
    sizes, n = [], smallest
    while n < capacity:
        sizes.append(n)
        n *= 2
    return tuple(sizes[-(max_buckets - 1):]) + (capacity,) if max_buckets > 1 else (capacity,)


def cached_attention(q: Array, k: Array, v: Array, positions: Array, scale: float,
                     buckets: Sequence[int], backend: str = "xla") -> Array:
    """Causal attention of queries at absolute `positions` over a KV cache whose index i holds position i.

    q: [B, T, H, D]; k, v: [B, S, K, D] (S = buckets[-1], the capacity); positions: [B, T] int32.
    Keys at index <= the query position are visible. Only the first n keys are read, n the smallest
    bucket >= max(positions) + 1 (chosen at run time by `lax.switch`; every key past it is masked
    for every query anyway), so decode and verify cost the live length, not the capacity. Returns
    [B, T, H, D], the same as `gqa_attention` over the whole cache up to float32 summation order.
    backend (`dspark_jax.kernels`): "xla" (default) is the path above; when it resolves to
    "pallas", the ragged attention kernel reads each row's live prefix instead (no buckets).
    """
    from dspark_jax import kernels  # deferred: the kernel dispatch imports Pallas

    if backend != "xla" and kernels.resolve_backend(backend) == "pallas":
        return kernels.cached_attention(q, k, v, positions, scale=scale, backend="pallas")

    def attend(n: int):
        def run(q, k, v, positions):
            mask = jnp.arange(n, dtype=jnp.int32)[None, None, :] <= positions[:, :, None]  # [B, T, n]
            return gqa_attention(q, k[:, :n], v[:, :n], mask, scale)
        return run

    if len(buckets) == 1:
        return attend(buckets[0])(q, k, v, positions)
    live = jnp.max(positions) + 1
    index = jnp.sum(jnp.asarray(buckets[:-1], jnp.int32) < live)  # first bucket >= live
    return jax.lax.switch(index, [attend(n) for n in buckets], q, k, v, positions)


def _single_query_attention(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
    """`gqa_attention` for T == 1 as broadcast-multiply + reduce instead of two batched dots.

    Same math and dtypes as the dot form (float32 scores and softmax; weights rounded to v.dtype
    before the weighted sum, like the dot path). Why: XLA:CPU canonicalises the dots to batch dims
    (B, K) first, so with the [B, S, K, D] cache it transposes every layer's whole k and v cache at
    every decode step (measured: ~1/3 of the step at S=2048; 56 transposes + 80 copies per step
    for an 8-layer model). The reductions here read k / v once, in place.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d).astype(jnp.float32)
    # scores[b, t, s, k, g] = sum_d q[b, t, k, g, d] * k[b, s, k, d]
    scores = jnp.sum(qg[:, :, None] * k.astype(jnp.float32)[:, None, :, :, None, :], axis=-1) * scale
    m = mask[:, :, :, None, None]  # [B, T, S, 1, 1]
    scores = jnp.where(m, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=2, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(m, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(weights, axis=2, keepdims=True)
    weights = (weights / jnp.where(denom > 0, denom, 1.0)).astype(v.dtype).astype(jnp.float32)
    # out[b, t, k, g, d] = sum_s weights[b, t, s, k, g] * v[b, s, k, d]
    out = jnp.sum(weights[..., None] * v.astype(jnp.float32)[:, None, :, :, None, :], axis=2)
    return out.reshape(b, t, h, d).astype(q.dtype)
