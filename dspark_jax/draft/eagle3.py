"""Eagle-3 baseline drafter (spec §9.2): config, one-layer model, TTT training forward and loss.

Architecture (SpecForge / DeepSpec `eagle3`, Qwen3-style layer):
    g_in   = fc(concat of the tapped target layers)       first step only ([B, T, n_ctx*d] -> [B, T, d])
           | the previous step's output hidden             later steps
    u      = concat[input_layernorm(embed(token)), hidden_norm(g_in)]          [B, T, 2d]
    q,k,v  = q_proj(u), k_proj(u), v_proj(u)   (input 2d; per-head q_norm / k_norm; RoPE; GQA)
    x      = g_in + o_proj(attention)
    g_out  = x + mlp(post_attention_layernorm(x))          the step's output hidden (fed onward)
    logits = lm_head(norm(g_out))                          frozen copied lm_head; float32
Pairing: the row at position i holds (target hidden h_i, token x_{i+1}) and predicts x_{i+2}.

TTT (test-time training) unrolls `ttt_length` steps over a sequence: step s at base index i sits
at RoPE position i + s, feeds step s-1's output hidden at i and the token x_{i+1+s}, and attends
to step-0 keys at indices <= i (causal) plus the same-index key i of every step 1..s ("diagonal").
Loss: sum_s 0.8^s * sum_i w_s[i] * CE(p_target(. | pos i+1+s), p_draft) / (B * T), with DeepSpec's
position weights w_s[i] = loss_mask[i + s] (0 at the last valid token; see `ttt_position_weights`).
That attention pattern is exactly inference's chain drafting through a KV cache (see `infer.eagle3`).
Layout and semantics follow DeepSpec `deepspec/modeling/eagle3/{common,loss}.py`, `qwen3/modeling.py`
(see docs/gemma4_eagle3.md, "Parity with DeepSpec").
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.config import ConfigError, RopeScaling, TargetConfig, field_float, field_int, stored_dtype
from dspark_jax.draft.config import (DraftConfigError, finish_from_target,
                                     qwen3_layers_config, target_shape_fields)
from dspark_jax.draft.heads import LinearParams
from dspark_jax.layers import GatedMLP, Projection, RMSNorm, apply_rope, dtype_of, gqa_attention
from dspark_jax.target.kv_cache import write_rows

__all__ = ["Eagle3Config", "Eagle3Model", "EAGLE3_ARCHITECTURE", "init_eagle3_params", "ttt_mask", "ttt_forward",
           "ttt_loss", "ttt_position_weights", "eagle3_trainable_mask", "is_eagle3_architecture"]

EAGLE3_ARCHITECTURE = "Qwen3Eagle3Model"  # DeepSpec `deepspec/modeling/eagle3/qwen3/config.py`
_LEGACY_ARCHITECTURE_SUFFIX = "Eagle3"  # SpecForge-style exports, e.g. "Qwen3ForCausalLMEagle3" (read only)
_F32 = jnp.float32
FROZEN = ("embed_tokens", "lm_head")
Array = jax.Array


def is_eagle3_architecture(archs: Any) -> bool:
    """Whether a `config.json` `architectures` list names an Eagle-3 draft: DeepSpec's `*Eagle3Model`
    or a SpecForge-style `*Eagle3` (the read-only alias)."""
    return (isinstance(archs, list) and bool(archs) and
            str(archs[0]).endswith(("Eagle3Model", _LEGACY_ARCHITECTURE_SUFFIX)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Eagle3Config:
    """Eagle-3 draft: target layer shapes (Qwen3/Llama family), one layer, 5 tapped layers, TTT length.

    `block_size` is the default chain length K at inference (drafts per round); `step_decay` the
    per-step TTT loss weight (0.8). No confidence head (the speculative loop verifies all K).
    """

    chain_drafter: ClassVar[bool] = True  # drafts one token at a time (not one parallel block)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    num_target_layers: int
    target_layer_ids: tuple[int, ...]
    ttt_length: int = 7
    block_size: int = 7
    step_decay: float = 0.8  # config.json `step_loss_decay`
    dtype: str = "float32"

    enable_confidence_head = False  # capability flags read by the speculative front end
    num_hidden_layers = 1

    def __post_init__(self):
        object.__setattr__(self, "target_layer_ids", tuple(int(i) for i in self.target_layer_ids))
        if self.ttt_length < 1 or self.block_size < 1:
            raise DraftConfigError(f"ttt_length and block_size must be >= 1, got {self.ttt_length}, {self.block_size}")
        ids = self.target_layer_ids
        if not ids or list(ids) != sorted(set(ids)) or ids[0] < -1 or ids[-1] >= self.num_target_layers - 1:
            raise DraftConfigError(f"target_layer_ids {list(ids)} must be strictly increasing within "
                                   f"[-1, {self.num_target_layers - 2}] (num_target_layers={self.num_target_layers})")
        try:
            self.layer_config()
        except ConfigError as e:
            raise DraftConfigError(str(e)) from e

    @property
    def context_dim(self) -> int:
        """Width of the concatenated target taps: len(target_layer_ids) * hidden_size."""
        return len(self.target_layer_ids) * self.hidden_size

    def layer_config(self) -> TargetConfig:
        """A one-layer Qwen3 TargetConfig with the draft's attention shapes (RoPE, checks)."""
        return qwen3_layers_config(self, 1)

    def kv_cache_layer_shapes(self) -> tuple[tuple[int, int], ...]:
        """One layer's (kv heads, head dim), so `KVCache.create(eagle3_config, ...)` builds the draft cache."""
        return ((self.num_key_value_heads, self.head_dim),)

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse RoPE frequencies [head_dim // 2] (the target's)."""
        return self.layer_config().rope_inv_freq()

    def replace(self, **changes: Any) -> "Eagle3Config":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_target(cls, target: TargetConfig, **fields: Any) -> "Eagle3Config":
        """An Eagle-3 draft for a Qwen3/Llama target (default: the DSpark 5 tapped layers, TTT 7)."""
        if target.family not in ("qwen3", "llama"):
            raise DraftConfigError(f"Eagle-3 drafts support Qwen3/Llama targets, got family {target.family!r}")
        return finish_from_target(cls, target, target_shape_fields(target), fields)

    def validate_against_target(self, target: TargetConfig) -> None:
        """Raise DraftConfigError if the draft cannot run against `target` (names both values)."""
        for name, mine, theirs in (("vocab_size", self.vocab_size, target.vocab_size),
                                   ("hidden_size", self.hidden_size, target.hidden_size),
                                   ("num_target_layers", self.num_target_layers, target.num_hidden_layers)):
            if mine != theirs:
                raise DraftConfigError(f"Eagle-3 draft {name}={mine} != target's {theirs}")

    # ------------------------------------------------------------------ config.json (DeepSpec eagle3)
    def to_eagle3_config(self, *, dtype: str | None = None) -> dict[str, Any]:
        """The checkpoint `config.json` as DeepSpec's `build_draft_config` writes it: the target's Qwen3
        text config with architectures ["Qwen3Eagle3Model"], num_hidden_layers = draft_num_hidden_layers
        = 1, full-attention layer_types, num_target_layers, target_layer_ids, ttt_length,
        step_loss_decay, untied embeddings; plus our `block_size` (default chain length K)."""
        hf = self.layer_config().to_hf_config()
        hf.update(architectures=[EAGLE3_ARCHITECTURE], num_hidden_layers=1, draft_num_hidden_layers=1,
                  layer_types=["full_attention"], tie_word_embeddings=False,
                  num_target_layers=self.num_target_layers, target_layer_ids=list(self.target_layer_ids),
                  ttt_length=self.ttt_length, step_loss_decay=self.step_decay, block_size=self.block_size,
                  dtype=dtype or self.dtype)
        return dict(sorted(hf.items()))

    @classmethod
    def from_eagle3_config(cls, hf: dict[str, Any], *, dtype: str | None = None,
                           source: str = "config.json") -> "Eagle3Config":
        """Parse an Eagle-3 `config.json`: DeepSpec's (architectures ["Qwen3Eagle3Model"]) or, as an alias,
        a SpecForge-style one (`*Eagle3`, ids in `eagle_config.eagle_aux_hidden_state_layer_ids`). Fields
        type- and range-checked (DraftConfigError naming the field and `source`); `dtype` None -> stored."""
        if not isinstance(hf, dict):
            raise DraftConfigError(f"{source}: expected a JSON object at the top level, got {type(hf).__name__}")
        archs = hf.get("architectures") or []
        if not is_eagle3_architecture(archs):
            raise DraftConfigError(f"{source}: architectures={archs!r}; expected [{EAGLE3_ARCHITECTURE!r}]")
        if not str(archs[0]).startswith(("Qwen3", "Llama")):
            raise DraftConfigError(f"{source}: architectures={archs!r}: only Qwen3/Llama Eagle-3 drafts are supported")
        try:
            for key in ("num_hidden_layers", "draft_num_hidden_layers"):
                if field_int(hf, key, source, default=1) != 1:
                    raise DraftConfigError(f"{source}: {key}={hf[key]}; only 1-layer Eagle-3 drafts are supported")
            draft_vocab = field_int(hf, "draft_vocab_size", source, default=None)
            if draft_vocab is not None and draft_vocab != hf.get("vocab_size"):
                raise DraftConfigError(f"{source}: draft_vocab_size={draft_vocab} != vocab_size="
                                       f"{hf.get('vocab_size')}: reduced draft vocabularies are not supported")
            ids = hf.get("target_layer_ids") or (hf.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
            if ids is None:
                raise DraftConfigError(f"{source}: missing required field 'target_layer_ids'")
            if not isinstance(ids, (list, tuple)):
                raise DraftConfigError(f"{source}: target_layer_ids must be a list, got {ids!r}")
            ids = tuple(field_int({"target_layer_ids": i}, "target_layer_ids", source) for i in ids)
            base = {k: v for k, v in hf.items() if k not in ("dtype", "torch_dtype")}
            base.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
            lc = TargetConfig.from_hf_config(base, source=source)
            return cls(vocab_size=lc.vocab_size, hidden_size=lc.hidden_size, intermediate_size=lc.intermediate_size,
                       num_attention_heads=lc.num_attention_heads, num_key_value_heads=lc.num_key_value_heads,
                       head_dim=lc.head_dim, rms_norm_eps=lc.rms_norm_eps, rope_theta=lc.rope_theta,
                       rope_scaling=lc.rope_scaling, max_position_embeddings=lc.max_position_embeddings,
                       initializer_range=lc.initializer_range,
                       num_target_layers=field_int(hf, "num_target_layers", source, minimum=1),
                       target_layer_ids=ids, ttt_length=field_int(hf, "ttt_length", source, default=7, minimum=1),
                       block_size=field_int(hf, "block_size", source,
                                            default=field_int(hf, "ttt_length", source, default=7), minimum=1),
                       step_decay=field_float(hf, "step_loss_decay", source, default=0.8, positive=True),
                       dtype=dtype or stored_dtype(hf))
        except DraftConfigError:
            raise
        except ConfigError as e:
            raise DraftConfigError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None


class Eagle3Model(nn.Module):
    """The Eagle-3 drafter. Call methods with `model.apply({'params': p}, ..., method=Eagle3Model.X)`.

    Params (DeepSpec module tree; `layers.0.*` in the checkpoint): embed_tokens/embedding [V, d] (frozen),
    fc/kernel [n_ctx*d, d], layers_0/{input_layernorm, hidden_norm, post_attention_layernorm}/scale [d],
    layers_0/{q,k,v}_proj/kernel [2d, *], layers_0/o_proj/kernel, layers_0/{q,k}_norm/scale [hd],
    layers_0/mlp/{gate,up,down}_proj/kernel, norm/scale [d], lm_head/kernel [d, V] (frozen).
    """

    config: Eagle3Config

    def setup(self):
        cfg = self.config
        dt, std = dtype_of(cfg.dtype), cfg.initializer_range
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=dt,
                                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(std),
                                                                                 ("vocab", "embed")))
        self.fc = Projection(cfg.hidden_size, ("ctx_embed", "embed"), std=std, dtype=dt, param_dtype=dt)
        self.layers_0 = Eagle3Layer(cfg)
        self.norm = RMSNorm(cfg.rms_norm_eps, dt, dt)
        self.lm_head = LinearParams(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), std=std, param_dtype=dt)

    def project_context(self, taps_concat: Array) -> Array:
        """[B, T, n_ctx*d] concatenated target taps -> first-step hidden input [B, T, d]."""
        return self.fc(taps_concat)

    def step(self, hidden: Array, tokens: Array, positions: Array, keys: tuple[Array, Array] | None,
             key_positions: Array | None = None, mask: Array | None = None, cache_kv=None) -> tuple[Array, Any]:
        """One Eagle-3 layer pass over T rows.

        hidden [B, T, d] (fc output or previous step output); tokens [B, T]; positions [B, T].
        Attention keys: with `cache_kv` (k, v [B, S, KVH, hd]) the rows' keys are written at their
        positions and each row sees cache indices <= its position (returns the new (k, v));
        otherwise `keys` = extra (k, v) [B, S, KVH, hd] placed before the rows' own keys and `mask`
        [B, T, S + T] selects what each row sees (TTT). Returns (output hidden [B, T, d], kv).
        """
        table = jax.lax.stop_gradient(self.embed_tokens.embedding)
        emb = jnp.take(table, tokens, axis=0).astype(dtype_of(self.config.dtype))
        return self.layers_0(emb, hidden, positions, keys, mask, cache_kv)

    def compute_logits(self, h: Array) -> Array:
        """lm_head(norm(h)) float32: [..., d] -> [..., V] (frozen lm_head)."""
        x = self.norm(h)
        kernel = jax.lax.stop_gradient(self.lm_head.kernel).astype(x.dtype)
        return jnp.einsum("...d,dv->...v", x, kernel, preferred_element_type=_F32,
                          precision=jax.lax.Precision.HIGHEST)

    def __call__(self, taps_concat: Array, tokens: Array) -> Array:
        """Init / smoke path: one causal step-0 pass -> logits [B, T, V]."""
        b, t = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
        h, _ = self.step(self.project_context(taps_concat), tokens, pos, None, mask=mask)
        return self.compute_logits(h)


class Eagle3Layer(nn.Module):
    """The single decoder layer over [input_layernorm(emb) ; hidden_norm(hidden)] (spec §9.2)."""

    config: Eagle3Config

    @nn.compact
    def __call__(self, emb, hidden, positions, keys, mask, cache_kv):
        cfg = self.config
        dt = dtype_of(cfg.dtype)
        kw = dict(std=cfg.initializer_range, dtype=dt, param_dtype=dt)
        b, t, _ = hidden.shape
        h, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        inv_freq = jnp.asarray(cfg.rope_inv_freq())
        u = jnp.concatenate([RMSNorm(cfg.rms_norm_eps, dt, dt, name="input_layernorm")(emb),
                             RMSNorm(cfg.rms_norm_eps, dt, dt, name="hidden_norm")(hidden)], axis=-1)  # [B, T, 2d]
        q = Projection(h * hd, ("embed", "q_heads"), name="q_proj", **kw)(u).reshape(b, t, h, hd)
        k = Projection(kvh * hd, ("embed", "kv_heads"), name="k_proj", **kw)(u).reshape(b, t, kvh, hd)
        v = Projection(kvh * hd, ("embed", "kv_heads"), name="v_proj", **kw)(u).reshape(b, t, kvh, hd)
        q = apply_rope(RMSNorm(cfg.rms_norm_eps, dt, dt, "head_dim", name="q_norm")(q), positions, inv_freq)
        k = apply_rope(RMSNorm(cfg.rms_norm_eps, dt, dt, "head_dim", name="k_norm")(k), positions, inv_freq)
        new_kv = (k, v)
        if cache_kv is not None:
            ck, cv = write_rows(cache_kv[0], k, positions[:, 0]), write_rows(cache_kv[1], v, positions[:, 0])
            new_kv = (ck, cv)
            s = ck.shape[1]
            mask = jnp.arange(s, dtype=jnp.int32)[None, None, :] <= positions[:, :, None]  # [B, T, S]
            k_all, v_all = ck, cv
        elif keys is not None:
            k_all = jnp.concatenate([keys[0].astype(k.dtype), k], axis=1)
            v_all = jnp.concatenate([keys[1].astype(v.dtype), v], axis=1)
        else:
            k_all, v_all = k, v
        out = gqa_attention(q, k_all, v_all, mask, hd ** -0.5).reshape(b, t, h * hd)
        x = hidden + Projection(cfg.hidden_size, ("q_heads", "embed"), name="o_proj", **kw)(out)
        z = RMSNorm(cfg.rms_norm_eps, dt, dt, name="post_attention_layernorm")(x)
        x = x + GatedMLP(cfg.intermediate_size, False, cfg.initializer_range, dt, dt, name="mlp")(z)
        return x, new_kv


def init_eagle3_params(config: Eagle3Config, rng: Array) -> dict[str, Any]:
    """Fresh parameters (HF defaults: N(0, initializer_range) weights, unit norms), unboxed."""
    taps = jnp.zeros((1, 2, config.context_dim), dtype_of(config.dtype))
    toks = jnp.zeros((1, 2), jnp.int32)
    return nn.meta.unbox(jax.jit(Eagle3Model(config).init)(rng, taps, toks))["params"]


def eagle3_trainable_mask(params: dict[str, Any]) -> dict[str, Any]:
    """Pytree of bools: False for the frozen embed_tokens / lm_head."""
    return {name: jax.tree_util.tree_map(lambda _: name not in FROZEN, sub) for name, sub in params.items()}


def ttt_mask(seq_len: int, step: int, valid: Array | None = None) -> Array:
    """Step `step`'s attention mask [T, (step+1)*T] over keys [step 0 | step 1 | ... | step]:
    step-0 keys causal (j <= i), later steps only the same index (j == i). `valid` [T] masks keys."""
    i = jnp.arange(seq_len)
    causal = i[None, :] <= i[:, None]
    diag = jnp.eye(seq_len, dtype=bool)
    m = jnp.concatenate([causal] + [diag] * step, axis=1)
    if valid is not None:
        m = m & jnp.tile(valid.astype(bool), step + 1)[None, :]
    return m


def ttt_forward(model: Eagle3Model, params, taps_concat: Array, input_ids: Array, ttt_length: int,
                attention_mask: Array | None = None) -> Array:
    """Unrolled TTT forward: output hiddens [S, B, T, d] for steps s = 0..S-1.

    taps_concat [B, T, n_ctx*d] target taps at positions 0..T-1; input_ids [B, T]; step s at base
    index i feeds token input_ids[i + 1 + s] (0 past the end) at RoPE position i + s.
    attention_mask [B, T] key validity (default all valid).
    """
    b, t = input_ids.shape
    p = {"params": params}
    hidden = model.apply(p, taps_concat, method=Eagle3Model.project_context)
    pad = jnp.zeros((b, ttt_length + 1), input_ids.dtype)
    ids = jnp.concatenate([input_ids, pad], axis=1)
    base = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    ks, vs, outs = [], [], []
    for s in range(ttt_length):
        tokens = jax.lax.dynamic_slice_in_dim(ids, 1 + s, t, axis=1)
        mask = jax.vmap(lambda v: ttt_mask(t, s, v))(valid)  # [B, T, (s+1)T]
        keys = None if s == 0 else (jnp.concatenate(ks, axis=1), jnp.concatenate(vs, axis=1))
        hidden, (k, v) = model.apply(p, hidden, tokens, base + s, keys, mask=mask, method=Eagle3Model.step)
        ks.append(k)
        vs.append(v)
        outs.append(hidden)
    return jnp.stack(outs)


def ttt_position_weights(loss_mask: Array, ttt_length: int, attention_mask: Array | None = None) -> Array:
    """DeepSpec's per-step position weights [S, B, T] (`deepspec/modeling/eagle3/loss.py`).

    loss_mask [B, T]: 1 on tokens to learn from (DeepSpec's parser: the response tokens);
    attention_mask [B, T]: valid tokens (default all). Step 0 weights base index i by loss_mask[i],
    except the last valid token (no next-token target inside the sequence); step s shifts that left
    by s: w_s[i] = w_0[i + s] (0 past the end).
    """
    b, t = loss_mask.shape
    valid_len = t if attention_mask is None else jnp.sum(attention_mask.astype(jnp.int32), axis=1, keepdims=True)
    w0 = loss_mask.astype(_F32) * (jnp.arange(t)[None, :] != jnp.asarray(valid_len) - 1)  # [B, T]
    padded = jnp.concatenate([w0, jnp.zeros((b, ttt_length), _F32)], axis=1)
    return jnp.stack([padded[:, s:s + t] for s in range(ttt_length)])


def ttt_loss(model: Eagle3Model, params, taps_concat: Array, input_ids: Array, target_logits: Array,
             loss_mask: Array, ttt_length: int, step_decay: float = 0.8,
             attention_mask: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """TTT soft cross-entropy (spec §9.2) -> (loss, {'step_loss' [S], 'step_acc' [S], 'step_ce' [S, B, T]}).

    target_logits [B, T, V] float32: the target's logits at positions 0..T-1 (row j predicts x_{j+1});
    loss_mask / attention_mask [B, T]: see `ttt_position_weights`. Step s at base i predicts x_{i+2+s}
    against the target distribution of row i+1+s (uniform past the end), weighted by
    `ttt_position_weights`; each step's sum is divided by B*T (DeepSpec's "local_mean") and weighted
    step_decay^s.
    """
    b, t = input_ids.shape
    hs = ttt_forward(model, params, taps_concat, input_ids, ttt_length, attention_mask)
    pad = ttt_length + 2
    tl = jnp.concatenate([target_logits.astype(_F32), jnp.zeros((b, pad, target_logits.shape[-1]), _F32)], axis=1)
    weights = ttt_position_weights(loss_mask, ttt_length, attention_mask)  # [S, B, T]
    total, losses, accs, ces = 0.0, [], [], []
    for s in range(ttt_length):
        logp = jax.nn.log_softmax(model.apply({"params": params}, hs[s], method=Eagle3Model.compute_logits), -1)
        pt = jax.nn.softmax(jax.lax.dynamic_slice_in_dim(tl, 1 + s, t, axis=1), -1)  # [B, T, V]
        m = weights[s]  # [B, T]
        ce = -jnp.sum(pt * logp, axis=-1)  # [B, T]
        step = jnp.sum(ce * m) / (b * t)
        acc = jnp.sum((jnp.argmax(logp, -1) == jnp.argmax(pt, -1)) * m) / jnp.maximum(jnp.sum(m), 1.0)
        total = total + (step_decay ** s) * step
        losses.append(step)
        accs.append(acc)
        ces.append(ce)
    return total, {"step_loss": jnp.stack(losses), "step_acc": jnp.stack(accs), "step_ce": jnp.stack(ces)}
