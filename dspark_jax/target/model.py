"""Pure-functional Flax decoder for Qwen3 / Llama targets.

Parameter tree mirrors Hugging Face module names (`embed_tokens`, `layers_{i}.self_attn.q_proj`,
`norm`, `lm_head`), so checkpoint conversion is a rename plus a transpose.

One forward covers every inference shape the library needs:
  * full-sequence forward without a cache (training, parity tests),
  * prefill of right-padded prompts into an empty cache,
  * one-token decode,
  * appending several tokens per row, each row at its own position (speculative verification).
Tokens are written to the cache at index == absolute position; attention admits cache keys at
index <= the query position, which makes roll-back a matter of lowering `KVCache.lengths`.

Decode and verify attend over the live length of the cache, not its capacity (`cached_attention`:
key-length buckets of powers of two from `TargetModel.live_bucket_min`; 0 = always the capacity).
Under a mesh (`jax.set_mesh`) the model installs its config's sharding rules
(`dspark_jax.sharding.target_rules_scope`), so activation and cache constraints apply.

Optional taps return residual-stream outputs of chosen decoder layers (HF `hidden_states[l+1]`;
id -1 = embedding output) and the final normed hidden state; nothing extra is computed when they
are not requested.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dspark_jax.config import TargetConfig
from dspark_jax.gemma4_config import Gemma4Config
from dspark_jax.layers import (GatedMLP, Projection, RMSNorm, apply_rope, cached_attention, dtype_of, gqa_attention,
                               live_buckets)
from dspark_jax.sharding import constrain, target_rules_scope
from dspark_jax.target.gemma4 import Gemma4RMSNorm, embed_scale, gemma4_layers, softcap
from dspark_jax.target.kv_cache import KVCache, constrain_cache, key_layout, write_rows

__all__ = ["TargetModel", "TargetOutput", "output_kernel"]

Array = jax.Array


@flax.struct.dataclass
class TargetOutput:
    """Result of `TargetModel.__call__`.

    logits: [B, T, V] float32 (or [B, N, V] when `logits_indices` [B, N] was given; None if
      `compute_logits=False`).
    cache: the updated KVCache (None when called without one). Its `lengths` are NOT advanced:
      the caller decides how many appended tokens to commit.
    taps: one [B, T, E] array per requested layer id, in the requested order.
    final_hidden: [B, T, E] output of the final norm (None unless requested).
    """

    logits: Array | None
    cache: KVCache | None
    taps: tuple[Array, ...] = ()
    final_hidden: Array | None = None


class Attention(nn.Module):
    """GQA self-attention with optional Qwen3 per-head q/k norm, RoPE, and KV-cache append."""

    config: TargetConfig
    live_bucket_min: int = 0
    attention_backend: str = "xla"

    @nn.compact
    def __call__(self, x, positions, key_positions, key_valid, cache_kv, inv_freq):
        cfg = self.config
        dt = dtype_of(cfg.dtype)
        kw = dict(use_bias=cfg.attention_bias, std=cfg.initializer_range, dtype=dt, param_dtype=dt)
        b, t, _ = x.shape
        h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = Projection(h * d, ("embed", "q_heads"), name="q_proj", **kw)(x).reshape(b, t, h, d)
        k = Projection(kvh * d, ("embed", "kv_heads"), name="k_proj", **kw)(x).reshape(b, t, kvh, d)
        v = Projection(kvh * d, ("embed", "kv_heads"), name="v_proj", **kw)(x).reshape(b, t, kvh, d)
        if cfg.has_qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, dt, dt, "head_dim", name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, dt, dt, "head_dim", name="k_norm")(k)
        q = constrain(apply_rope(q, positions, inv_freq), ("batch", "length", "act_heads", None))
        k = constrain(apply_rope(k, positions, inv_freq), ("batch", "length", "act_kv_heads", None))
        v = constrain(v, ("batch", "length", "act_kv_heads", None))
        if cache_kv is not None:  # append at each row's own start position, attend to the live cache
            ck, cv = cache_kv
            starts = positions[:, 0]
            ck, cv = constrain_cache(write_rows(ck, k, starts)), constrain_cache(write_rows(cv, v, starts))
            out = cached_attention(q, ck, cv, positions, d ** -0.5,
                                   live_buckets(ck.shape[1], self.live_bucket_min), self.attention_backend)  # [B, T, H, D]
            new_kv = (ck, cv)
        else:
            mask = key_positions[:, None, :] <= positions[:, :, None]  # [B, T, S]
            if key_valid is not None:
                mask = mask & key_valid[:, None, :]
            out = gqa_attention(q, k, v, mask, d ** -0.5)  # [B, T, H, D]
            new_kv = None
        out = constrain(out.reshape(b, t, h * d), ("batch", "length", "act_heads"))
        return Projection(cfg.hidden_size, ("q_heads", "embed"), name="o_proj", **kw)(out), new_kv


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x))."""

    config: TargetConfig
    live_bucket_min: int = 0
    attention_backend: str = "xla"

    @nn.compact
    def __call__(self, x, positions, key_positions, key_valid, cache_kv, inv_freq):
        cfg = self.config
        dt = dtype_of(cfg.dtype)
        h = RMSNorm(cfg.rms_norm_eps, dt, dt, name="input_layernorm")(x)
        attn, new_kv = Attention(cfg, self.live_bucket_min, self.attention_backend, name="self_attn")(h, positions, key_positions, key_valid, cache_kv, inv_freq)
        x = x + attn
        h = RMSNorm(cfg.rms_norm_eps, dt, dt, name="post_attention_layernorm")(x)
        x = x + GatedMLP(cfg.intermediate_size, cfg.mlp_bias, cfg.initializer_range, dt, dt, name="mlp")(h)
        return constrain(x, ("batch", "length", "act_embed")), new_kv


class TargetModel(nn.Module):
    """Qwen3/Llama causal LM. See the module docstring for the call modes.

    live_bucket_min: smallest key-length bucket of cached attention (0 = attend over the whole
    cache capacity, the previous behaviour; same results either way).
    attention_backend: cached (decode/verify/prefill) attention per `dspark_jax.kernels`:
    "xla" (default) | "pallas" | "auto".
    """

    config: TargetConfig
    live_bucket_min: int = 256
    attention_backend: str = "xla"

    def __call__(self, *args, **kwargs) -> "TargetOutput":
        """See `_forward` (installs the config's sharding rules when a mesh is set)."""
        with target_rules_scope(self.config):
            return self._forward(*args, **kwargs)

    @nn.compact
    def _forward(
        self,
        tokens: Array,  # [B, T] int32
        positions: Array,  # [B, T] int32 absolute positions; contiguous per row when a cache is given
        cache: KVCache | None = None,
        *,
        attention_mask: Array | None = None,  # [B, T] bool, key validity (no-cache mode only)
        tap_layers: Sequence[int] = (),
        return_final_hidden: bool = False,
        logits_indices: Array | None = None,  # [B, N] int32: compute logits only at these indices
        compute_logits: bool = True,
        lm_head_kernel: Array | None = None,  # [d, V]: use instead of the own output layer (`output_kernel`)
    ) -> TargetOutput:
        cfg = self.config
        dt = dtype_of(cfg.dtype)
        for lid in tap_layers:
            if not -1 <= lid < cfg.num_hidden_layers:
                raise ValueError(f"tap layer id {lid} outside [-1, {cfg.num_hidden_layers - 1}]")
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=dt,
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")),
                         name="embed_tokens")
        x = embed(tokens)
        if isinstance(cfg, Gemma4Config):  # Gemma 4: scaled embedding, own layer stack, Gemma norm
            x = constrain(x * embed_scale(cfg, x.dtype), ("batch", "length", "act_embed"))
            x, taps, new_cache = gemma4_layers(cfg, x, positions, cache, attention_mask, tap_layers)
            x = Gemma4RMSNorm(cfg.rms_norm_eps, True, dt, name="norm")(x)
        else:
            x = constrain(x, ("batch", "length", "act_embed"))
            x, taps, new_cache = _dense_layers(cfg, x, positions, cache, attention_mask, tap_layers,
                                               self.live_bucket_min, self.attention_backend)
            x = RMSNorm(cfg.rms_norm_eps, dt, dt, name="norm")(x)

        logits = None
        if compute_logits:
            hl = x if logits_indices is None else jnp.take_along_axis(x, logits_indices[..., None], axis=1)
            if lm_head_kernel is not None:
                logits = jnp.einsum("...d,dv->...v", hl.astype(dt), lm_head_kernel.astype(dt))
            elif cfg.tie_word_embeddings:
                logits = embed.attend(hl.astype(dt))
            else:
                logits = Projection(cfg.vocab_size, ("embed", "vocab"), std=cfg.initializer_range,
                                    dtype=dt, param_dtype=dt, name="lm_head")(hl)
            logits = logits.astype(jnp.float32)
            if isinstance(cfg, Gemma4Config):
                logits = softcap(logits, cfg.final_logit_softcapping)
            logits = constrain(logits, ("batch", "length", "act_vocab"))
        return TargetOutput(
            logits=logits,
            cache=new_cache,
            taps=tuple(taps[lid] for lid in tap_layers),
            final_hidden=x if return_final_hidden else None,
        )


def _dense_layers(cfg: TargetConfig, x: Array, positions: Array, cache: KVCache | None,
                  attention_mask: Array | None, tap_layers: Sequence[int], live_bucket_min: int = 0,
                  attention_backend: str = "xla"):
    """The Qwen3/Llama decoder stack in the calling module's compact scope -> (x, taps, new cache)."""
    inv_freq = jnp.asarray(cfg.rope_inv_freq())
    key_positions, key_valid = key_layout(cache, positions, attention_mask)
    taps = {-1: x} if -1 in tap_layers else {}
    new_k, new_v = [], []
    for i in range(cfg.num_hidden_layers):
        layer_kv = (cache.k[i], cache.v[i]) if cache is not None else None
        x, kv = DecoderLayer(cfg, live_bucket_min, attention_backend, name=f"layers_{i}")(x, positions, key_positions, key_valid, layer_kv, inv_freq)
        if kv is not None:
            new_k.append(kv[0])
            new_v.append(kv[1])
        if i in tap_layers:
            taps[i] = x
    new_cache = cache.replace(k=tuple(new_k), v=tuple(new_v)) if cache is not None else None
    return x, taps, new_cache


def output_kernel(config: TargetConfig, params) -> Array:
    """The output layer as one [d, V] kernel: the tied embedding transposed, or lm_head's kernel.

    Decode loops compute it once before the loop and pass it as `lm_head_kernel`: XLA:CPU's
    matmul on the [V, d] embedding re-packs 8-32 MB of weights on every call with more than one
    row, and a speculative drafter whose frozen LM head is the same kernel then shares one copy.
    """
    if config.tie_word_embeddings:
        return jnp.transpose(params["embed_tokens"]["embedding"])
    return params["lm_head"]["kernel"]
