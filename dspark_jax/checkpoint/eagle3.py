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
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from dspark_jax.checkpoint.deepspec import read_safetensors_dir
from dspark_jax.checkpoint.hf_layout import CheckpointError, get_path, set_path, swap_in_dir
from dspark_jax.draft.config import DraftConfigError
from dspark_jax.draft.eagle3 import Eagle3Config

__all__ = ["eagle3_key_map", "eagle3_shapes", "load_eagle3", "save_eagle3", "is_eagle3_dir"]

_IGNORED = ("rotary_emb", "d2t", "t2d")


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


def is_eagle3_dir(path: str | os.PathLike) -> bool:
    """Whether `path/config.json` declares an Eagle-3 architecture."""
    cfg = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg) as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        return False
    return bool(archs) and str(archs[0]).endswith("Eagle3")


def load_eagle3(path: str | os.PathLike, *, dtype: str | None = None) -> tuple[Eagle3Config, dict]:
    """Read an Eagle-3 checkpoint directory -> (Eagle3Config, params as numpy arrays).

    CheckpointError / DraftConfigError name the file and the missing, unexpected or mis-shaped key.
    """
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"no config.json in {path!r}")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise DraftConfigError(f"{cfg_path}: invalid JSON ({e})") from e
    config = Eagle3Config.from_eagle3_config(hf, dtype=dtype, source=cfg_path)
    tensors = {k.replace("_orig_mod.", ""): t for k, t in read_safetensors_dir(path).items()}
    key_map, shapes = eagle3_key_map(config), eagle3_shapes(config)
    wanted = {k for k, _, _ in key_map}
    unexpected = sorted(k for k in set(tensors) - wanted if not any(a in k for a in _IGNORED))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected[:5]} in an Eagle-3 checkpoint")
    missing = sorted(wanted - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}")
    dt = config.dtype
    params: dict = {}
    for key, p, transpose in key_map:
        arr = np.asarray(tensors[key])
        if tuple(arr.shape) != shapes[key]:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(arr.shape)}, expected {shapes[key]}")
        arr = arr.T if transpose else arr
        set_path(params, p, np.ascontiguousarray(arr.astype(np.float32)).astype(_np_dtype(dt)))
    return config, params


def _np_dtype(name: str):
    import ml_dtypes

    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[name]


def save_eagle3(params: dict, config: Eagle3Config, path: str | os.PathLike, *, dtype: str = "bfloat16",
                overwrite: bool = True) -> str:
    """Write `config.json` + `model.safetensors` (keys of `eagle3_key_map`) atomically; returns the path."""
    out = os.path.abspath(os.fspath(path))
    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"{out!r} already exists")
    params = nn_unbox(params)
    shapes = eagle3_shapes(config)
    tensors: dict[str, Any] = {}
    for key, p, transpose in eagle3_key_map(config):
        arr = np.asarray(jax.device_get(get_path(params, p)))
        arr = arr.T if transpose else arr
        if tuple(arr.shape) != shapes[key]:
            raise CheckpointError(f"param {'/'.join(p)} gives {key!r} shape {tuple(arr.shape)}, expected {shapes[key]}")
        tensors[key] = np.ascontiguousarray(arr.astype(np.float32).astype(_np_dtype(dtype)))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config.to_eagle3_config(dtype=dtype), f, indent=2, sort_keys=True)
            f.write("\n")
        swap_in_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def nn_unbox(tree: Any) -> Any:
    """Strip flax partitioning boxes (params straight from `init`)."""
    import flax.linen as nn

    return nn.meta.unbox(tree)
