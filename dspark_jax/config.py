"""Target model configuration: a frozen dataclass read from / written to Hugging Face `config.json`.

Covers the Qwen3 family (per-head q/k RMSNorm, `head_dim` independent of `hidden_size / heads`)
and the Llama family (Llama-3 rope scaling, `attention_bias`, `mlp_bias`). Both the classic layout
(`rope_theta` + `rope_scaling`) and the transformers-5 layout (`rope_parameters`) are accepted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any

import numpy as np

__all__ = ["ConfigError", "RopeScaling", "TargetConfig", "load_hf_config", "read_config_json", "stored_dtype",
           "field_int", "field_float", "field_bool", "DRAFTER_ARCHITECTURES"]

# HF architecture string -> our family name.
_ARCHITECTURES = {
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
}
_MODEL_TYPES = {"qwen3": "qwen3", "llama": "llama"}
_ROPE_TYPES = ("default", "linear", "llama3")
# Drafter checkpoints (DeepSpec layout): a config.json carrying one of these is not a target.
DRAFTER_ARCHITECTURES = ("Qwen3DSparkModel", "DFlashDraftModel")
_DTYPES = ("float32", "bfloat16", "float16")
_REQUIRED = object()


class ConfigError(ValueError):
    """A `config.json` that this library cannot represent; the message names the field."""


# ------------------------------------------------------------------------------- typed field readers
def _present(hf: dict[str, Any], key: str, source: str, default: Any) -> tuple[bool, Any]:
    if key not in hf or hf[key] is None:
        if default is _REQUIRED:
            raise ConfigError(f"{source}: missing required field {key!r}")
        return False, default
    return True, hf[key]


def field_int(hf: dict[str, Any], key: str, source: str, *, default: Any = _REQUIRED,
              minimum: int | None = None) -> Any:
    """`hf[key]` as an int (an integral float such as 1e6 is accepted; text, bools and fractions are
    not); ConfigError naming the field and `source`. Missing -> `default` (required when not given)."""
    given, value = _present(hf, key, source, default)
    if not given:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{source}: field {key!r} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{source}: field {key!r} must be >= {minimum}, got {value}")
    return value


def field_float(hf: dict[str, Any], key: str, source: str, *, default: Any = _REQUIRED,
                positive: bool = False) -> Any:
    """`hf[key]` as a finite float (> 0 with `positive`); ConfigError naming the field and `source`."""
    given, value = _present(hf, key, source, default)
    if not given:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{source}: field {key!r} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{source}: field {key!r} must be > 0, got {value!r}")
    return float(value)


def field_bool(hf: dict[str, Any], key: str, source: str, *, default: bool) -> bool:
    """`hf[key]` as a JSON boolean; ConfigError naming the field and `source` for anything else."""
    given, value = _present(hf, key, source, default)
    if given and not isinstance(value, bool):
        raise ConfigError(f"{source}: field {key!r} must be true or false, got {value!r}")
    return bool(value)


def stored_dtype(hf: dict[str, Any]) -> str:
    """The tensor dtype a `config.json` records (`dtype` / `torch_dtype`) if it is one we run in, else float32."""
    value = hf.get("dtype") or hf.get("torch_dtype")
    return value if value in _DTYPES else "float32"


def read_config_json(path: str, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """Parse the JSON object in `path` (any JSON settings file: config.json, an index, a manifest, ...);
    `error` naming the file for bad UTF-8, bad JSON or a top level that is not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(doc, dict):
        raise error(f"{path}: expected a JSON object at the top level, got {type(doc).__name__}")
    return doc


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
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling.rope_type not in _ROPE_TYPES:
            raise ConfigError(f"unsupported rope_type {self.rope_scaling.rope_type!r}; supported: {_ROPE_TYPES}")
        for name, value in (("rope_theta", self.rope_theta), ("rms_norm_eps", self.rms_norm_eps),
                            ("rope factor", self.rope_scaling.factor)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        rs = self.rope_scaling
        if rs.rope_type == "llama3" and not 0 < rs.low_freq_factor < rs.high_freq_factor:
            raise ConfigError(f"llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor, got "
                              f"{rs.low_freq_factor} and {rs.high_freq_factor}")
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
        """Build from a Hugging Face `config.json` dict (classic or transformers-5 rope layout).

        Every numeric field is type- and range-checked (ConfigError naming the field and `source`).
        `dtype` None -> the dtype the checkpoint records (`dtype` / `torch_dtype`), else float32.
        """
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: expected a JSON object at the top level, got {type(hf).__name__}")
        archs = hf.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"{source}: field 'architectures' must be a list of strings, got {archs!r}")
        drafter = [a for a in archs if a in DRAFTER_ARCHITECTURES]
        if drafter:
            raise ConfigError(f"{source}: this is a DSpark/DFlash drafter (architectures={archs!r}), not a target "
                              f"model; pass it as the draft (--draft)")
        if archs:
            known = [_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES]
            family = known[0] if known else None
        else:
            family = _MODEL_TYPES.get(hf.get("model_type", ""))
        if family is None:
            raise ConfigError(
                f"{source}: unknown architecture {archs or hf.get('model_type')!r}; "
                f"supported: {sorted(_ARCHITECTURES)}")

        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} not supported (only 'silu')")
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        heads = field_int(hf, "num_attention_heads", source, minimum=1)
        hidden = field_int(hf, "hidden_size", source, minimum=1)
        head_dim = field_int(hf, "head_dim", source, default=None, minimum=1) or hidden // heads
        theta, scaling = _read_rope(hf, source)
        eos = hf.get("eos_token_id")
        eos_list = eos if isinstance(eos, list) else [eos] if eos is not None else []
        eos_ids = tuple(field_int({"eos_token_id": e}, "eos_token_id", source, minimum=0) for e in eos_list)
        try:
            return cls(
                family=family,
                vocab_size=field_int(hf, "vocab_size", source, minimum=1),
                hidden_size=hidden,
                intermediate_size=field_int(hf, "intermediate_size", source, minimum=1),
                num_hidden_layers=field_int(hf, "num_hidden_layers", source, minimum=1),
                num_attention_heads=heads,
                num_key_value_heads=field_int(hf, "num_key_value_heads", source, default=heads, minimum=1),
                head_dim=head_dim,
                rms_norm_eps=field_float(hf, "rms_norm_eps", source, default=1e-6, positive=True),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=field_int(hf, "max_position_embeddings", source, default=32768, minimum=1),
                tie_word_embeddings=field_bool(hf, "tie_word_embeddings", source, default=False),
                attention_bias=field_bool(hf, "attention_bias", source, default=False),
                mlp_bias=field_bool(hf, "mlp_bias", source, default=False),
                initializer_range=field_float(hf, "initializer_range", source, default=0.02),
                bos_token_id=field_int(hf, "bos_token_id", source, default=None, minimum=0),
                eos_token_ids=eos_ids,
                pad_token_id=field_int(hf, "pad_token_id", source, default=None, minimum=0),
                dtype=dtype or stored_dtype(hf),
            )
        except ConfigError as e:
            if str(e).startswith(source):
                raise
            raise type(e)(f"{source}: {e}") from None

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


def _rope_spec(hf: dict[str, Any], source: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(rope_parameters, rope_scaling) as dicts (None when absent); ConfigError for other types."""
    out = []
    for key in ("rope_parameters", "rope_scaling"):
        value = hf.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{source}: field {key!r} must be an object or null, got {value!r}")
        out.append(value or None)
    return out[0], out[1]


def _read_rope(hf: dict[str, Any], source: str) -> tuple[float, RopeScaling]:
    """(rope_theta, RopeScaling) from either rope layout; both layouts given must agree."""
    params, legacy = _rope_spec(hf, source)
    if params is not None and ("rope_theta" in params or "rope_type" in params):
        spec, field = dict(params), "rope_parameters"
        theta = field_float(spec, "rope_theta", f"{source} rope_parameters", default=None, positive=True)
        if theta is None:
            theta = field_float(hf, "rope_theta", source, default=10000.0, positive=True)
        if legacy is not None:
            other = _parse_rope_spec(legacy, f"{source} rope_scaling")
            mine = _parse_rope_spec(spec, f"{source} rope_parameters")
            if other != mine:
                raise ConfigError(f"{source}: rope_parameters ({mine.rope_type}) and rope_scaling "
                                  f"({other.rope_type}) disagree; keep one of them")
    else:
        spec, field = dict(legacy or {}), "rope_scaling"
        theta = field_float(hf, "rope_theta", source, default=10000.0, positive=True)
    return theta, _parse_rope_spec(spec, f"{source} {field}" if spec else source)


def _parse_rope_spec(spec: dict[str, Any], where: str) -> RopeScaling:
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ConfigError(f"{where}: unsupported rope_type {rope_type!r}; supported: {list(_ROPE_TYPES)}")
    kw: dict[str, Any] = {"rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        if "factor" not in spec:
            raise ConfigError(f"{where}: rope scaling {rope_type!r} needs 'factor'")
        kw["factor"] = field_float(spec, "factor", where, positive=True)
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in spec:
                raise ConfigError(f"{where}: llama3 rope scaling needs {key!r}")
        kw.update(low_freq_factor=field_float(spec, "low_freq_factor", where, positive=True),
                  high_freq_factor=field_float(spec, "high_freq_factor", where, positive=True),
                  original_max_position_embeddings=field_int(spec, "original_max_position_embeddings", where,
                                                             minimum=1))
    return RopeScaling(**kw)


def load_hf_config(model_dir: str | os.PathLike, *, dtype: str | None = None) -> TargetConfig:
    """Read `<model_dir>/config.json` into a `TargetConfig` (clear error if missing or invalid).

    `dtype` None -> the dtype the checkpoint records (float32 if it records none we support).
    """
    path = os.path.join(os.fspath(model_dir), "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"no config.json in {os.fspath(model_dir)!r}")
    from dspark_jax.gemma4_config import Gemma4Config, is_gemma4_hf_config  # subclass module imports this one

    hf = read_config_json(path)
    cls = Gemma4Config if is_gemma4_hf_config(hf) else TargetConfig
    return cls.from_hf_config(hf, dtype=dtype, source=path)
