"""Eagle-3 draft checkpoints in DeepSpec's layout (`Qwen3Eagle3Model.save_pretrained`): `config.json` + safetensors.

Keys (PyTorch `[out, in]`; Flax kernels are the transpose), exactly the state dict of DeepSpec
`deepspec/modeling/eagle3/qwen3/modeling.py` (`self.layers = nn.ModuleList(...)`, one layer):

    embed_tokens.weight [V, d]                       -> embed_tokens/embedding (frozen copy of the target's)
    fc.weight [d, n_ctx*d]                           -> fc/kernel (T)
    layers.0.{input_layernorm,hidden_norm,post_attention_layernorm}.weight [d]
    layers.0.self_attn.{q,k,v}_proj.weight [*, 2d], layers.0.self_attn.o_proj.weight [d, H*hd]
    layers.0.self_attn.{q,k}_norm.weight [hd], layers.0.mlp.{gate,up,down}_proj.weight
                                                     -> layers_0/... (T for projections)
    norm.weight [d], lm_head.weight [V, d]           (lm_head: frozen copy, untied)
The rotary `inv_freq` buffer is non-persistent (not saved); DeepSpec drafts use the full vocabulary,
so there is no `d2t` / `t2d`. Read-only alias: SpecForge-style exports name the layer `midlayer.*`
(`EAGLE3_KEY_ALIASES`) and may carry identity `d2t` / `t2d` buffers (ignored).
`config.json`: see `Eagle3Config.to_eagle3_config`.
Loading and saving go through `dspark_jax.checkpoint.deepspec.load_draft` / `save_draft` (the same
validation: confined shards, float and finite tensors, crash-safe publish); this module is the layout.
"""

from __future__ import annotations

import os

from dspark_jax.config import ConfigError, read_config_json
from dspark_jax.draft.eagle3 import Eagle3Config, is_eagle3_architecture

__all__ = ["eagle3_key_map", "eagle3_shapes", "load_eagle3", "save_eagle3", "is_eagle3_dir", "is_eagle3_config",
           "canonical_eagle3_keys", "IGNORED_EAGLE3_BUFFERS", "EAGLE3_KEY_ALIASES"]

IGNORED_EAGLE3_BUFFERS = ("d2t", "t2d")  # SpecForge vocabulary maps (identity for a full-vocabulary draft)
EAGLE3_KEY_ALIASES = (("midlayer.", "layers.0."),)  # (legacy prefix, DeepSpec prefix), read only
_LAYER = "layers.0."


def eagle3_key_map(config: Eagle3Config) -> list[tuple[str, tuple[str, ...], bool]]:
    """[(checkpoint key, flax param path, transpose)] for every tensor (DeepSpec names)."""
    out = [("embed_tokens.weight", ("embed_tokens", "embedding"), False), ("fc.weight", ("fc", "kernel"), True),
           ("norm.weight", ("norm", "scale"), False), ("lm_head.weight", ("lm_head", "kernel"), True)]
    ml = ("layers_0",)
    for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        out.append((f"{_LAYER}{n}.weight", ml + (n, "scale"), False))
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out.append((f"{_LAYER}self_attn.{proj}.weight", ml + (proj, "kernel"), True))
    for n in ("q_norm", "k_norm"):
        out.append((f"{_LAYER}self_attn.{n}.weight", ml + (n, "scale"), False))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out.append((f"{_LAYER}mlp.{proj}.weight", ml + ("mlp", proj, "kernel"), True))
    return out


def eagle3_shapes(config: Eagle3Config) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape (PyTorch orientation)."""
    c = config
    d, v, hd = c.hidden_size, c.vocab_size, c.head_dim
    qd, kvd, f = c.num_attention_heads * hd, c.num_key_value_heads * hd, c.intermediate_size
    layer = {"input_layernorm.weight": (d,), "hidden_norm.weight": (d,), "post_attention_layernorm.weight": (d,),
             "self_attn.q_proj.weight": (qd, 2 * d), "self_attn.k_proj.weight": (kvd, 2 * d),
             "self_attn.v_proj.weight": (kvd, 2 * d), "self_attn.o_proj.weight": (d, qd),
             "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,), "mlp.gate_proj.weight": (f, d),
             "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}
    return {"embed_tokens.weight": (v, d), "fc.weight": (d, c.context_dim), "norm.weight": (d,),
            "lm_head.weight": (v, d), **{_LAYER + k: s for k, s in layer.items()}}


def canonical_eagle3_keys(tensors: dict, source: str) -> dict:
    """The state dict with legacy key prefixes (`EAGLE3_KEY_ALIASES`) renamed to DeepSpec's; a key present
    under both names is an error naming it and `source`."""
    from dspark_jax.checkpoint.hf_layout import CheckpointError

    out = {}
    for key, value in tensors.items():
        new = key
        for old, canonical in EAGLE3_KEY_ALIASES:
            if key.startswith(old):
                new = canonical + key[len(old):]
        if new in out:
            raise CheckpointError(f"{source}: tensor {new!r} appears twice (as {key!r} and under its DeepSpec name)")
        out[new] = value
    return out


def is_eagle3_config(hf: dict) -> bool:
    """Whether a parsed `config.json` declares an Eagle-3 architecture (`*Eagle3Model`, or `*Eagle3`)."""
    return is_eagle3_architecture(hf.get("architectures"))


def is_eagle3_dir(path: str | os.PathLike) -> bool:
    """Whether `path/config.json` declares an Eagle-3 architecture (False if it is absent or unreadable)."""
    cfg = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        return is_eagle3_config(read_config_json(cfg))
    except ConfigError:
        return False


def load_eagle3(path: str | os.PathLike, *, dtype: str | None = None) -> tuple[Eagle3Config, dict]:
    """Read an Eagle-3 checkpoint directory -> (Eagle3Config, params as numpy arrays); `load_draft` checks."""
    from dspark_jax.checkpoint.deepspec import load_draft
    from dspark_jax.checkpoint.hf_layout import CheckpointError

    config, params = load_draft(path, dtype=dtype)
    if not isinstance(config, Eagle3Config):
        raise CheckpointError(f"{os.fspath(path)}: not an Eagle-3 checkpoint (architectures in config.json)")
    return config, params


def save_eagle3(params: dict, config: Eagle3Config, path: str | os.PathLike, *, dtype: str = "bfloat16") -> str:
    """Write `config.json` + safetensors (keys of `eagle3_key_map`) crash-safely via `save_draft`; returns the path."""
    from dspark_jax.checkpoint.deepspec import save_draft

    save_draft(params, config, path, dtype=dtype)
    return os.fspath(path)
