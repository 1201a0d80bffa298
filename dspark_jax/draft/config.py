"""DSpark / DFlash draft configuration (spec §1, §6).

The draft's layer shapes (hidden size, heads, head_dim, MLP width, RoPE, norm eps, vocabulary)
are inherited verbatim from the target; the draft adds its own depth (`num_hidden_layers`), the
block size K, the mask token, the tapped target layers and the sequential / confidence heads.

`DraftConfig.layer_config()` returns a Qwen3-family `TargetConfig` carrying the draft's layer
shapes; RoPE frequencies and HF `config.json` parsing are delegated to it (no duplicated logic).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from dspark_jax.config import ConfigError, RopeScaling, TargetConfig, field_bool, field_int, stored_dtype

__all__ = ["DraftConfig", "DraftConfigError", "HEAD_TYPES", "default_target_layer_ids"]

HEAD_TYPES = ("vanilla", "gated", "rnn")
_ARCHITECTURE = "Qwen3DSparkModel"

# config.json keys regenerated from explicit DraftConfig fields (everything else is carried verbatim).
_MODELLED_KEYS = frozenset({
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta",
    "rope_parameters", "rope_scaling", "max_position_embeddings", "tie_word_embeddings", "attention_bias",
    "initializer_range", "use_sliding_window", "num_target_layers", "block_size", "mask_token_id",
    "target_layer_ids", "num_anchors", "layer_types", "enable_confidence_head", "confidence_head_with_markov",
    "markov_rank", "markov_head_type", "dtype", "torch_dtype",
})


class DraftConfigError(ConfigError):
    """An invalid draft configuration, or a draft that does not fit its target (names both values)."""


def default_target_layer_ids(num_target_layers: int, num_ctx_layers: int = 5) -> tuple[int, ...]:
    """Evenly spaced tapped layers, DFlash/DeepSpec style: from 1 to L_t-3 (Qwen3-4B: [1,9,17,25,33]).

    Falls back to the range [0, L_t-2] for shallow targets; never includes the last layer.
    """
    n, lt = int(num_ctx_layers), int(num_target_layers)
    if n < 1:
        raise DraftConfigError(f"need at least one context layer, got {n}")
    lo, hi = 1, lt - 3
    if hi - lo + 1 < n:
        lo, hi = 0, lt - 2
    if hi - lo + 1 < n:
        raise DraftConfigError(
            f"target has {lt} layers: too shallow for {n} distinct tapped layers excluding the last one")
    if n == 1:
        return (lo,)
    return tuple(int(round(lo + i * (hi - lo) / (n - 1))) for i in range(n))


def target_shape_fields(t: TargetConfig) -> dict[str, Any]:
    """The fields a Qwen3/Llama-style draft copies from its target: vocabulary, widths, attention
    shapes, norm epsilon, RoPE, positions, init range, dtype and `num_target_layers`."""
    return dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
                rope_scaling=t.rope_scaling, max_position_embeddings=t.max_position_embeddings,
                initializer_range=t.initializer_range, num_target_layers=t.num_hidden_layers, dtype=t.dtype)


def qwen3_layers_config(draft: Any, num_layers: int, **extra: Any) -> TargetConfig:
    """A Qwen3-family `TargetConfig` of `num_layers` layers with `draft`'s shapes (the inverse of
    `target_shape_fields`): what the draft's layers, RoPE and checks are built from."""
    return TargetConfig(
        family="qwen3", vocab_size=draft.vocab_size, hidden_size=draft.hidden_size,
        intermediate_size=draft.intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=draft.num_attention_heads, num_key_value_heads=draft.num_key_value_heads,
        head_dim=draft.head_dim, rms_norm_eps=draft.rms_norm_eps, rope_theta=draft.rope_theta,
        rope_scaling=draft.rope_scaling, max_position_embeddings=draft.max_position_embeddings,
        initializer_range=draft.initializer_range, dtype=draft.dtype, **extra)


def finish_from_target(cls, target: Any, fields: dict[str, Any], overrides: dict[str, Any]):
    """`cls(**fields, **overrides)` with the default 5 tapped target layers, validated against `target`
    (the common tail of every draft config's `from_target`)."""
    fields = {**fields, **overrides}
    if fields.get("target_layer_ids") is None:
        fields["target_layer_ids"] = default_target_layer_ids(target.num_hidden_layers, 5)
    cfg = cls(**fields)
    cfg.validate_against_target(target)
    return cfg


@dataclasses.dataclass(frozen=True, kw_only=True)
class DraftConfig:
    """Architecture of a Qwen3-style DSpark (or, with `markov_rank=0` and no confidence head, DFlash) draft.

    Inherited layer shapes: vocab_size, hidden_size, intermediate_size, num_attention_heads,
    num_key_value_heads, head_dim, rms_norm_eps, rope_theta, rope_scaling, attention_bias.
    Draft fields: num_hidden_layers (draft depth), num_target_layers (L_t), block_size (K),
    mask_token_id, target_layer_ids (ascending; -1 = embedding output), markov_rank (r; 0 = DFlash),
    markov_head_type, enable_confidence_head, confidence_head_with_markov, num_anchors (training).
    `dtype` is the parameter/activation dtype; logits, heads and softmax always run in float32.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling = RopeScaling()
    attention_bias: bool = False
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02

    num_hidden_layers: int = 5
    num_target_layers: int
    block_size: int = 7
    mask_token_id: int
    target_layer_ids: tuple[int, ...]
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    num_anchors: int = 512
    dtype: str = "float32"
    # Inherited config.json fields we do not model (bos/eos ids, ...), kept for a faithful
    # `to_deepspec_config`: sorted (key, JSON-encoded value) pairs. Not part of equality.
    extra_fields: tuple[tuple[str, str], ...] = dataclasses.field(default=(), compare=False)

    def __post_init__(self):
        object.__setattr__(self, "target_layer_ids", tuple(int(i) for i in self.target_layer_ids))
        if self.markov_head_type not in HEAD_TYPES:
            raise DraftConfigError(f"unknown head type markov_head_type={self.markov_head_type!r}; "
                                   f"supported: {list(HEAD_TYPES)}")
        if int(self.block_size) < 1:
            raise DraftConfigError(f"block_size must be >= 1, got {self.block_size}")
        if int(self.num_hidden_layers) < 1:
            raise DraftConfigError(f"num_hidden_layers (draft layers) must be >= 1, got {self.num_hidden_layers}")
        if int(self.markov_rank) < 0:
            raise DraftConfigError(f"markov_rank must be >= 0, got {self.markov_rank}")
        if self.enable_confidence_head and self.confidence_head_with_markov and self.markov_rank == 0:
            raise DraftConfigError(
                "confidence_head_with_markov=True needs a Markov head, but markov_rank=0 "
                "(set confidence_head_with_markov=False or markov_rank > 0)")
        if not 0 <= int(self.mask_token_id) < int(self.vocab_size):
            raise DraftConfigError(
                f"mask_token_id={self.mask_token_id} outside the vocabulary [0, {self.vocab_size - 1}] "
                f"(vocab_size={self.vocab_size})")
        _check_layer_ids(self.target_layer_ids, int(self.num_target_layers))
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise DraftConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        try:
            self.layer_config()  # shape checks (heads % kv heads, even head_dim, rope type)
        except DraftConfigError:
            raise
        except ConfigError as e:
            raise DraftConfigError(str(e)) from e

    # ------------------------------------------------------------------ derived quantities
    @property
    def num_context_layers(self) -> int:
        """n_ctx = len(target_layer_ids)."""
        return len(self.target_layer_ids)

    @property
    def context_dim(self) -> int:
        """Width of the concatenated target features fed to `fc`: n_ctx * hidden_size."""
        return self.num_context_layers * self.hidden_size

    @property
    def has_markov_head(self) -> bool:
        return self.markov_rank > 0

    @property
    def confidence_in_features(self) -> int:
        """d + r when the confidence head reads the Markov embedding, else d."""
        return self.hidden_size + (self.markov_rank if self.confidence_head_with_markov else 0)

    def layer_config(self) -> TargetConfig:
        """A Qwen3-family `TargetConfig` with the draft's layer shapes (depth = draft layers)."""
        return qwen3_layers_config(self, self.num_hidden_layers, tie_word_embeddings=False,
                                   attention_bias=self.attention_bias, mlp_bias=False)

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse RoPE frequencies [head_dim // 2] float32 (same as the target's)."""
        return self.layer_config().rope_inv_freq()

    def replace(self, **changes: Any) -> "DraftConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_target(cls, target_config: TargetConfig, **draft_fields: Any) -> "DraftConfig":
        """A fresh draft for `target_config`. `mask_token_id` is required; other draft fields default
        to the released DSpark values (5 layers, K=7, r=256 vanilla, confidence head on) and
        `target_layer_ids` to `default_target_layer_ids(L_t, 5)`."""
        if cls is DraftConfig and getattr(target_config, "family", None) == "gemma4":
            from dspark_jax.draft.gemma4_config import Gemma4DraftConfig  # Gemma 4 layers (spec §1.5)

            return Gemma4DraftConfig.from_target(target_config, **draft_fields)
        t = target_config
        if "mask_token_id" not in draft_fields:
            raise DraftConfigError("from_target needs mask_token_id (an otherwise unused vocabulary row)")
        hf = t.to_hf_config()
        fields = dict(target_shape_fields(t), attention_bias=t.attention_bias, extra_fields=tuple(sorted(
            (k, json.dumps(v)) for k, v in hf.items() if k not in _MODELLED_KEYS and v is not None)))
        return finish_from_target(cls, t, fields, draft_fields)

    def validate_against_target(self, target_config: TargetConfig) -> None:
        """Raise DraftConfigError if this draft cannot run against `target_config`."""
        t = target_config
        if self.vocab_size != t.vocab_size:
            raise DraftConfigError(f"draft vocab_size={self.vocab_size} != target vocab_size={t.vocab_size}")
        if self.hidden_size != t.hidden_size:
            raise DraftConfigError(f"draft hidden_size={self.hidden_size} != target hidden_size={t.hidden_size}")
        if self.num_target_layers != t.num_hidden_layers:
            raise DraftConfigError(f"draft num_target_layers={self.num_target_layers} != target "
                                   f"num_hidden_layers={t.num_hidden_layers}")
        _check_layer_ids(self.target_layer_ids, t.num_hidden_layers, what="target num_hidden_layers")
        if not 0 <= self.mask_token_id < t.vocab_size:
            raise DraftConfigError(f"draft mask_token_id={self.mask_token_id} outside the target vocabulary "
                                   f"(vocab_size={t.vocab_size})")

    # ------------------------------------------------------------------ DeepSpec config.json
    @classmethod
    def from_deepspec_config(cls, hf: dict[str, Any], *, dtype: str | None = None,
                             source: str = "config.json") -> "DraftConfig":
        """Parse a DeepSpec draft `config.json` dict (spec §6). Only `Qwen3DSparkModel` is supported.

        Fields are type- and range-checked (DraftConfigError naming the field and `source`); a target
        model's config is recognised as such. `dtype` None -> the dtype the checkpoint records.
        """
        if not isinstance(hf, dict):
            raise DraftConfigError(f"{source}: expected a JSON object at the top level, got {type(hf).__name__}")
        archs = hf.get("architectures") or []
        if isinstance(archs, list) and archs and archs[0] in ("Qwen3ForCausalLM", "LlamaForCausalLM"):
            raise DraftConfigError(f"{source}: this is a target model (architectures={archs!r}), not a DSpark "
                                   f"drafter; pass it as the target (--target)")
        if cls is DraftConfig and isinstance(archs, list) and archs and archs[0] == "Gemma4DSparkModel":
            from dspark_jax.draft.gemma4_config import Gemma4DraftConfig  # Gemma 4 layers (spec §1.5)

            return Gemma4DraftConfig.from_deepspec_config(hf, dtype=dtype, source=source)
        if not isinstance(archs, list) or not archs or archs[0] != _ARCHITECTURE:
            raise DraftConfigError(f"{source}: architectures={archs!r}; expected [{_ARCHITECTURE!r}] "
                                   f"or ['Gemma4DSparkModel']")
        try:
            return cls._from_checked_deepspec(hf, dtype=dtype, source=source)
        except DraftConfigError:
            raise
        except ConfigError as e:
            raise DraftConfigError(str(e)) from None

    @classmethod
    def _from_checked_deepspec(cls, hf: dict[str, Any], *, dtype: str | None, source: str) -> "DraftConfig":
        base = {k: v for k, v in hf.items() if k not in ("dtype", "torch_dtype")}
        base["architectures"] = ["Qwen3ForCausalLM"]
        base.setdefault("model_type", "qwen3")
        lc = TargetConfig.from_hf_config(base, source=source)
        num_layers = field_int(hf, "num_hidden_layers", source, minimum=1)
        layer_types = hf.get("layer_types")
        if layer_types is not None:
            if (not isinstance(layer_types, list) or len(layer_types) != num_layers
                    or any(t != "full_attention" for t in layer_types)):
                raise DraftConfigError(f"{source}: layer_types={layer_types!r}; expected "
                                       f"['full_attention'] x num_hidden_layers={num_layers}")
        if hf.get("tie_word_embeddings"):
            raise DraftConfigError(f"{source}: tie_word_embeddings=true; DeepSpec drafts store a separate lm_head")
        rank = field_int(hf, "markov_rank", source, default=0, minimum=0)
        head_type = hf.get("markov_head_type") or "vanilla"
        conf = field_bool(hf, "enable_confidence_head", source, default=False)
        if conf and "confidence_head_with_markov" not in hf:
            raise DraftConfigError(f"{source}: enable_confidence_head=true but confidence_head_with_markov is missing")
        with_markov = field_bool(hf, "confidence_head_with_markov", source, default=False) if conf else False
        extra = tuple(sorted((k, json.dumps(v)) for k, v in hf.items() if k not in _MODELLED_KEYS))
        ids = hf.get("target_layer_ids")
        if ids is None:
            raise DraftConfigError(f"{source}: missing required draft field 'target_layer_ids'")
        if not isinstance(ids, (list, tuple)):
            raise DraftConfigError(f"{source}: target_layer_ids must be a list, got {ids!r}")
        ids = tuple(field_int({"target_layer_ids": i}, "target_layer_ids", source) for i in ids)
        try:
            return cls(
                vocab_size=lc.vocab_size, hidden_size=lc.hidden_size, intermediate_size=lc.intermediate_size,
                num_attention_heads=lc.num_attention_heads, num_key_value_heads=lc.num_key_value_heads,
                head_dim=lc.head_dim, rms_norm_eps=lc.rms_norm_eps, rope_theta=lc.rope_theta,
                rope_scaling=lc.rope_scaling, attention_bias=lc.attention_bias,
                max_position_embeddings=lc.max_position_embeddings, initializer_range=lc.initializer_range,
                num_hidden_layers=num_layers, num_target_layers=field_int(hf, "num_target_layers", source, minimum=1),
                block_size=field_int(hf, "block_size", source), mask_token_id=field_int(hf, "mask_token_id", source),
                target_layer_ids=ids, markov_rank=rank, markov_head_type=head_type,
                enable_confidence_head=conf, confidence_head_with_markov=with_markov,
                num_anchors=field_int(hf, "num_anchors", source, default=512, minimum=1),
                dtype=dtype or stored_dtype(hf), extra_fields=extra)
        except ConfigError as e:
            raise DraftConfigError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None

    def to_deepspec_config(self, *, dtype: str | None = None) -> dict[str, Any]:
        """The DeepSpec `config.json` dict (spec §6); `dtype` = stored tensor dtype (default self.dtype)."""
        out: dict[str, Any] = {k: json.loads(v) for k, v in self.extra_fields}
        hf = self.layer_config().to_hf_config()
        for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
                    "rope_theta", "rope_parameters", "max_position_embeddings", "attention_bias",
                    "initializer_range", "use_sliding_window"):
            out[key] = hf[key]
        out.update(
            architectures=[_ARCHITECTURE],
            tie_word_embeddings=False,
            num_target_layers=self.num_target_layers,
            block_size=self.block_size,
            mask_token_id=self.mask_token_id,
            target_layer_ids=list(self.target_layer_ids),
            num_anchors=self.num_anchors,
            layer_types=["full_attention"] * self.num_hidden_layers,
            enable_confidence_head=self.enable_confidence_head,
            markov_rank=self.markov_rank,
            dtype=dtype or self.dtype,
        )
        if self.enable_confidence_head:
            out["confidence_head_with_markov"] = self.confidence_head_with_markov
        if self.markov_rank > 0:
            out["markov_head_type"] = self.markov_head_type
        return dict(sorted(out.items()))


def _check_layer_ids(ids: tuple[int, ...], num_target_layers: int, what: str = "num_target_layers") -> None:
    lt = int(num_target_layers)
    if lt < 1:
        raise DraftConfigError(f"{what} must be >= 1, got {lt}")
    if len(ids) == 0:
        raise DraftConfigError("target_layer_ids must not be empty")
    for a, b in zip(ids, ids[1:]):
        if b <= a:
            raise DraftConfigError(f"target_layer_ids must be strictly increasing, got {list(ids)} ({a} then {b})")
    for i in ids:
        if not -1 <= i <= lt - 1:
            raise DraftConfigError(f"target layer id {i} outside {{-1}} U [0, {lt - 1}] ({what}={lt})")
    if ids[-1] == lt - 1:
        raise DraftConfigError(
            f"target_layer_ids {list(ids)} include the last target layer {lt - 1} ({what}={lt}); its HF "
            f"hidden state is post-final-norm, not a raw layer output")
