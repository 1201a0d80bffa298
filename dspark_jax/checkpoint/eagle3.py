"""Eagle-3 draft checkpoints (DeepSpec `eagle3`, SpecForge-style keys): `config.json` + safetensors.

Keys (PyTorch `[out, in]`; Flax kernels are the transpose):

    embed_tokens.weight [V, d]                       -> embed_tokens/embedding
    fc.weight [d, n_ctx*d]                           -> fc/kernel (T)
    midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight [d]
    midlayer.self_attn.{q,k,v}_proj.weight [*, 2d], midlayer.self_attn.o_proj.weight [d, H*hd]
    midlayer.self_attn.{q,k}_norm.weight [hd], midlayer.mlp.{gate,up,down}_proj.weight
    norm.weight [d], lm_head.weight [V, d]
`d2t` / `t2d` vocabulary-mapping buffers (identity for a full-vocabulary draft) and rotary buffers
are ignored on load. `config.json`: see `Eagle3Config.to_eagle3_config`.
Loading and saving go through `dspark_jax.checkpoint.deepspec.load_draft` / `save_draft` (the same
validation: confined shards, float and finite tensors, crash-safe publish); this module is the layout.
"""

from __future__ import annotations

import os

from dspark_jax.config import ConfigError, read_config_json
from dspark_jax.draft.eagle3 import Eagle3Config

__all__ = ["eagle3_key_map", "eagle3_shapes", "load_eagle3", "save_eagle3", "is_eagle3_dir", "is_eagle3_config",
           "IGNORED_EAGLE3_BUFFERS"]

IGNORED_EAGLE3_BUFFERS = ("d2t", "t2d")  # vocabulary maps (identity for a full-vocabulary draft)


def eagle3_key_map(config: Eagle3Config) -> list[tuple[str, tuple[str, ...], bool]]:
    """[(checkpoint key, flax param path, transpose)] for every tensor."""
    out = [("embed_tokens.weight", ("embed_tokens", "embedding"), False), ("fc.weight", ("fc", "kernel"), True),
           ("norm.weight", ("norm", "scale"), False), ("lm_head.weight", ("lm_head", "kernel"), True)]
    ml = ("midlayer",)
    for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        out.append((f"midlayer.{n}.weight", ml + (n, "scale"), False))
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out.append((f"midlayer.self_attn.{proj}.weight", ml + (proj, "kernel"), True))
    for n in ("q_norm", "k_norm"):
        out.append((f"midlayer.self_attn.{n}.weight", ml + (n, "scale"), False))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out.append((f"midlayer.mlp.{proj}.weight", ml + ("mlp", proj, "kernel"), True))
    return out


def eagle3_shapes(config: Eagle3Config) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape (PyTorch orientation)."""
    c = config
    d, v, hd = c.hidden_size, c.vocab_size, c.head_dim
    qd, kvd, f = c.num_attention_heads * hd, c.num_key_value_heads * hd, c.intermediate_size
    shapes = {"embed_tokens.weight": (v, d), "fc.weight": (d, c.context_dim), "norm.weight": (d,),
              "lm_head.weight": (v, d), "midlayer.self_attn.q_proj.weight": (qd, 2 * d),
              "midlayer.self_attn.k_proj.weight": (kvd, 2 * d), "midlayer.self_attn.v_proj.weight": (kvd, 2 * d),
              "midlayer.self_attn.o_proj.weight": (d, qd), "midlayer.self_attn.q_norm.weight": (hd,),
              "midlayer.self_attn.k_norm.weight": (hd,), "midlayer.mlp.gate_proj.weight": (f, d),
              "midlayer.mlp.up_proj.weight": (f, d), "midlayer.mlp.down_proj.weight": (d, f)}
    for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        shapes[f"midlayer.{n}.weight"] = (d,)
    return shapes


def is_eagle3_config(hf: dict) -> bool:
    """Whether a parsed `config.json` declares an Eagle-3 architecture (`*Eagle3`)."""
    archs = hf.get("architectures")
    return isinstance(archs, list) and bool(archs) and str(archs[0]).endswith("Eagle3")


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
