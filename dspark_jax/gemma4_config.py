"""Gemma 4 text-decoder configuration (HF `gemma4` / `gemma4_text`), a `TargetConfig` subclass.

Reads the text decoder of a Hugging Face Gemma 4 checkpoint: either a multimodal wrapper
`config.json` (`Gemma4ForConditionalGeneration`, architecture fields under `text_config`, weights
under `model.language_model.`) or a text-only one (`Gemma4ForCausalLM`, weights under `model.`).

Per-layer structure (transformers `Gemma4TextConfig` semantics):
  * `layer_types[i]` is 'sliding_attention' (window `sliding_window`, `head_dim`,
    `num_key_value_heads`, rope `rope_parameters['sliding_attention']`) or 'full_attention'
    (`global_head_dim`, `num_global_key_value_heads` when `attention_k_eq_v`, rope
    `rope_parameters['full_attention']`, typically 'proportional' partial rotary). Newer
    transformers write the full-layer overrides as `per_layer_config`; both forms are read.
  * `attention_k_eq_v`: full-attention layers have no `v_proj`; values = k_proj output.
  * `num_kv_shared_layers`: the last N layers reuse the keys/values of the last earlier layer of
    the same type (no own k/v weights, no own cache); `use_double_wide_mlp` doubles their MLP.
The inherited `head_dim` / `num_key_value_heads` / `rope_theta` fields hold the sliding-layer
values; use the `layer_*` accessors for per-layer shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dspark_jax.config import ConfigError, TargetConfig

__all__ = ["Gemma4Config", "RopeSpec", "is_gemma4_hf_config", "proportional_inv_freq"]

SLIDING, FULL = "sliding_attention", "full_attention"
_WRAPPER_PREFIX, _TEXT_PREFIX = "model.language_model.", "model."
_ACTIVATIONS = ("gelu_pytorch_tanh",)
_ROPE_TYPES = ("default", "proportional")


def is_gemma4_hf_config(hf: dict[str, Any]) -> bool:
    """True for a Gemma 4 wrapper or text `config.json` dict."""
    archs = hf.get("architectures") or []
    return hf.get("model_type") in ("gemma4", "gemma4_text") or any(str(a).startswith("Gemma4") for a in archs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeSpec:
    """RoPE parameters of one layer type: 'default' or 'proportional' (partial rotary, HF semantics)."""

    rope_type: str = "default"
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


def proportional_inv_freq(spec: RopeSpec, head_dim: int) -> np.ndarray:
    """Inverse frequencies `[head_dim // 2]` float32 for a 'default' or 'proportional' RopeSpec.

    Proportional: the first `floor(partial_rotary_factor * head_dim / 2)` frequencies are
    `theta^(-2i/head_dim)`, the rest 0 (not rotated); all divided by `factor`. Default: all of them.
    """
    angles = head_dim // 2 if spec.rope_type == "default" else int(spec.partial_rotary_factor * head_dim // 2)
    exps = np.arange(0, 2 * angles, 2, dtype=np.int64).astype(np.float32) / head_dim
    rotated = (1.0 / (spec.rope_theta ** exps)).astype(np.float32)
    inv = np.concatenate([rotated, np.zeros(head_dim // 2 - angles, np.float32)])
    if spec.rope_type == "proportional":
        inv = inv / np.float32(spec.factor)
    return inv.astype(np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma4Config(TargetConfig):
    """Gemma 4 text decoder (see the module docstring). `family` is always 'gemma4'."""

    family: str = "gemma4"
    layer_types: tuple[str, ...] = ()
    sliding_window: int = 512
    global_head_dim: int = 512
    num_global_key_value_heads: int = 0  # 0 -> num_key_value_heads
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    rope_sliding: RopeSpec = RopeSpec()
    rope_full: RopeSpec = RopeSpec(rope_type="proportional", rope_theta=1_000_000.0, partial_rotary_factor=0.25)
    weight_prefix: str = _TEXT_PREFIX  # HF key prefix of the text decoder's weights
    wrapper_config: dict | None = dataclasses.field(default=None, compare=False, hash=False)

    def __post_init__(self):
        if self.family != "gemma4":
            raise ConfigError(f"Gemma4Config needs family 'gemma4', got {self.family!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "global_head_dim"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries, num_hidden_layers is "
                              f"{self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ConfigError(f"layer_types: unsupported layer type(s) {bad}; supported: {SLIDING}, {FULL}")
        for i in range(self.num_hidden_layers):
            kvh, hd = self.layer_kv_heads(i), self.layer_head_dim(i)
            if self.num_attention_heads % kvh:
                raise ConfigError(f"layer {i}: num_attention_heads ({self.num_attention_heads}) must be a "
                                  f"multiple of its key/value heads ({kvh})")
            if hd % 2:
                raise ConfigError(f"layer {i}: head dim {hd} must be even for RoPE")
        if not 0 <= self.num_kv_shared_layers < self.num_hidden_layers:
            raise ConfigError(f"num_kv_shared_layers must be in [0, num_hidden_layers), got {self.num_kv_shared_layers}")
        first = self.num_hidden_layers - self.num_kv_shared_layers
        if self.num_kv_shared_layers and set(self.layer_types[first:]) - set(self.layer_types[:first]):
            raise ConfigError("num_kv_shared_layers: a shared layer type has no earlier layer producing its keys/values")
        if self.hidden_activation not in _ACTIVATIONS:
            raise ConfigError(f"hidden_activation {self.hidden_activation!r} not supported; supported: {_ACTIVATIONS}")
        for spec in (self.rope_sliding, self.rope_full):
            if spec.rope_type not in _ROPE_TYPES:
                raise ConfigError(f"unsupported rope_type {spec.rope_type!r}; supported: {_ROPE_TYPES}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    # ------------------------------------------------------------------ per-layer structure
    def layer_is_sliding(self, i: int) -> bool:
        """True if layer i is a sliding-window (local) attention layer."""
        return self.layer_types[i] == SLIDING

    def layer_head_dim(self, i: int) -> int:
        """Head dim of layer i (`head_dim` sliding, `global_head_dim` full)."""
        return self.head_dim if self.layer_is_sliding(i) else self.global_head_dim

    def layer_kv_heads(self, i: int) -> int:
        """Key/value heads of layer i."""
        if self.layer_is_sliding(i) or not self.num_global_key_value_heads:
            return self.num_key_value_heads
        return self.num_global_key_value_heads

    def layer_has_v_proj(self, i: int) -> bool:
        """False for full-attention layers with `attention_k_eq_v` (values = k_proj output)."""
        return self.layer_is_sliding(i) or not self.attention_k_eq_v

    def layer_kv_source(self, i: int) -> int | None:
        """For a KV-shared layer, the index of the layer whose keys/values it reuses; else None.

        Same rule as transformers: the last non-shared layer of the same layer type.
        """
        first = self.num_hidden_layers - self.num_kv_shared_layers
        if i < first:
            return None
        return max(j for j in range(first) if self.layer_types[j] == self.layer_types[i])

    def layer_intermediate_size(self, i: int) -> int:
        """MLP width of layer i (doubled for KV-shared layers when `use_double_wide_mlp`)."""
        double = self.use_double_wide_mlp and self.layer_kv_source(i) is not None
        return self.intermediate_size * (2 if double else 1)

    def layer_rope(self, i: int) -> RopeSpec:
        """RoPE parameters of layer i's type."""
        return self.rope_sliding if self.layer_is_sliding(i) else self.rope_full

    def layer_inv_freq(self, i: int) -> np.ndarray:
        """Inverse RoPE frequencies `[layer_head_dim(i) // 2]` of layer i."""
        return proportional_inv_freq(self.layer_rope(i), self.layer_head_dim(i))

    def kv_cache_layer_shapes(self) -> tuple[tuple[int, int], ...]:
        """(kv heads, head dim) of each layer's cache; KV-shared layers get (0, head dim): no storage."""
        return tuple((0 if self.layer_kv_source(i) is not None else self.layer_kv_heads(i), self.layer_head_dim(i))
                     for i in range(self.num_hidden_layers))

    @property
    def has_qk_norm(self) -> bool:
        """Gemma 4 normalises queries and keys per head (and values without scale)."""
        return True

    @property
    def embed_scale(self) -> float:
        """Factor on the embedding output: sqrt(hidden_size) (cast to the weight dtype when applied)."""
        return float(self.hidden_size) ** 0.5

    def rope_inv_freq(self) -> np.ndarray:
        """Sliding-layer inverse frequencies (base-class contract); see `layer_inv_freq`."""
        return proportional_inv_freq(self.rope_sliding, self.head_dim)

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], *, dtype: str | None = None, source: str = "config.json") -> "Gemma4Config":
        """Build from a Gemma 4 `config.json` dict (multimodal wrapper with `text_config`, or text-only)."""
        wrapper = "text_config" in hf
        text = dict(hf["text_config"] or {}) if wrapper else dict(hf)

        def need(key: str):
            if text.get(key) is None:
                raise ConfigError(f"{source}: missing required field {'text_config.' if wrapper else ''}{key}")
            return text[key]

        if text.get("enable_moe_block"):
            raise ConfigError(f"{source}: enable_moe_block=true (Gemma 4 MoE blocks) is not supported")
        if text.get("hidden_size_per_layer_input", 256):  # HF default is 256 (per-layer inputs on)
            raise ConfigError(f"{source}: hidden_size_per_layer_input="
                              f"{text.get('hidden_size_per_layer_input', 256)} (per-layer inputs) is not supported; need 0")
        if text.get("use_bidirectional_attention"):
            raise ConfigError(f"{source}: use_bidirectional_attention={text['use_bidirectional_attention']!r} "
                              "is not supported (causal text decoding only)")
        layers = int(need("num_hidden_layers"))
        layer_types = list(text.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(layers)])
        if layer_types and layer_types[-1] != FULL:
            layer_types[-1] = FULL  # transformers forces the last layer to full attention
        k_eq_v = bool(text.get("attention_k_eq_v", False))
        global_hd = int(text.get("global_head_dim") or 512)
        global_kvh = int(text.get("num_global_key_value_heads") or 0) if k_eq_v else 0
        per_layer = text.get("per_layer_config") or {}
        for key, over in per_layer.items():
            idx = int(key) if str(key).lstrip("-").isdigit() else None
            if idx is None or not 0 <= idx < layers or layer_types[idx] != FULL:
                raise ConfigError(f"{source}: per_layer_config[{key!r}] must name a full_attention layer index")
            extra = sorted(set(over) - {"head_dim", "num_key_value_heads"})
            if extra:
                raise ConfigError(f"{source}: per_layer_config[{key!r}] overrides unsupported field(s) {extra}")
            global_hd = int(over.get("head_dim", global_hd))
            global_kvh = int(over.get("num_key_value_heads", global_kvh or 0))
        rope = text.get("rope_parameters") or {}
        eos = text.get("eos_token_id", hf.get("eos_token_id"))
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
        tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
        softcap = text.get("final_logit_softcapping")
        return cls(
            vocab_size=int(need("vocab_size")), hidden_size=int(need("hidden_size")),
            intermediate_size=int(need("intermediate_size")), num_hidden_layers=layers,
            num_attention_heads=int(need("num_attention_heads")),
            num_key_value_heads=int(need("num_key_value_heads")), head_dim=int(need("head_dim")),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_spec(rope.get(SLIDING), RopeSpec(), source).rope_theta),
            max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
            tie_word_embeddings=bool(tie), attention_bias=bool(text.get("attention_bias", False)),
            initializer_range=float(text.get("initializer_range", 0.02)),
            bos_token_id=text.get("bos_token_id"), eos_token_ids=eos_ids, pad_token_id=text.get("pad_token_id"),
            dtype=dtype or "float32",
            layer_types=tuple(layer_types), sliding_window=int(text.get("sliding_window", 512)),
            global_head_dim=global_hd, num_global_key_value_heads=global_kvh, attention_k_eq_v=k_eq_v,
            num_kv_shared_layers=int(text.get("num_kv_shared_layers", 0) or 0),
            use_double_wide_mlp=bool(text.get("use_double_wide_mlp", False)),
            final_logit_softcapping=None if softcap is None else float(softcap),
            hidden_activation=str(text.get("hidden_activation", "gelu_pytorch_tanh")),
            rope_sliding=_rope_spec(rope.get(SLIDING), RopeSpec(), source),
            rope_full=_rope_spec(rope.get(FULL), Gemma4Config.rope_full, source),
            weight_prefix=_WRAPPER_PREFIX if wrapper else _TEXT_PREFIX,
            wrapper_config={k: v for k, v in hf.items() if k != "text_config"} if wrapper else None,
        )

    def text_config_dict(self) -> dict[str, Any]:
        """The `Gemma4TextConfig` fields (`model_type` 'gemma4_text') as a JSON-able dict."""
        def rope(spec: RopeSpec) -> dict[str, Any]:
            out: dict[str, Any] = {"rope_type": spec.rope_type, "rope_theta": spec.rope_theta}
            if spec.rope_type == "proportional":
                out.update(partial_rotary_factor=spec.partial_rotary_factor, factor=spec.factor)
            return out

        eos: Any = list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0]
        out: dict[str, Any] = {
            "model_type": "gemma4_text", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "global_head_dim": self.global_head_dim,
            "hidden_activation": self.hidden_activation, "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "initializer_range": self.initializer_range, "bos_token_id": self.bos_token_id,
            "eos_token_id": eos if self.eos_token_ids else None, "pad_token_id": self.pad_token_id,
            "layer_types": list(self.layer_types), "sliding_window": self.sliding_window,
            "attention_k_eq_v": self.attention_k_eq_v, "num_kv_shared_layers": self.num_kv_shared_layers,
            "use_double_wide_mlp": self.use_double_wide_mlp,
            "final_logit_softcapping": self.final_logit_softcapping,
            "hidden_size_per_layer_input": 0, "enable_moe_block": False,
            "rope_parameters": {SLIDING: rope(self.rope_sliding), FULL: rope(self.rope_full)},
            "dtype": self.dtype,
        }
        if self.num_global_key_value_heads:
            out["num_global_key_value_heads"] = self.num_global_key_value_heads
        return out

    def to_hf_config(self) -> dict[str, Any]:
        """`config.json` dict: the multimodal wrapper layout if loaded from one, else `Gemma4ForCausalLM`."""
        text = self.text_config_dict()
        if self.weight_prefix == _WRAPPER_PREFIX:
            wrapper = dict(self.wrapper_config or {"architectures": ["Gemma4ForConditionalGeneration"],
                                                   "model_type": "gemma4"})
            wrapper.update(text_config=text, tie_word_embeddings=self.tie_word_embeddings)
            return wrapper
        return {"architectures": ["Gemma4ForCausalLM"], **text}

    # ------------------------------------------------------------------ checkpoint layout
    def hf_key_map(self) -> list[tuple[str, tuple[str, ...], bool]]:
        """(HF key, param path, transpose) for every tensor of the text decoder."""
        pre = self.weight_prefix
        out: list[tuple[str, tuple[str, ...], bool]] = [
            (f"{pre}embed_tokens.weight", ("embed_tokens", "embedding"), False),
            (f"{pre}norm.weight", ("norm", "scale"), False)]
        for i in range(self.num_hidden_layers):
            hp, fp = f"{pre}layers.{i}", (f"layers_{i}",)
            names = ["q_proj", "o_proj"]
            if self.layer_kv_source(i) is None:
                names += ["k_proj"] + (["v_proj"] if self.layer_has_v_proj(i) else [])
            for proj in names:
                out.append((f"{hp}.self_attn.{proj}.weight", fp + ("self_attn", proj, "kernel"), True))
                if self.attention_bias:
                    out.append((f"{hp}.self_attn.{proj}.bias", fp + ("self_attn", proj, "bias"), False))
            norms = ["q_norm"] + (["k_norm"] if self.layer_kv_source(i) is None else [])
            out += [(f"{hp}.self_attn.{n}.weight", fp + ("self_attn", n, "scale"), False) for n in norms]
            for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                      "post_feedforward_layernorm"):
                out.append((f"{hp}.{n}.weight", fp + (n, "scale"), False))
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out.append((f"{hp}.mlp.{proj}.weight", fp + ("mlp", proj, "kernel"), True))
            out.append((f"{hp}.layer_scalar", fp + ("layer_scalar",), False))
        if not self.tie_word_embeddings:
            out.append(("lm_head.weight", ("lm_head", "kernel"), True))
        return out

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF key -> expected tensor shape (PyTorch orientation)."""
        pre, e = self.weight_prefix, self.hidden_size
        shapes = {f"{pre}embed_tokens.weight": (self.vocab_size, e), f"{pre}norm.weight": (e,),
                  "lm_head.weight": (self.vocab_size, e)}
        for i in range(self.num_hidden_layers):
            hp, hd, kvh, f = f"{pre}layers.{i}", self.layer_head_dim(i), self.layer_kv_heads(i), self.layer_intermediate_size(i)
            qd = self.num_attention_heads * hd
            for name, shp in {"self_attn.q_proj": (qd, e), "self_attn.k_proj": (kvh * hd, e),
                              "self_attn.v_proj": (kvh * hd, e), "self_attn.o_proj": (e, qd),
                              "mlp.gate_proj": (f, e), "mlp.up_proj": (f, e), "mlp.down_proj": (e, f)}.items():
                shapes[f"{hp}.{name}.weight"] = shp
                shapes[f"{hp}.{name}.bias"] = (shp[0],)
            shapes[f"{hp}.self_attn.q_norm.weight"] = (hd,)
            shapes[f"{hp}.self_attn.k_norm.weight"] = (hd,)
            for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                      "post_feedforward_layernorm"):
                shapes[f"{hp}.{n}.weight"] = (e,)
            shapes[f"{hp}.layer_scalar"] = (1,)
        return shapes

    def hf_ignored_key(self, key: str) -> bool:
        """Keys a Gemma 4 checkpoint may hold that the text decoder does not use (vision/audio towers)."""
        if self.weight_prefix == _WRAPPER_PREFIX:
            return not key.startswith(_WRAPPER_PREFIX) and key != "lm_head.weight"
        return False


def _rope_spec(spec: dict[str, Any] | None, default: RopeSpec, source: str) -> RopeSpec:
    """A RopeSpec from one `rope_parameters[layer_type]` entry (None -> `default`)."""
    if spec is None:
        return default
    rope_type = spec.get("rope_type", "default")
    if rope_type not in _ROPE_TYPES:
        raise ConfigError(f"{source}: unsupported Gemma 4 rope_type {rope_type!r}; supported: {list(_ROPE_TYPES)}")
    return RopeSpec(rope_type=rope_type, rope_theta=float(spec.get("rope_theta", default.rope_theta)),
                    partial_rotary_factor=float(spec.get("partial_rotary_factor", 1.0)),
                    factor=float(spec.get("factor", 1.0)))
