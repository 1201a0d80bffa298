"""Gemma 4 DSpark / DFlash draft configuration (spec §1.5, §6): `Gemma4DSparkModel` checkpoints.

Every draft layer is a full-attention layer of the target: head dim `global_head_dim`, KV heads
`num_global_key_value_heads` if `attention_k_eq_v` else `num_key_value_heads`, RoPE
`rope_parameters['full_attention']` (proportional partial rotary). The MLP width doubles iff
`use_double_wide_mlp` and `layer_idx >= (draft layers - num_kv_shared_layers) > 0` (the inherited
`num_kv_shared_layers`, the draft's depth). Logits are soft-capped with the target's
`final_logit_softcapping`. `config.json` is the target's text config with the draft overrides.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from dspark_jax.config import ConfigError, field_bool, field_int, stored_dtype
from dspark_jax.draft.config import DraftConfig, DraftConfigError, finish_from_target
from dspark_jax.gemma4_config import FULL, Gemma4Config, RopeSpec, proportional_inv_freq

__all__ = ["Gemma4DraftConfig", "GEMMA4_DRAFT_ARCHITECTURE"]

GEMMA4_DRAFT_ARCHITECTURE = "Gemma4DSparkModel"
_DRAFT_KEYS = ("num_target_layers", "block_size", "mask_token_id", "target_layer_ids", "num_anchors",
               "enable_confidence_head", "confidence_head_with_markov", "markov_rank", "markov_head_type",
               "target_model_type", "target_text_model_type", "architectures")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _DraftLayersConfig(Gemma4Config):
    """Gemma4Config of the draft's own layers: all full attention, no KV sharing, draft MLP-width rule."""

    draft_kv_shared_layers: int = 0

    def layer_intermediate_size(self, i: int) -> int:
        """Doubled iff use_double_wide_mlp and i >= (draft layers - num_kv_shared_layers) > 0 (spec §1.5)."""
        first = self.num_hidden_layers - self.draft_kv_shared_layers
        return self.intermediate_size * (2 if self.use_double_wide_mlp and first > 0 and i >= first else 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma4DraftConfig(DraftConfig):
    """A DSpark/DFlash draft for a Gemma 4 target (`head_dim` / `num_key_value_heads` = full-layer values)."""

    attention_k_eq_v: bool = False
    rope_full: RopeSpec = Gemma4Config.rope_full
    final_logit_softcapping: float | None = None
    use_double_wide_mlp: bool = False
    num_kv_shared_layers: int = 0
    hidden_activation: str = "gelu_pytorch_tanh"
    # The target's text config.json (JSON), re-emitted with the draft overrides by to_deepspec_config.
    target_text_config: str = dataclasses.field(default="{}", compare=False)

    def layer_config(self) -> _DraftLayersConfig:
        """The draft layers as a Gemma4Config (full attention x draft depth, per-layer MLP width rule)."""
        return _DraftLayersConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, global_head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_full.rope_theta,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=False,
            attention_bias=self.attention_bias, initializer_range=self.initializer_range, dtype=self.dtype,
            layer_types=(FULL,) * self.num_hidden_layers, attention_k_eq_v=self.attention_k_eq_v,
            use_double_wide_mlp=self.use_double_wide_mlp, final_logit_softcapping=self.final_logit_softcapping,
            hidden_activation=self.hidden_activation, rope_full=self.rope_full,
            draft_kv_shared_layers=self.num_kv_shared_layers)

    def rope_inv_freq(self) -> np.ndarray:
        """The target's full-attention (proportional) inverse frequencies [head_dim // 2]."""
        return proportional_inv_freq(self.rope_full, self.head_dim)

    @property
    def embed_scale(self) -> float:
        """sqrt(hidden_size), multiplied onto the frozen embedding (cast to the weight dtype)."""
        return float(self.hidden_size) ** 0.5

    @classmethod
    def from_target(cls, target_config: Gemma4Config, **draft_fields: Any) -> "Gemma4DraftConfig":
        """A fresh Gemma 4 draft for `target_config` (same defaults as `DraftConfig.from_target`)."""
        t = target_config
        if not isinstance(t, Gemma4Config):
            raise DraftConfigError(f"Gemma4DraftConfig needs a Gemma 4 target, got family {t.family!r}")
        if "mask_token_id" not in draft_fields:
            raise DraftConfigError("from_target needs mask_token_id (an otherwise unused vocabulary row)")
        full = t.layer_types.index(FULL)
        fields: dict[str, Any] = dict(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_attention_heads=t.num_attention_heads, num_key_value_heads=t.layer_kv_heads(full),
            head_dim=t.layer_head_dim(full), rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_full.rope_theta,
            attention_bias=t.attention_bias, max_position_embeddings=t.max_position_embeddings,
            initializer_range=t.initializer_range, num_target_layers=t.num_hidden_layers, dtype=t.dtype,
            attention_k_eq_v=t.attention_k_eq_v, rope_full=t.rope_full,
            final_logit_softcapping=t.final_logit_softcapping, use_double_wide_mlp=t.use_double_wide_mlp,
            num_kv_shared_layers=t.num_kv_shared_layers, hidden_activation=t.hidden_activation,
            target_text_config=json.dumps(t.text_config_dict(), sort_keys=True))
        return finish_from_target(cls, t, fields, draft_fields)

    @classmethod
    def from_deepspec_config(cls, hf: dict[str, Any], *, dtype: str | None = None,
                             source: str = "config.json") -> "Gemma4DraftConfig":
        """Parse a `Gemma4DSparkModel` config.json (the target text config plus draft overrides)."""
        if not isinstance(hf, dict):
            raise DraftConfigError(f"{source}: expected a JSON object at the top level, got {type(hf).__name__}")
        try:
            return cls._from_checked_gemma4(hf, dtype=dtype, source=source)
        except DraftConfigError:
            raise
        except ConfigError as e:
            raise DraftConfigError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None

    @classmethod
    def _from_checked_gemma4(cls, hf: dict[str, Any], *, dtype: str | None, source: str) -> "Gemma4DraftConfig":
        archs = hf.get("architectures") or []
        if not isinstance(archs, list) or not archs or archs[0] != GEMMA4_DRAFT_ARCHITECTURE:
            raise DraftConfigError(f"{source}: architectures={archs!r}; expected [{GEMMA4_DRAFT_ARCHITECTURE!r}]")
        for key in ("num_target_layers", "block_size", "mask_token_id", "target_layer_ids"):
            if hf.get(key) is None:
                raise DraftConfigError(f"{source}: missing required draft field {key!r}")
        n = field_int(hf, "num_hidden_layers", source, minimum=1)
        n_target = field_int(hf, "num_target_layers", source, minimum=1)
        ids = hf["target_layer_ids"]
        if not isinstance(ids, (list, tuple)):
            raise DraftConfigError(f"{source}: target_layer_ids must be a list, got {ids!r}")
        ids = tuple(field_int({"target_layer_ids": i}, "target_layer_ids", source) for i in ids)
        layer_types = hf.get("layer_types")
        if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != n
                                        or any(t != FULL for t in layer_types)):
            raise DraftConfigError(f"{source}: layer_types={layer_types!r}; expected ['{FULL}'] x "
                                   f"num_hidden_layers={n}")
        if hf.get("tie_word_embeddings"):
            raise DraftConfigError(f"{source}: tie_word_embeddings=true; DeepSpec drafts store a separate lm_head")
        text = {k: v for k, v in hf.items() if k not in _DRAFT_KEYS}
        text.update(model_type="gemma4_text", layer_types=[FULL] * n, num_kv_shared_layers=0)
        try:
            lc = Gemma4Config.from_hf_config(text, source=f"{source} ({GEMMA4_DRAFT_ARCHITECTURE})")
        except ConfigError as e:
            raise DraftConfigError(str(e)) from e
        rank = field_int(hf, "markov_rank", source, default=0, minimum=0)
        conf = field_bool(hf, "enable_confidence_head", source, default=False)
        if conf and "confidence_head_with_markov" not in hf:
            raise DraftConfigError(f"{source}: enable_confidence_head=true but confidence_head_with_markov is missing")
        target_text = {k: v for k, v in hf.items() if k not in _DRAFT_KEYS}
        target_text.update(num_hidden_layers=n_target)
        target_text.pop("layer_types", None)
        return cls(
            vocab_size=lc.vocab_size, hidden_size=lc.hidden_size, intermediate_size=lc.intermediate_size,
            num_attention_heads=lc.num_attention_heads, num_key_value_heads=lc.layer_kv_heads(0),
            head_dim=lc.layer_head_dim(0), rms_norm_eps=lc.rms_norm_eps, rope_theta=lc.rope_full.rope_theta,
            attention_bias=lc.attention_bias, max_position_embeddings=lc.max_position_embeddings,
            initializer_range=lc.initializer_range, num_hidden_layers=n,
            num_target_layers=n_target, block_size=field_int(hf, "block_size", source, minimum=1),
            mask_token_id=field_int(hf, "mask_token_id", source), target_layer_ids=ids,
            markov_rank=rank, markov_head_type=hf.get("markov_head_type") or "vanilla",
            enable_confidence_head=conf,
            confidence_head_with_markov=(field_bool(hf, "confidence_head_with_markov", source, default=False)
                                         if conf else False),
            num_anchors=field_int(hf, "num_anchors", source, default=512, minimum=1), dtype=dtype or stored_dtype(hf),
            attention_k_eq_v=lc.attention_k_eq_v, rope_full=lc.rope_full,
            final_logit_softcapping=lc.final_logit_softcapping, use_double_wide_mlp=lc.use_double_wide_mlp,
            num_kv_shared_layers=field_int(hf, "num_kv_shared_layers", source, default=0, minimum=0), hidden_activation=lc.hidden_activation,
            target_text_config=json.dumps(target_text, sort_keys=True))

    def to_deepspec_config(self, *, dtype: str | None = None) -> dict[str, Any]:
        """The DeepSpec `config.json`: the target text config with the draft overrides (spec §6)."""
        out: dict[str, Any] = json.loads(self.target_text_config)
        if not out:
            out = self.layer_config().text_config_dict()
        out.update(
            architectures=[GEMMA4_DRAFT_ARCHITECTURE], model_type="gemma4_text",
            target_model_type="gemma4", target_text_model_type="gemma4_text",
            num_hidden_layers=self.num_hidden_layers, num_target_layers=self.num_target_layers,
            block_size=self.block_size, mask_token_id=self.mask_token_id,
            target_layer_ids=list(self.target_layer_ids), num_anchors=self.num_anchors,
            layer_types=[FULL] * self.num_hidden_layers, tie_word_embeddings=False,
            enable_confidence_head=self.enable_confidence_head, markov_rank=self.markov_rank,
            dtype=dtype or self.dtype)
        if self.enable_confidence_head:
            out["confidence_head_with_markov"] = self.confidence_head_with_markov
        if self.markov_rank > 0:
            out["markov_head_type"] = self.markov_head_type
        return dict(sorted(out.items()))
