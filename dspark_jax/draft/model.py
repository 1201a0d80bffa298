"""The DSpark / DFlash draft backbone (spec §1, §5.3) as a Flax linen module.

Parameter tree (mirrors the DeepSpec state-dict keys; kernels are [in, out]):

    embed_tokens/embedding [V, d]        frozen copy of the target embedding (stop_gradient inside)
    fc/kernel [n_ctx*d, d]               context projection W_c (no bias)
    hidden_norm/scale [d]
    layers_{i}/input_layernorm/scale, post_attention_layernorm/scale,
              self_attn/{q,k,v,o}_proj/kernel (+bias iff attention_bias), self_attn/{q,k}_norm/scale,
              mlp/{gate,up,down}_proj/kernel
    norm/scale [d]                       fresh final norm
    lm_head/kernel [d, V]                frozen copy of the target output embedding
    markov_head/...                      see heads.py (only if markov_rank > 0)
    confidence_head/proj/...             see heads.py (only if enable_confidence_head)

Context features: H_ctx = hidden_norm(fc(concat of tapped target layers)) is fed unchanged to every
layer; layer i projects it with its own k_proj/v_proj (+k_norm, +RoPE at the context positions;
no input_layernorm). Block queries attend to the visible context keys and to all K keys of their
own block (bidirectional). Logits, heads and softmax are float32.

Two forwards share one layer implementation:
  * `block_forward` — inference: new context rows are committed to a `DraftCache`, then the block
    attends to every committed context row of its batch row plus its own K tokens;
  * `train_forward` — training (packed layout of spec §1.6): S context rows, N blocks; block n sees
    context positions < anchor[n] and its own block; dummy blocks (block_keep=False) see nothing and
    produce finite outputs. Efficient per-block attention by default; `dense_reference=True`
    uses the explicit [N*K, S+N*K] mask with `gqa_attention` (tests only).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dspark_jax.draft import heads
from dspark_jax.draft.cache import DraftCache, commit_indices
from dspark_jax.draft.config import DraftConfig
from dspark_jax.draft.gemma4_config import Gemma4DraftConfig
from dspark_jax.target.gemma4 import Gemma4MLP, Gemma4RMSNorm, softcap
from dspark_jax.layers import GatedMLP, Projection, RMSNorm, apply_rope, dtype_of, gqa_attention

__all__ = ["DraftModel", "block_attention", "dense_training_mask", "init_draft_params", "trainable_mask",
           "make_block_tokens"]

Array = jax.Array
_F32 = jnp.float32
FROZEN = ("embed_tokens", "lm_head")


def make_block_tokens(anchor_tokens: Array, block_size: int, mask_token_id: int) -> Array:
    """[..., ] anchor ids -> [..., K] block ids `[anchor, M, ..., M]`."""
    masks = jnp.full((*anchor_tokens.shape, block_size - 1), mask_token_id, dtype=anchor_tokens.dtype)
    return jnp.concatenate([anchor_tokens[..., None], masks], axis=-1)


def block_attention(q: Array, ctx_k: Array, ctx_v: Array, ctx_mask: Array, blk_k: Array, blk_v: Array,
                    block_keep: Array, scale: float) -> Array:
    """Per-block attention over (masked context keys ; own block keys) with one softmax over S+K.

    q: [B, N, K, H, D]; ctx_k, ctx_v: [B, S, KVH, D]; ctx_mask: [B, N, S] (True = visible);
    blk_k, blk_v: [B, N, K, KVH, D]; block_keep: [B, N] (False = dummy block, sees nothing).
    Returns [B, N, K, H, D] in q.dtype. Rows with no visible key return zeros (finite values and
    gradients). Scores/softmax in float32.
    """
    b, n, k, h, d = q.shape
    kvh = ctx_k.shape[2]
    qg = q.reshape(b, n, k, kvh, h // kvh, d)
    s_ctx = jnp.einsum("bnqhgd,bshd->bnhgqs", qg, ctx_k, preferred_element_type=_F32) * scale
    s_blk = jnp.einsum("bnqhgd,bnphd->bnhgqp", qg, blk_k, preferred_element_type=_F32) * scale
    keep = block_keep.astype(bool)[:, :, None, None, None, None]
    m_ctx = ctx_mask.astype(bool)[:, :, None, None, None, :] & keep  # [B, N, 1, 1, 1, S]
    m_blk = keep  # broadcasts over the K block keys
    s_ctx = jnp.where(m_ctx, s_ctx, -jnp.inf)
    s_blk = jnp.where(m_blk, s_blk, -jnp.inf)
    row_max = jnp.maximum(jnp.max(s_ctx, axis=-1, keepdims=True), jnp.max(s_blk, axis=-1, keepdims=True))
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    e_ctx = jnp.where(m_ctx, jnp.exp(s_ctx - row_max), 0.0)
    e_blk = jnp.where(m_blk, jnp.exp(s_blk - row_max), 0.0)
    denom = jnp.sum(e_ctx, axis=-1, keepdims=True) + jnp.sum(e_blk, axis=-1, keepdims=True)
    denom = jnp.where(denom > 0, denom, 1.0)
    w_ctx = (e_ctx / denom).astype(ctx_v.dtype)
    w_blk = (e_blk / denom).astype(blk_v.dtype)
    out = (jnp.einsum("bnhgqs,bshd->bnqhgd", w_ctx, ctx_v, preferred_element_type=_F32)
           + jnp.einsum("bnhgqp,bnphd->bnqhgd", w_blk, blk_v, preferred_element_type=_F32))
    return out.reshape(b, n, k, h, d).astype(q.dtype)


def dense_training_mask(anchor_positions: Array, block_keep: Array, ctx_positions: Array, block_size: int) -> Array:
    """The explicit training mask of spec §1.6: [B, N*K, S + N*K] (True = may attend).

    Query q (block n = q // K) sees context key j iff ctx_positions[j] < anchor[n], block key j iff
    it is in block n; nothing if the block is a dummy.
    """
    b, n = anchor_positions.shape
    qb = jnp.arange(n * block_size) // block_size  # block of each query / block key
    keep_q = block_keep.astype(bool)[:, qb]  # [B, Q]
    ctx = ctx_positions[:, None, :] < anchor_positions[:, qb][:, :, None]  # [B, Q, S]
    blk = jnp.broadcast_to(qb[None, :, None] == qb[None, None, :], (b, n * block_size, n * block_size))
    return jnp.concatenate([ctx, blk], axis=-1) & keep_q[:, :, None]


class DraftAttention(nn.Module):
    """Qwen3 attention whose keys/values are [context rows ; block rows] (spec §1.4)."""

    config: DraftConfig

    @nn.compact
    def __call__(self, x, positions, ctx_h, ctx_positions, inv_freq, ctx_mask, block_keep,
                 cache_kv=None, write_idx=None, dense_mask=None):
        cfg = self.config
        dt = dtype_of(cfg.dtype)
        kw = dict(use_bias=cfg.attention_bias, std=cfg.initializer_range, dtype=dt, param_dtype=dt)
        b, q_len, _ = x.shape
        c = ctx_h.shape[1]
        h, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        gemma = isinstance(cfg, Gemma4DraftConfig)  # spec §1.5: Gemma norms, v_norm, k_eq_v, scale 1
        q_proj = Projection(h * hd, ("embed", "q_heads"), name="q_proj", **kw)
        k_proj = Projection(kvh * hd, ("embed", "kv_heads"), name="k_proj", **kw)
        v_proj = (None if gemma and cfg.attention_k_eq_v
                  else Projection(kvh * hd, ("embed", "kv_heads"), name="v_proj", **kw))
        if gemma:
            q_norm = Gemma4RMSNorm(cfg.rms_norm_eps, True, dt, "head_dim", name="q_norm")
            k_norm = Gemma4RMSNorm(cfg.rms_norm_eps, True, dt, "head_dim", name="k_norm")
            v_norm = Gemma4RMSNorm(cfg.rms_norm_eps, False, dt, name="v_norm")
        else:
            q_norm = RMSNorm(cfg.rms_norm_eps, dt, dt, "head_dim", name="q_norm")
            k_norm = RMSNorm(cfg.rms_norm_eps, dt, dt, "head_dim", name="k_norm")

        def keys_values(z, pos):  # z [B, n, d] -> post-norm, post-RoPE keys and values [B, n, KVH, hd]
            k_raw = k_proj(z).reshape(b, z.shape[1], kvh, hd)
            v = k_raw if v_proj is None else v_proj(z).reshape(b, z.shape[1], kvh, hd)  # k_eq_v: before k_norm
            return apply_rope(k_norm(k_raw), pos, inv_freq), (v_norm(v) if gemma else v)

        q = apply_rope(q_norm(q_proj(x).reshape(b, q_len, h, hd)), positions, inv_freq)
        kb, vb = keys_values(x, positions)
        kc, vc = keys_values(ctx_h, ctx_positions)

        new_kv = None
        if cache_kv is not None:  # commit the new context rows, then attend over the whole cache
            ck, cv = cache_kv
            rows = jnp.arange(b)[:, None]
            ck = ck.at[rows, write_idx].set(kc.astype(ck.dtype), mode="drop")
            cv = cv.at[rows, write_idx].set(vc.astype(cv.dtype), mode="drop")
            kc, vc, new_kv = ck, cv, (ck, cv)

        scale = 1.0 if gemma else hd ** -0.5
        if dense_mask is not None:
            out = gqa_attention(q, jnp.concatenate([kc, kb.astype(kc.dtype)], axis=1),
                                jnp.concatenate([vc, vb.astype(vc.dtype)], axis=1), dense_mask, scale)
        else:
            n = ctx_mask.shape[1]
            k = q_len // n
            out = block_attention(q.reshape(b, n, k, h, hd), kc, vc, ctx_mask,
                                  kb.reshape(b, n, k, kvh, hd).astype(kc.dtype),
                                  vb.reshape(b, n, k, kvh, hd).astype(vc.dtype), block_keep, scale)
        out = nn.with_logical_constraint(out.reshape(b, q_len, h * hd), ("batch", "length", "act_heads"))
        return Projection(cfg.hidden_size, ("q_heads", "embed"), name="o_proj", **kw)(out), new_kv


class DraftLayer(nn.Module):
    """x + attn(input_layernorm(x), H_ctx); x + mlp(post_attention_layernorm(x))."""

    config: DraftConfig
    layer: int = 0

    @nn.compact
    def __call__(self, x, positions, ctx_h, ctx_positions, inv_freq, ctx_mask, block_keep,
                 cache_kv=None, write_idx=None, dense_mask=None):
        cfg = self.config
        dt = dtype_of(cfg.dtype)
        if isinstance(cfg, Gemma4DraftConfig):  # sandwich norms, gelu-tanh MLP, layer_scalar (spec §1.5)
            def norm(name):
                return Gemma4RMSNorm(cfg.rms_norm_eps, True, dt, name=name)

            attn, new_kv = DraftAttention(cfg, name="self_attn")(
                norm("input_layernorm")(x), positions, ctx_h, ctx_positions, inv_freq, ctx_mask, block_keep,
                cache_kv, write_idx, dense_mask)
            x = x + norm("post_attention_layernorm")(attn)
            mlp = Gemma4MLP(cfg.layer_config().layer_intermediate_size(self.layer), cfg.initializer_range, dt,
                            name="mlp")
            x = x + norm("post_feedforward_layernorm")(mlp(norm("pre_feedforward_layernorm")(x)))
            scalar = self.param("layer_scalar", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (1,), dt)
            return nn.with_logical_constraint(x * scalar.astype(x.dtype), ("batch", "length", "act_embed")), new_kv
        u = RMSNorm(cfg.rms_norm_eps, dt, dt, name="input_layernorm")(x)
        attn, new_kv = DraftAttention(cfg, name="self_attn")(
            u, positions, ctx_h, ctx_positions, inv_freq, ctx_mask, block_keep, cache_kv, write_idx, dense_mask)
        x = x + attn
        u = RMSNorm(cfg.rms_norm_eps, dt, dt, name="post_attention_layernorm")(x)
        x = x + GatedMLP(cfg.intermediate_size, False, cfg.initializer_range, dt, dt, name="mlp")(u)
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), new_kv


class DraftModel(nn.Module):
    """DSpark/DFlash drafter. Call methods with `model.apply({'params': p}, ..., method=DraftModel.X)`."""

    config: DraftConfig

    def setup(self):
        cfg = self.config
        dt = dtype_of(cfg.dtype)
        std = cfg.initializer_range
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=dt,
                                     embedding_init=nn.with_logical_partitioning(
                                         nn.initializers.normal(std), ("vocab", "embed")))
        self.fc = Projection(cfg.hidden_size, ("ctx_embed", "embed"), std=std, dtype=dt, param_dtype=dt)
        gemma = isinstance(cfg, Gemma4DraftConfig)
        self.hidden_norm = Gemma4RMSNorm(cfg.rms_norm_eps, True, dt) if gemma else RMSNorm(cfg.rms_norm_eps, dt, dt)
        self.layers = [DraftLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = Gemma4RMSNorm(cfg.rms_norm_eps, True, dt) if gemma else RMSNorm(cfg.rms_norm_eps, dt, dt)
        self.lm_head = heads.LinearParams(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), std=std,
                                          param_dtype=dt)
        if cfg.has_markov_head:
            self.markov_head = heads.MarkovHead(cfg.vocab_size, cfg.hidden_size, cfg.markov_rank,
                                                cfg.markov_head_type, std, dt)
        if cfg.enable_confidence_head:
            self.confidence_head = heads.ConfidenceHead(cfg.confidence_in_features, std, dt)

    # ---------------------------------------------------------------- pieces
    def embed(self, tokens: Array) -> Array:
        """Frozen embedding lookup: [...] ids -> [..., d] (config dtype)."""
        table = jax.lax.stop_gradient(self.embed_tokens.embedding)
        x = jnp.take(table, tokens, axis=0).astype(dtype_of(self.config.dtype))
        if isinstance(self.config, Gemma4DraftConfig):  # sqrt(d) cast to the weight dtype (spec §1.5)
            x = x * jnp.asarray(self.config.embed_scale, jnp.float32).astype(table.dtype).astype(x.dtype)
        return x

    def project_context(self, taps_concat: Array) -> Array:
        """[B, C, n_ctx*d] concatenated target taps (ascending layer ids) -> H_ctx [B, C, d]."""
        return self.hidden_norm(self.fc(taps_concat))

    def compute_logits(self, h: Array) -> Array:
        """Base logits U = lm_head(h): [..., d] -> [..., V] float32 (frozen lm_head, f32 accumulation)."""
        kernel = jax.lax.stop_gradient(self.lm_head.kernel).astype(h.dtype)
        logits = jnp.einsum("...d,dv->...v", h, kernel, preferred_element_type=_F32,
                            precision=jax.lax.Precision.HIGHEST)
        return softcap(logits, getattr(self.config, "final_logit_softcapping", None))  # Gemma 4: s*tanh(U/s)

    def _backbone(self, x, positions, ctx_h, ctx_positions, ctx_mask, block_keep,
                  cache=None, write_idx=None, dense_mask=None):
        inv_freq = jnp.asarray(self.config.rope_inv_freq())
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            x, nkv = layer(x, positions, ctx_h, ctx_positions, inv_freq, ctx_mask, block_keep, kv, write_idx,
                           dense_mask)
            if nkv is not None:
                new_k.append(nkv[0])
                new_v.append(nkv[1])
        return self.norm(x), tuple(new_k), tuple(new_v)

    # ---------------------------------------------------------------- inference
    def block_forward(self, block_tokens: Array, block_positions: Array, ctx_cache: DraftCache, new_ctx: Array,
                      new_ctx_positions: Array, new_ctx_valid: Array) -> tuple[Array, Array, DraftCache]:
        """One draft round (spec §5.3).

        block_tokens [B, K] int (`[anchor, M, ..., M]`); block_positions [B, K] int (anchor pos + 0..K-1);
        ctx_cache: DraftCache; new_ctx [B, C, d] = project_context(features of the pending context
        rows); new_ctx_positions [B, C] int; new_ctx_valid [B, C] bool (valid rows of each batch row
        are committed in order; the others are ignored — rows may add different numbers).

        Returns (h [B, K, d] final-normed hidden, U [B, K, V] float32 base logits, updated cache with
        the new context rows committed; block rows are never cached).
        """
        cfg = self.config
        b = block_tokens.shape[0]
        s = ctx_cache.max_length
        write_idx, new_len = commit_indices(ctx_cache.lengths, new_ctx_valid, s)
        ctx_mask = (jnp.arange(s, dtype=jnp.int32)[None, :] < new_len[:, None])[:, None, :]  # [B, 1, S]
        keep = jnp.ones((b, 1), bool)
        x = self.embed(block_tokens)
        h, nk, nv = self._backbone(x, block_positions, new_ctx.astype(dtype_of(cfg.dtype)), new_ctx_positions,
                                   ctx_mask, keep, ctx_cache, write_idx)
        return h, self.compute_logits(h), DraftCache(k=nk, v=nv, lengths=new_len)

    # ---------------------------------------------------------------- training
    def train_forward(self, ctx_feats: Array, block_tokens: Array, anchor_positions: Array,
                      block_keep: Array | None = None, ctx_positions: Array | None = None, *,
                      ctx_projected: bool = False, dense_reference: bool = False) -> Array:
        """Packed training forward (spec §1.6, §4.2 step 4).

        ctx_feats [B, S, n_ctx*d] concatenated target taps (or H_ctx [B, S, d] if ctx_projected);
        block_tokens [B, N, K]; anchor_positions [B, N] int; block_keep [B, N] bool (default all True);
        ctx_positions [B, S] (default 0..S-1). Block n sits at positions anchor[n] + 0..K-1 and sees
        context rows with position < anchor[n] plus its own block. Returns h [B, N, K, d]
        (final-normed; logits via `compute_logits`, chunked by the caller if V is large).
        """
        b, n, k = block_tokens.shape
        ctx_h = ctx_feats if ctx_projected else self.project_context(ctx_feats)
        ctx_h = ctx_h.astype(dtype_of(self.config.dtype))
        s = ctx_h.shape[1]
        if ctx_positions is None:
            ctx_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        if block_keep is None:
            block_keep = jnp.ones((b, n), bool)
        anchor_positions = anchor_positions.astype(jnp.int32)
        positions = (anchor_positions[:, :, None] + jnp.arange(k, dtype=jnp.int32)).reshape(b, n * k)
        x = self.embed(block_tokens.reshape(b, n * k))
        if dense_reference:
            dense_mask, ctx_mask = dense_training_mask(anchor_positions, block_keep, ctx_positions, k), None
        else:
            dense_mask, ctx_mask = None, ctx_positions[:, None, :] < anchor_positions[:, :, None]
        h, _, _ = self._backbone(x, positions, ctx_h, ctx_positions, ctx_mask, block_keep, dense_mask=dense_mask)
        return h.reshape(b, n, k, -1)

    # ---------------------------------------------------------------- heads
    def markov_params(self) -> dict[str, Any]:
        """The `markov_head` parameter sub-tree (for the pure functions in heads.py)."""
        return self.markov_head.tree()

    def markov_bias(self, prev_ids: Array, h: Array | None = None) -> Array:
        """Teacher-forced bias [..., K, V] float32 from prev ids [..., K] (+ h [..., K, d] for gated/rnn).
        Zeros when markov_rank = 0 (DFlash)."""
        if not self.config.has_markov_head:
            return jnp.zeros((*prev_ids.shape, self.config.vocab_size), _F32)
        return self.markov_head.teacher_forced(prev_ids, h)

    def markov_step(self, prev_ids: Array, h_k: Array, state: Array) -> tuple[Array, Array]:
        """Sequential step: prev ids [B], h_k [B, d], state [B, r] -> (bias [B, V] f32, new state).
        Start from `heads.init_state((B,), config.markov_rank)`. DFlash: zero bias, state unchanged."""
        if not self.config.has_markov_head:
            return jnp.zeros((*prev_ids.shape, self.config.vocab_size), _F32), state
        return self.markov_head.step(prev_ids, h_k, state)

    def confidence_logits(self, h: Array, prev_ids: Array | None = None) -> Array:
        """Confidence logits [...] float32 from h [..., d] and prev ids [...] (features [h ; W1[prev]];
        prev ids are ignored when confidence_head_with_markov is False)."""
        cfg = self.config
        if not cfg.enable_confidence_head:
            raise ValueError("this draft has no confidence head (enable_confidence_head=False)")
        if cfg.confidence_head_with_markov:
            if prev_ids is None:
                raise ValueError("confidence_head_with_markov=True: confidence_logits needs prev_ids")
            return heads.confidence_logits(self.confidence_head.tree(), h, prev_ids, self.markov_head.tree())
        return heads.confidence_logits(self.confidence_head.tree(), h)

    def __call__(self, ctx_feats: Array, block_tokens: Array, anchor_positions: Array,
                 block_keep: Array | None = None, prev_ids: Array | None = None) -> dict[str, Array]:
        """Whole teacher-forced training forward (touches every parameter; used by `init`).

        prev_ids [B, N, K] default = block_tokens. Returns {'hidden' [B,N,K,d], 'base_logits',
        'logits' (U + Markov bias) [B,N,K,V] f32, 'confidence' [B,N,K] f32 (if enabled)}.
        Materialises full-vocab logits: for real training sizes use `train_forward` + chunked heads.
        """
        h = self.train_forward(ctx_feats, block_tokens, anchor_positions, block_keep)
        prev = block_tokens if prev_ids is None else prev_ids
        u = self.compute_logits(h)
        out = {"hidden": h, "base_logits": u, "logits": u + self.markov_bias(prev, h)}
        if self.config.enable_confidence_head:
            out["confidence"] = self.confidence_logits(h, prev)
        return out


def init_draft_params(config: DraftConfig, rng: Array) -> dict[str, Any]:
    """Fresh parameters (HF defaults: normal(0, initializer_range) weights, zero biases, unit norms), unboxed."""
    model = DraftModel(config)
    k = config.block_size
    ctx = jnp.zeros((1, 2, config.context_dim), dtype_of(config.dtype))
    tokens = jnp.zeros((1, 1, k), jnp.int32)
    anchors = jnp.ones((1, 1), jnp.int32)
    variables = jax.jit(model.init)(rng, ctx, tokens, anchors)
    return nn.meta.unbox(variables)["params"]


def trainable_mask(params: dict[str, Any]) -> dict[str, Any]:
    """Pytree of bools (False for the frozen embed_tokens / lm_head), e.g. for `optax.masked`."""
    return {name: jax.tree_util.tree_map(lambda _: name not in FROZEN, sub) for name, sub in params.items()}
