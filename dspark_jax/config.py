"""Target model configuration: a frozen dataclass read from / written to Hugging Face `config.json`.

Covers the Qwen3 family (per-head q/k RMSNorm, `head_dim` independent of `hidden_size / heads`)
and the Llama family (Llama-3 rope scaling, `attention_bias`, `mlp_bias`). Both the classic layout
(`rope_theta` + `rope_scaling`) and the transformers-5 layout (`rope_parameters`) are accepted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

__all__ = ["ConfigError", "RopeScaling", "TargetConfig", "load_hf_config"]

# HF architecture string -> our family name.
_ARCHITECTURES = {
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
}
_MODEL_TYPES = {"qwen3": "qwen3", "llama": "llama"}
_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A `config.json` that this library cannot represent; the message names the field."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling (`rope_type` 'default', 'linear' or 'llama3', HF semantics)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """Architecture of a Qwen3/Llama decoder-only target model.

    `family` selects the per-family details: 'qwen3' has per-head q/k RMSNorm; 'llama' may have
    attention / MLP biases. `dtype` is the parameter and activation dtype ('float32' or
    'bfloat16'); norms, softmax and sampling always run in float32.
    """

    family: str = "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.family not in _MODEL_TYPES.values():
            raise ConfigError(f"unknown model family {self.family!r}; supported: qwen3, llama")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling.rope_type not in _ROPE_TYPES:
            raise ConfigError(f"unsupported rope_type {self.rope_scaling.rope_type!r}; supported: {_ROPE_TYPES}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    # ------------------------------------------------------------------ derived quantities
    @property
    def num_query_groups(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def has_qk_norm(self) -> bool:
        """Qwen3 applies a per-head RMSNorm to queries and keys before RoPE."""
        return self.family == "qwen3"

    def kv_cache_layer_shapes(self) -> tuple[tuple[int, int], ...]:
        """(kv heads, head dim) of each layer's KV cache buffer (uniform here; per layer in Gemma 4)."""
        return ((self.num_key_value_heads, self.head_dim),) * self.num_hidden_layers

    def replace(self, **changes: Any) -> "TargetConfig":
        """A copy with some fields changed (e.g. `dtype='bfloat16'`)."""
        return dataclasses.replace(self, **changes)

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse RoPE frequencies `[head_dim // 2]` (float32), HF semantics per `rope_type`."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        inv_freq = inv_freq.astype(np.float32)
        rs = self.rope_scaling
        if rs.rope_type == "linear":
            return (inv_freq / rs.factor).astype(np.float32)
        if rs.rope_type == "llama3":
            old = rs.original_max_position_embeddings
            low_wavelen = old / rs.low_freq_factor
            high_wavelen = old / rs.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
            smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
            smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        return inv_freq

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], *, dtype: str | None = None, source: str = "config.json") -> "TargetConfig":
        """Build from a Hugging Face `config.json` dict (classic or transformers-5 rope layout)."""
        family = None
        archs = hf.get("architectures") or []
        for arch in archs:
            family = _ARCHITECTURES.get(arch, family)
        if family is None:
            family = _MODEL_TYPES.get(hf.get("model_type", ""))
        if family is None:
            raise ConfigError(
                f"{source}: unknown architecture {archs or hf.get('model_type')!r}; "
                f"supported: {sorted(_ARCHITECTURES)}")

        def need(key: str):
            if key not in hf or hf[key] is None:
                raise ConfigError(f"{source}: missing required field {key!r}")
            return hf[key]

        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} not supported (only 'silu')")
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        head_dim = hf.get("head_dim") or hidden // heads
        theta, scaling = _read_rope(hf, source)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
        if dtype is None:
            dtype = "float32"
        return cls(
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
            dtype=dtype,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict (transformers-5 `rope_parameters` layout)."""
        rope: dict[str, Any] = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling.rope_type in ("linear", "llama3"):
            rope["factor"] = self.rope_scaling.factor
        if self.rope_scaling.rope_type == "llama3":
            rope.update(low_freq_factor=self.rope_scaling.low_freq_factor,
                        high_freq_factor=self.rope_scaling.high_freq_factor,
                        original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings)
        arch = {v: k for k, v in _ARCHITECTURES.items()}[self.family]
        eos: Any = list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0]
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos if self.eos_token_ids else None,
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
        }
        if self.family == "llama":
            out["mlp_bias"] = self.mlp_bias
        else:
            out["use_sliding_window"] = False
        return out


def _read_rope(hf: dict[str, Any], source: str) -> tuple[float, RopeScaling]:
    """(rope_theta, RopeScaling) from either rope layout."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and ("rope_theta" in params or "rope_type" in params):
        spec = dict(params)
        theta = spec.get("rope_theta", hf.get("rope_theta", 10000.0))
    else:
        spec = dict(hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", 10000.0)
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ConfigError(f"{source}: unsupported rope_type {rope_type!r}; supported: {list(_ROPE_TYPES)}")
    kw: dict[str, Any] = {"rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        if "factor" not in spec:
            raise ConfigError(f"{source}: rope scaling {rope_type!r} needs 'factor'")
        kw["factor"] = float(spec["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in spec:
                raise ConfigError(f"{source}: llama3 rope scaling needs {key!r}")
        kw.update(low_freq_factor=float(spec["low_freq_factor"]),
                  high_freq_factor=float(spec["high_freq_factor"]),
                  original_max_position_embeddings=int(spec["original_max_position_embeddings"]))
    return float(theta), RopeScaling(**kw)


def load_hf_config(model_dir: str | os.PathLike, *, dtype: str | None = None) -> TargetConfig:
    """Read `<model_dir>/config.json` into a `TargetConfig` (clear error if missing or invalid)."""
    path = os.path.join(os.fspath(model_dir), "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"no config.json in {os.fspath(model_dir)!r}")
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from e
    from dspark_jax.gemma4_config import Gemma4Config, is_gemma4_hf_config  # subclass module imports this one

    cls = Gemma4Config if is_gemma4_hf_config(hf) else TargetConfig
    return cls.from_hf_config(hf, dtype=dtype, source=path)
