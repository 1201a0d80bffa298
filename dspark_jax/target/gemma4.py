"""Gemma 4 text decoder layers, run by `TargetModel` when its config is a `Gemma4Config`.

Dataflow per layer (transformers `Gemma4TextDecoderLayer`, text-only: no MoE, no per-layer inputs):
  x = x + post_attention_layernorm(attn(input_layernorm(x)))
  x = x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))
  x = x * layer_scalar
Attention: q = rope(q_norm(q_proj(u))); k = rope(k_norm(k_proj(u))); v = v_norm(v_proj(u)) with a
scale-free v_norm, or v = v_norm(k_proj(u)) (before k_norm / RoPE) on full-attention layers with
`attention_k_eq_v`; scale 1.0; sliding layers see keys at positions (q - window, q]. KV-shared
layers reuse the (cache-updated) keys/values of their source layer. Embeddings are multiplied by
sqrt(hidden_size) cast to the weight dtype; logits are soft-capped by `final_logit_softcapping`.
Norms are Gemma4RMSNorm: `x * w` (not `1 + w`), statistics and scale in float32.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dspark_jax.gemma4_config import Gemma4Config
from dspark_jax.layers import Projection, apply_rope, dtype_of, gqa_attention
from dspark_jax.target.kv_cache import KVCache, key_layout, write_rows

__all__ = ["Gemma4RMSNorm", "Gemma4MLP", "Gemma4DecoderLayer", "gemma4_layers", "softcap", "embed_scale"]

Array = jax.Array


def softcap(logits: Array, cap: float | None) -> Array:
    """`cap * tanh(logits / cap)` (identity for cap None), in float32."""
    if cap is None:
        return logits
    return cap * jnp.tanh(logits.astype(jnp.float32) / cap)


def embed_scale(config: Gemma4Config, dtype) -> Array:
    """sqrt(hidden_size) as a scalar of the embedding weight dtype (HF casts it before multiplying)."""
    return jnp.asarray(config.embed_scale, jnp.float32).astype(dtype)


class Gemma4RMSNorm(nn.Module):
    """Gemma4RMSNorm: float32 `x * (mean(x^2) + eps)^-1/2 * w`, cast back; `with_scale=False`: no weight."""

    eps: float = 1e-6
    with_scale: bool = True
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        if self.with_scale:
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                               (x.shape[-1],), self.param_dtype)
            y = y * scale.astype(jnp.float32)
        return y.astype(x.dtype)


class Gemma4MLP(nn.Module):
    """`down(gelu_tanh(gate(x)) * up(x))`."""

    intermediate_size: int
    std: float = 0.02
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # x: [..., E]
        kw = dict(std=self.std, dtype=self.dtype, param_dtype=self.dtype)
        gate = Projection(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = Projection(self.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        h = nn.with_logical_constraint(jax.nn.gelu(gate, approximate=True) * up, ("batch", "length", "act_mlp"))
        return Projection(x.shape[-1], ("mlp", "embed"), name="down_proj", **kw)(h)


class Gemma4Attention(nn.Module):
    """One Gemma 4 attention layer; returns (output, (k, v) it attended to, new cache entry or None)."""

    config: Gemma4Config
    layer: int

    @nn.compact
    def __call__(self, x, positions, key_positions, key_valid, cache_kv, shared_kv):
        cfg, i = self.config, self.layer
        dt = dtype_of(cfg.dtype)
        kw = dict(use_bias=cfg.attention_bias, std=cfg.initializer_range, dtype=dt, param_dtype=dt)
        b, t, _ = x.shape
        h, kvh, d = cfg.num_attention_heads, cfg.layer_kv_heads(i), cfg.layer_head_dim(i)
        inv_freq = jnp.asarray(cfg.layer_inv_freq(i))
        q = Projection(h * d, ("embed", "q_heads"), name="q_proj", **kw)(x).reshape(b, t, h, d)
        q = apply_rope(Gemma4RMSNorm(cfg.rms_norm_eps, True, dt, "head_dim", name="q_norm")(q), positions, inv_freq)
        new_kv = None
        if shared_kv is not None:  # KV-shared layer: the source layer's keys/values (cache included)
            k, v = shared_kv
        else:
            k = Projection(kvh * d, ("embed", "kv_heads"), name="k_proj", **kw)(x).reshape(b, t, kvh, d)
            v = (Projection(kvh * d, ("embed", "kv_heads"), name="v_proj", **kw)(x).reshape(b, t, kvh, d)
                 if cfg.layer_has_v_proj(i) else k)  # k_eq_v: values = k_proj output before k_norm / RoPE
            k = apply_rope(Gemma4RMSNorm(cfg.rms_norm_eps, True, dt, "head_dim", name="k_norm")(k), positions, inv_freq)
            v = Gemma4RMSNorm(cfg.rms_norm_eps, False, dt, name="v_norm")(v)
            if cache_kv is not None:  # append at each row's own start position, attend to the cache
                starts = positions[:, 0]
                k, v = write_rows(cache_kv[0], k, starts), write_rows(cache_kv[1], v, starts)
                new_kv = (k, v)
        mask = key_positions[:, None, :] <= positions[:, :, None]  # [B, T, S]
        if cfg.layer_is_sliding(i):
            mask = mask & (key_positions[:, None, :] > positions[:, :, None] - cfg.sliding_window)
        if key_valid is not None:
            mask = mask & key_valid[:, None, :]
        out = gqa_attention(q, k, v, mask, 1.0)  # [B, T, H, D]
        out = nn.with_logical_constraint(out.reshape(b, t, h * d), ("batch", "length", "act_heads"))
        return Projection(cfg.hidden_size, ("q_heads", "embed"), name="o_proj", **kw)(out), (k, v), new_kv


class Gemma4DecoderLayer(nn.Module):
    """Sandwich-norm block with layer_scalar (see the module docstring)."""

    config: Gemma4Config
    layer: int

    @nn.compact
    def __call__(self, x, positions, key_positions, key_valid, cache_kv, shared_kv):
        cfg = self.config
        dt = dtype_of(cfg.dtype)

        def norm(name):
            return Gemma4RMSNorm(cfg.rms_norm_eps, True, dt, name=name)

        attn, kv, new_kv = Gemma4Attention(cfg, self.layer, name="self_attn")(
            norm("input_layernorm")(x), positions, key_positions, key_valid, cache_kv, shared_kv)
        x = x + norm("post_attention_layernorm")(attn)
        mlp = Gemma4MLP(cfg.layer_intermediate_size(self.layer), cfg.initializer_range, dt, name="mlp")
        x = x + norm("post_feedforward_layernorm")(mlp(norm("pre_feedforward_layernorm")(x)))
        scalar = self.param("layer_scalar", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (1,), dt)
        x = x * scalar.astype(x.dtype)
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), kv, new_kv


def gemma4_layers(config: Gemma4Config, x: Array, positions: Array, cache: KVCache | None,
                  attention_mask: Array | None, tap_layers: Sequence[int]):
    """Run the decoder stack inside the calling module's compact scope (params `layers_{i}`).

    x: [B, T, E] scaled embeddings. Returns (x [B, T, E] before the final norm, {layer id: tap},
    new cache or None). Call only from a compact method (`TargetModel.__call__`).
    """
    key_positions, key_valid = key_layout(cache, positions, attention_mask)
    taps = {-1: x} if -1 in tap_layers else {}
    attended: dict[int, tuple[Array, Array]] = {}
    new_k, new_v = [], []
    for i in range(config.num_hidden_layers):
        src = config.layer_kv_source(i)
        layer_kv = (cache.k[i], cache.v[i]) if cache is not None and src is None else None
        x, kv, new_kv = Gemma4DecoderLayer(config, i, name=f"layers_{i}")(
            x, positions, key_positions, key_valid, layer_kv, None if src is None else attended[src])
        attended[i] = kv
        if cache is not None:  # shared layers keep their empty (0-head) buffers
            new_k.append(cache.k[i] if new_kv is None else new_kv[0])
            new_v.append(cache.v[i] if new_kv is None else new_kv[1])
        if i in tap_layers:
            taps[i] = x
    new_cache = cache.replace(k=tuple(new_k), v=tuple(new_v)) if cache is not None else None
    return x, taps, new_cache
