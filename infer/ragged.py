"""Packed ragged verification (DSpark spec §7.6): per-request draft counts in one static token bucket.

Layout (shared convention, see docs/engine.md): a verify step over R request slots packs T tokens
(T a static bucket, padded). Slot r's chunk is ``[anchor_r, d_r1 .. d_r,ℓ_r]`` (1 + ℓ_r tokens,
0 for an idle slot), contiguous and in position order at ``chunk_start[r]``; per token ``tokens
[T]``, ``token_slot [T]`` (padding = R, out of range) and ``token_pos [T]`` (absolute position,
padding 0). Keys of slot r at cache index < cache_len[r] are visible to all of r's tokens; the
in-flight tokens of r are visible causally.

* `pack_chunks`: build the layout on device from [R, γ] proposals and ℓ (jittable, sort-free).
* `packed_target_forward`: the target decoder over the packed tokens against the per-slot KV cache
  [R, S, KVH, hd]: projections/MLP cost follows T, not R·(γ + 1). New keys/values are written at
  (slot, position) first, so "cache or in-flight at or before the query" is exactly
  ``key index <= token_pos`` in the slot's row. Attention is masked jnp (backend "xla") or
  `dspark_jax.kernels.attention` (backend "pallas"; kv_len = cache_len + chunk_len per slot).
* `packed_rejection_sample`: rejection sampling over the packed layout with per-slot
  `SamplingParams` and per-slot PRNG keys; greedy slots (temperature 0) verify on token ids. First rejection
  and first accepted stop token per request by segment_min. Uses `infer.verify`'s acceptance and
  residual formulas and consumes the same random bits as `infer.verify.rejection_sample` called
  per slot with that slot's key (tested).
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from dspark_jax import kernels
from dspark_jax.config import TargetConfig
from dspark_jax.layers import GatedMLP, Projection, RMSNorm, apply_rope, dtype_of, gqa_attention
from dspark_jax.sampling import SamplingMode, SamplingParams, greedy_argmax, sample_from_probs, warp_probs
from dspark_jax.target.kv_cache import KVCache
from infer.state import split_keys
from infer.verify import VerifyResult, acceptance_probabilities, residual_distribution

__all__ = ["PackedBatch", "pick_bucket", "pack_chunks", "packed_target_forward", "packed_rejection_sample"]

Array = jax.Array


@flax.struct.dataclass
class PackedBatch:
    """One packed verify step (see the module docstring).

    tokens, token_slot, token_pos: [T] int32; token_offset [T] int32 (0 = anchor, j = draft j;
    padding 0); chunk_start, chunk_len: [R] int32.
    """

    tokens: Array
    token_slot: Array
    token_pos: Array
    token_offset: Array
    chunk_start: Array
    chunk_len: Array

    @property
    def num_slots(self) -> int:
        """R."""
        return self.chunk_start.shape[0]

    @property
    def valid(self) -> Array:
        """[T] bool, real (non-padding) tokens."""
        return self.token_slot < self.num_slots


def pick_bucket(num_tokens: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= num_tokens (host side). Raises ValueError naming the size if none fits."""
    for b in sorted(buckets):
        if b >= num_tokens:
            return int(b)
    raise ValueError(f"{num_tokens} packed verify tokens exceed the largest token bucket {max(buckets)}")


def pack_chunks(anchor: Array, drafts: Array, num_drafts: Array, start: Array, active: Array, bucket: int
                ) -> PackedBatch:
    """Pack ``[anchor_r, drafts_r[:ℓ_r]]`` of the active slots into `bucket` tokens.

    anchor [R] int32 at position start [R]; drafts [R, γ] int32; num_drafts [R] int32 ℓ_r in [0, γ];
    active [R] bool. Tokens past Σ(1 + ℓ_r) are padding; the caller picks bucket >= that total.
    """
    r, g = drafts.shape
    chunk_len = jnp.where(active, 1 + jnp.clip(num_drafts, 0, g), 0).astype(jnp.int32)  # [R]
    chunk_end = jnp.cumsum(chunk_len)  # [R]
    chunk_start = (chunk_end - chunk_len).astype(jnp.int32)
    t = jnp.arange(bucket, dtype=jnp.int32)
    slot = jnp.sum(t[:, None] >= chunk_end[None, :], axis=1).astype(jnp.int32)  # [T], R past the last chunk
    slot_c = jnp.minimum(slot, r - 1)
    offset = jnp.where(slot < r, t - chunk_start[slot_c], 0)
    chunk = jnp.concatenate([anchor[:, None], drafts], axis=1).astype(jnp.int32)  # [R, γ+1]
    tokens = jnp.where(slot < r, chunk[slot_c, jnp.minimum(offset, g)], 0)
    pos = jnp.where(slot < r, start[slot_c] + offset, 0).astype(jnp.int32)
    return PackedBatch(tokens=tokens, token_slot=slot, token_pos=pos, token_offset=offset.astype(jnp.int32),
                       chunk_start=chunk_start, chunk_len=chunk_len)


def _sub(module, params, *args):
    return module.apply({"params": params}, *args)


def packed_target_forward(config: TargetConfig, params, packed: PackedBatch, cache: KVCache, *,
                          tap_layers: Sequence[int] = (), lm_head_kernel: Array | None = None,
                          backend: str = "xla", max_chunk: int | None = None
                          ) -> tuple[Array, KVCache, tuple[Array, ...]]:
    """Target forward over the packed tokens against the per-slot cache.

    cache: KVCache with k/v L x [R, S, KVH, hd]. Returns (logits [T, V] float32, cache with the
    packed keys/values written at (slot, position) — lengths NOT advanced —, taps: one [T, E] per
    requested layer id, HF `hidden_states[l+1]` convention, -1 = embeddings).
    Same parameter tree and layer numerics as `dspark_jax.target.model.TargetModel`.
    backend: attention per `dspark_jax.kernels` ("xla" = the masked jnp path); max_chunk: static
    bound on one slot's token count (γ + 1; default T), for the ragged kernel.
    """
    cfg = config
    dt = dtype_of(cfg.dtype)
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kw = dict(use_bias=cfg.attention_bias, std=cfg.initializer_range, dtype=dt, param_dtype=dt)
    norm = RMSNorm(cfg.rms_norm_eps, dt, dt)
    head_norm = RMSNorm(cfg.rms_norm_eps, dt, dt, "head_dim")
    inv_freq = jnp.asarray(cfg.rope_inv_freq())
    t = packed.tokens.shape[0]
    slot = jnp.minimum(packed.token_slot, packed.num_slots - 1)
    # Padding tokens write nowhere (index S is dropped) and see nothing.
    write_pos = jnp.where(packed.valid, packed.token_pos, cache.max_length)
    pos2 = packed.token_pos[:, None]  # [T, 1] as (batch, length) for RoPE
    mask = (jnp.arange(cache.max_length)[None, :] <= packed.token_pos[:, None]) & packed.valid[:, None]  # [T, S]
    use_kernel = backend != "xla" and kernels.resolve_backend(backend) == "pallas"
    # Slot r's chunk sits at positions cache_len[r] .. cache_len[r] + chunk_len[r] - 1 (idle: 0).
    kv_len = jnp.where(packed.chunk_len > 0, packed.token_pos[jnp.minimum(packed.chunk_start, t - 1)] + packed.chunk_len,
                       0).astype(jnp.int32)  # [R]

    x = jnp.take(params["embed_tokens"]["embedding"], packed.tokens, axis=0).astype(dt)[:, None, :]  # [T, 1, E]
    taps = {-1: x[:, 0]} if -1 in tap_layers else {}
    new_k, new_v = [], []
    for i in range(cfg.num_hidden_layers):
        p = params[f"layers_{i}"]
        pa = p["self_attn"]
        hn = _sub(norm, p["input_layernorm"], x)
        q = _sub(Projection(h * d, ("embed", "q_heads"), **kw), pa["q_proj"], hn).reshape(t, 1, h, d)
        k = _sub(Projection(kvh * d, ("embed", "kv_heads"), **kw), pa["k_proj"], hn).reshape(t, 1, kvh, d)
        v = _sub(Projection(kvh * d, ("embed", "kv_heads"), **kw), pa["v_proj"], hn).reshape(t, 1, kvh, d)
        if cfg.has_qk_norm:
            q, k = _sub(head_norm, pa["q_norm"], q), _sub(head_norm, pa["k_norm"], k)
        q, k = apply_rope(q, pos2, inv_freq), apply_rope(k, pos2, inv_freq)
        ck = cache.k[i].at[slot, write_pos].set(k[:, 0].astype(cache.k[i].dtype), mode="drop")
        cv = cache.v[i].at[slot, write_pos].set(v[:, 0].astype(cache.v[i].dtype), mode="drop")
        new_k.append(ck)
        new_v.append(cv)
        if use_kernel:  # ragged kernel over each slot's live prefix
            out = kernels.attention(q[:, 0], ck, cv, packed.token_slot, packed.token_pos, kv_len,
                                    max_chunk=max_chunk, scale=d ** -0.5, backend="pallas").reshape(t, 1, h * d)
        else:  # each packed token is a one-query row over its slot's cache row: [T, S, KVH, hd]
            out = gqa_attention(q, ck[slot], cv[slot], mask[:, None, :], d ** -0.5).reshape(t, 1, h * d)
        x = x + _sub(Projection(cfg.hidden_size, ("q_heads", "embed"), **kw), pa["o_proj"], out)
        hn = _sub(norm, p["post_attention_layernorm"], x)
        x = x + _sub(GatedMLP(cfg.intermediate_size, cfg.mlp_bias, cfg.initializer_range, dt, dt), p["mlp"], hn)
        if i in tap_layers:
            taps[i] = x[:, 0]
    x = _sub(norm, params["norm"], x)[:, 0]  # [T, E]
    if lm_head_kernel is None:
        lm_head_kernel = (params["embed_tokens"]["embedding"].T if cfg.tie_word_embeddings
                          else params["lm_head"]["kernel"])
    logits = jnp.einsum("td,dv->tv", x.astype(dt), lm_head_kernel.astype(dt)).astype(jnp.float32)
    return logits, cache.replace(k=tuple(new_k), v=tuple(new_v)), tuple(taps[l] for l in tap_layers)


def packed_rejection_sample(keys: Array, packed: PackedBatch, target_logits: Array, draft_probs: Array | None,
                            params: SamplingParams, stop_ids: Array, mode: SamplingMode,
                            num_draft_slots: int) -> VerifyResult:
    """Verify every slot's packed drafts; per-slot outputs.

    keys [R, 2] per-slot PRNG keys; target_logits [T, V] (row t predicts the token after packed
    token t); draft_probs [T, V] the warped draft distribution each packed draft was sampled from
    (rows of anchors/padding ignored; None when every slot is greedy); params: per-slot
    `SamplingParams` [R] (temperature 0 = greedy slot, verified on token ids); stop_ids [n]
    (-1 pads); mode: the static sampling class covering the slots; num_draft_slots = γ (the width
    of the per-slot uniforms, for bit-compatibility with `rejection_sample`).
    Returns VerifyResult with accepted/next_token/terminated [R] and prefix_accepted [R, γ].
    """
    r, g = packed.num_slots, num_draft_slots
    t_len = packed.tokens.shape[0]
    slot_c = jnp.minimum(packed.token_slot, r - 1)
    is_draft = packed.valid & (packed.token_offset > 0)  # [T]
    prev = jnp.maximum(jnp.arange(t_len) - 1, 0)  # target row that scored packed token t
    target_ids = greedy_argmax(target_logits)  # [T]
    greedy = params.greedy  # [R]
    ell = packed.chunk_len - 1  # [R], -1 for idle slots

    key_u, key_next = split_keys(keys, 2)  # [R, 2] each, as rejection_sample with per-row keys
    if mode.greedy:
        target_probs = None
        passed = target_ids[prev] == packed.tokens
    else:
        token_params = jax.tree_util.tree_map(lambda x: x[slot_c], params)
        target_probs = warp_probs(target_logits, token_params, mode)  # [T, V]
        accept_p = acceptance_probabilities(packed.tokens[:, None], draft_probs[:, None], target_probs[prev][:, None])
        u = jax.vmap(lambda k: jax.random.uniform(k, (g,), jnp.float32))(key_u)  # [R, γ]
        u_tok = u[slot_c, jnp.clip(packed.token_offset - 1, 0, g - 1)]
        passed = jnp.where(greedy[slot_c], target_ids[prev] == packed.tokens, u_tok < accept_p[:, 0])
    seg = jnp.where(is_draft, packed.token_slot, r)  # drafts only; the rest go to a dropped segment
    big = jnp.int32(g + 1)
    first_fail = jax.ops.segment_min(jnp.where(passed, big, packed.token_offset), seg, num_segments=r + 1)[:r]
    accepted = jnp.clip(jnp.minimum(first_fail - 1, ell), 0, g).astype(jnp.int32)  # [R]
    in_prefix = is_draft & (packed.token_offset <= accepted[slot_c])
    stop = in_prefix & jnp.any(packed.tokens[:, None] == stop_ids[None, :], axis=-1)
    first_stop = jax.ops.segment_min(jnp.where(stop, packed.token_offset, big), seg, num_segments=r + 1)[:r]
    terminated = first_stop <= g

    # Next token: the target row after the last accepted token; residual where a draft was rejected.
    row = jnp.clip(packed.chunk_start + accepted, 0, t_len - 1)  # [R]
    next_greedy = target_ids[row]
    if mode.greedy:
        next_token = next_greedy
    else:
        rejected = accepted < ell
        p_t = target_probs[row]  # [R, V]
        p_d = draft_probs[jnp.minimum(row + 1, t_len - 1)]
        dist = jnp.where(rejected[:, None], residual_distribution(p_t, p_d), p_t)
        next_token = jnp.where(greedy, next_greedy, sample_from_probs(key_next, dist, mode))
    prefix = jnp.arange(g)[None, :] < accepted[:, None]  # [R, γ]
    return VerifyResult(accepted=jnp.where(terminated, first_stop, accepted).astype(jnp.int32),
                        next_token=next_token.astype(jnp.int32), terminated=terminated, prefix_accepted=prefix)
