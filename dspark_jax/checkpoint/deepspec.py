"""DeepSpec draft checkpoints (spec §6): `config.json` + safetensors, keys without prefix.

Key layout (PyTorch `[out, in]` orientation; Flax kernels are the transpose):

    embed_tokens.weight [V, d]                 -> embed_tokens/embedding
    fc.weight [d, n_ctx*d]                     -> fc/kernel (T)
    hidden_norm.weight [d]                     -> hidden_norm/scale
    layers.{i}.input_layernorm.weight, layers.{i}.post_attention_layernorm.weight,
    layers.{i}.self_attn.{q,k,v,o}_proj.weight (+.bias iff attention_bias),
    layers.{i}.self_attn.{q,k}_norm.weight, layers.{i}.mlp.{gate,up,down}_proj.weight
                                               -> layers_{i}/... (same mapping as a target layer)
    norm.weight [d]                            -> norm/scale
    lm_head.weight [V, d]                      -> lm_head/kernel (T)
    markov_head.markov_w1.weight [V, r]        -> markov_head/markov_w1/embedding (no transpose)
    markov_head.markov_w2.weight [V, r]        -> markov_head/markov_w2/kernel [r, V] (T)
    markov_head.gate_proj.{weight [r, d+r], bias [r]}          (gated head)
    markov_head.joint_proj.{weight [3r, 2r+d], bias [3r]}      (rnn head)
    confidence_head.proj.{weight [1, d(+r)], bias [1]}

Single `model.safetensors` or sharded `model-0000i-of-0000n.safetensors` +
`model.safetensors.index.json`. Writes are atomic (temporary directory + rename).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from dspark_jax.checkpoint.hf import check_tensor_dtypes, open_safetensors, read_safetensors_headers, read_tensor
from dspark_jax.checkpoint.atomic import is_remote, local_copy, publish_dir, recover_dir, staging_dir_for
from dspark_jax.checkpoint.hf_layout import CheckpointError, expected_hf_shapes, get_path, set_path, target_key_map
from dspark_jax.config import TargetConfig, read_config_json
from dspark_jax.checkpoint.eagle3 import (IGNORED_EAGLE3_BUFFERS, canonical_eagle3_keys, eagle3_key_map, eagle3_shapes,
                                          is_eagle3_config)
from dspark_jax.draft.config import DraftConfig
from dspark_jax.draft.eagle3 import Eagle3Config
from dspark_jax.draft.model import init_draft_params
from dspark_jax.layers import dtype_of

__all__ = ["draft_key_map", "expected_draft_shapes", "deepspec_to_params", "params_to_deepspec", "load_draft",
           "save_draft", "draft_params_from_target", "read_safetensors_dir"]

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_IGNORED = ("rotary_emb",) + IGNORED_EAGLE3_BUFFERS  # non-persistent buffers / Eagle-3 vocabulary maps
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

KeyMap = list[tuple[str, tuple[str, ...], bool]]


def _strip(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key


def draft_key_map(config: DraftConfig) -> KeyMap:
    """[(deepspec_key, flax_param_path, transpose)] for every tensor of a draft checkpoint (DSpark/DFlash,
    Gemma 4 or Eagle-3 layout, chosen by the config's type)."""
    if isinstance(config, Eagle3Config):
        return eagle3_key_map(config)
    out: KeyMap = [(_strip(k), path, t) for k, path, t in target_key_map(config.layer_config())]
    out += [("fc.weight", ("fc", "kernel"), True), ("hidden_norm.weight", ("hidden_norm", "scale"), False)]
    if config.has_markov_head:
        mh = ("markov_head",)
        out += [("markov_head.markov_w1.weight", mh + ("markov_w1", "embedding"), False),
                ("markov_head.markov_w2.weight", mh + ("markov_w2", "kernel"), True)]
        extra = {"gated": "gate_proj", "rnn": "joint_proj"}.get(config.markov_head_type)
        if extra:
            out += [(f"markov_head.{extra}.weight", mh + (extra, "kernel"), True),
                    (f"markov_head.{extra}.bias", mh + (extra, "bias"), False)]
    if config.enable_confidence_head:
        out += [("confidence_head.proj.weight", ("confidence_head", "proj", "kernel"), True),
                ("confidence_head.proj.bias", ("confidence_head", "proj", "bias"), False)]
    return out


def expected_draft_shapes(config: DraftConfig) -> dict[str, tuple[int, ...]]:
    """DeepSpec key -> shape in PyTorch orientation, for every key of `draft_key_map(config)`."""
    if isinstance(config, Eagle3Config):
        return eagle3_shapes(config)
    c = config
    d, v, r = c.hidden_size, c.vocab_size, c.markov_rank
    shapes = {_strip(k): s for k, s in expected_hf_shapes(c.layer_config()).items()}
    shapes.update({
        "fc.weight": (d, c.context_dim), "hidden_norm.weight": (d,),
        "markov_head.markov_w1.weight": (v, r), "markov_head.markov_w2.weight": (v, r),
        "markov_head.gate_proj.weight": (r, d + r), "markov_head.gate_proj.bias": (r,),
        "markov_head.joint_proj.weight": (3 * r, 2 * r + d), "markov_head.joint_proj.bias": (3 * r,),
        "confidence_head.proj.weight": (1, c.confidence_in_features), "confidence_head.proj.bias": (1,),
    })
    return {k: shapes[k] for k, _, _ in draft_key_map(config)}


def deepspec_to_params(tensors: dict[str, np.ndarray], config: DraftConfig, *, source: str = "checkpoint",
                       dtype: Any = None) -> dict:
    """Flat DeepSpec state dict (numpy) -> nested Flax params. CheckpointError names offending keys."""
    tensors = {k.replace("_orig_mod.", ""): t for k, t in tensors.items()}
    if isinstance(config, Eagle3Config):
        tensors = canonical_eagle3_keys(tensors, source)  # SpecForge `midlayer.*` -> DeepSpec `layers.0.*`
    key_map = draft_key_map(config)
    shapes = expected_draft_shapes(config)
    wanted = {k for k, _, _ in key_map}
    unexpected = sorted(k for k in set(tensors) - wanted if not any(a in k for a in _IGNORED))
    if unexpected:
        what = ("an Eagle-3 draft" if isinstance(config, Eagle3Config) else
                f"this draft config (markov_rank={config.markov_rank}, markov_head_type={config.markov_head_type!r}, "
                f"enable_confidence_head={config.enable_confidence_head})")
        raise CheckpointError(f"{source}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
                              f" not used by {what}")
    missing = sorted(wanted - set(tensors))
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    params: dict = {}
    for key, path, transpose in key_map:
        arr = np.asarray(tensors[key])
        if tuple(arr.shape) != shapes[key]:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(arr.shape)}, expected "
                                  f"{shapes[key]} from config.json")
        if transpose:
            arr = arr.T
        if dtype is not None:
            arr = arr.astype(dtype)
        set_path(params, path, np.ascontiguousarray(arr))
    return params


def params_to_deepspec(params: dict, config: DraftConfig, *, dtype: Any = None) -> dict[str, np.ndarray]:
    """Nested Flax params -> flat DeepSpec state dict (PyTorch orientation, numpy, optional cast)."""
    params = _unbox(params)
    shapes = expected_draft_shapes(config)
    out = {}
    for key, path, transpose in draft_key_map(config):
        arr = np.asarray(jax.device_get(get_path(params, path)))
        if transpose:
            arr = arr.T
        if tuple(arr.shape) != shapes[key]:
            raise CheckpointError(f"param {'/'.join(path)} gives {key!r} shape {tuple(arr.shape)}, expected "
                                  f"{shapes[key]} for this config")
        if dtype is not None:
            arr = arr.astype(dtype)
        out[key] = np.ascontiguousarray(arr)
    return out


def _unbox(tree: Any) -> Any:
    import flax.linen as nn
    tree = nn.meta.unbox(tree)
    if isinstance(tree, dict) and set(tree) == {"params"}:
        tree = tree["params"]
    return tree


# ------------------------------------------------------------------------------------------ I/O


def read_safetensors_dir(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` or of a sharded index in directory `path` (numpy).

    Validated like a target checkpoint (`dspark_jax.checkpoint.hf.read_safetensors_headers`): shards
    confined to the directory, every index entry present; then every tensor (exporters' rotary buffers
    aside) must be floating point and finite. CheckpointError names the file and tensor otherwise.
    """
    headers = read_safetensors_headers(path)
    used = [k for k in headers if not any(a in k for a in _IGNORED)]
    check_tensor_dtypes(headers, used)
    by_file: dict[str, list[str]] = {}
    for key in used:
        by_file.setdefault(headers[key][0], []).append(key)
    tensors: dict[str, np.ndarray] = {}
    for file, keys in by_file.items():
        with open_safetensors(file) as f:
            for key in keys:
                tensors[key] = read_tensor(f, key, file)
    return tensors


def load_draft(path: str | os.PathLike, *, dtype: str | None = None) -> tuple[DraftConfig, dict]:
    """Read a DeepSpec draft directory -> (DraftConfig, params as numpy arrays of `dtype`).

    `dtype` (default: the dtype the checkpoint records, else float32) becomes `DraftConfig.dtype` and
    the parameter dtype. As strict as `load_target`: config fields type- and range-checked, a target
    directory recognised as such, tensors floating point and finite, shards inside the directory.
    """
    if is_remote(path):
        with local_copy(path) as local:
            return load_draft(local, dtype=dtype)
    path = os.fspath(path)
    if not os.path.isdir(path):
        recover_dir(path)  # a save interrupted between its two renames
    if not os.path.isdir(path):
        raise CheckpointError(f"draft directory {path!r} does not exist")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"no config.json in {path!r}")
    hf = read_config_json(cfg_path, CheckpointError)
    parse = Eagle3Config.from_eagle3_config if is_eagle3_config(hf) else DraftConfig.from_deepspec_config
    config = parse(hf, dtype=dtype, source=cfg_path)
    tensors = read_safetensors_dir(path)
    weights = next((os.path.join(path, n) for n in (_SINGLE, _INDEX) if os.path.isfile(os.path.join(path, n))), path)
    params = deepspec_to_params(tensors, config, source=weights, dtype=_NP_DTYPES[config.dtype])
    return config, params


def save_draft(params: dict, config: DraftConfig, path: str | os.PathLike, *, dtype: str = "bfloat16",
               max_shard_bytes: int | None = 5 * 1024 ** 3) -> None:
    """Write `config.json` + safetensors (DeepSpec layout) atomically, replacing `path` if it exists.

    `path` may be local or remote (``gs://`` via `etils.epath`); the new draft is written beside the
    old one and swapped in (`dspark_jax.checkpoint.atomic`), so a crash leaves one of them complete.
    Tensors are cast to `dtype`; above `max_shard_bytes` the weights are sharded with an index.
    """
    if dtype not in _NP_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_NP_DTYPES)}, got {dtype!r}")
    remote = is_remote(path)
    path = os.fspath(path) if remote else os.path.abspath(os.fspath(path))
    if not remote and os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{path!r} exists and is not a directory")
    tensors = params_to_deepspec(params, config, dtype=_NP_DTYPES[dtype])
    shards = _plan_shards(tensors, max_shard_bytes)
    tmp = staging_dir_for(path)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            config_json = (config.to_eagle3_config if isinstance(config, Eagle3Config) else config.to_deepspec_config)
            json.dump(config_json(dtype=dtype), f, indent=2, sort_keys=True)
            f.write("\n")
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, _SINGLE), metadata=meta)
        else:
            weight_map = {}
            n = len(shards)
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                save_file(shard, os.path.join(tmp, fname), metadata=meta)
                weight_map.update({k: fname for k in shard})
            total = sum(int(t.nbytes) for t in tensors.values())
            with open(os.path.join(tmp, _INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                          f, indent=2)
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _plan_shards(tensors: dict[str, np.ndarray], max_bytes: int | None) -> list[dict[str, np.ndarray]]:
    if max_bytes is None:
        return [tensors]
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k in sorted(tensors):
        nb = int(tensors[k].nbytes)
        if shards[-1] and size + nb > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nb
    return shards


# ------------------------------------------------------------------------------------------ init


def draft_params_from_target(target_params: dict, target_config: TargetConfig, draft_config: DraftConfig,
                             rng: jax.Array) -> dict:
    """Fresh draft params (HF init) with embed_tokens / lm_head copied from the target.

    A tied target's lm_head is its embedding matrix (stored as a separate draft tensor).
    """
    draft_config.validate_against_target(target_config)
    tp = _unbox(target_params)
    dt = dtype_of(draft_config.dtype)
    emb = jnp.asarray(get_path(tp, ("embed_tokens", "embedding")))
    if target_config.tie_word_embeddings:
        head = emb.T
    else:
        head = jnp.asarray(get_path(tp, ("lm_head", "kernel")))
    v, d = draft_config.vocab_size, draft_config.hidden_size
    if emb.shape != (v, d) or head.shape != (d, v):
        raise CheckpointError(f"target embed_tokens {tuple(emb.shape)} / lm_head kernel {tuple(head.shape)} do not "
                              f"match the draft's (vocab_size={v}, hidden_size={d})")
    params = init_draft_params(draft_config, rng)
    params["embed_tokens"] = {"embedding": jnp.array(emb, dtype=dt, copy=True)}
    params["lm_head"] = {"kernel": jnp.array(head, dtype=dt, copy=True)}
    return params
