"""Target checkpoint I/O: Hugging Face safetensors directories <-> (TargetConfig, params).

`load_target` reads `config.json` and either `model.safetensors` or a sharded checkpoint
(`model.safetensors.index.json` + shards). All headers are read and checked against the
config (missing / unexpected / mis-shaped keys) before any tensor data is touched; tensors are
then read one at a time, converted (transpose + dtype), and placed on device (optionally directly
onto a given `jax.sharding.Sharding`), so the host holds at most one tensor (and its converted
copy) at a time.

Every tensor must be floating point and finite (a NaN weight is an error naming file and tensor),
config fields are type- and range-checked (`dspark_jax.config`), and index shard paths must stay
inside the model directory.

`save_target` writes a directory that `transformers.AutoModelForCausalLM.from_pretrained`
loads: `config.json` plus `model.safetensors`, or shards + index above `max_shard_bytes`. The
new directory is written beside the old one and swapped in atomically
(`dspark_jax.checkpoint.atomic`; local or `etils.epath` remote paths); the host holds at most one
shard at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Iterable, Mapping, Union

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from dspark_jax.checkpoint.atomic import (is_remote, local_copy, path_exists, publish_dir, recover_dir, recover_files,
                                         staging_dir_for)
from dspark_jax.checkpoint.hf_layout import CheckpointError, expected_hf_shapes, ignored_extra_key, set_path, target_key_map
from dspark_jax.config import TargetConfig, load_hf_config, read_config_json

__all__ = ["load_target", "save_target", "read_safetensors_headers", "check_tensor_dtypes", "read_tensor",
           "foreign_checkpoint_hint", "open_safetensors", "SINGLE_FILE", "INDEX_FILE"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
              "float16": np.dtype(np.float16)}
_READABLE = {"F32", "F16", "BF16", "F64"}  # safetensors dtype tags we convert from
_IGNORED_EXTRA = ("rotary_emb",)  # buffers some exporters store; never parameters

# A pytree of shardings mirroring params, one sharding for everything, or config -> either.
ShardingsArg = Union[None, jax.sharding.Sharding, Mapping[str, Any], Callable[[TargetConfig], Any]]


def _dtype_name(dtype: Any) -> str | None:
    """None | 'bfloat16' | np/jnp dtype -> 'float32' / 'bfloat16' / 'float16' (or None)."""
    if dtype is None:
        return None
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16"}.get(name, name)
    if name not in _NP_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
    return name


def open_safetensors(path: str):
    """`safe_open` with library errors re-raised as CheckpointError naming the file."""
    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # SafetensorError derives from Exception only
        raise CheckpointError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from e


def read_safetensors_headers(model_dir: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """{hf_key: (file path, shape, safetensors dtype tag)} for a single-file or sharded checkpoint.

    Reads headers only. Raises CheckpointError naming the file for a missing weights file, an
    unreadable index, an index entry pointing at a missing shard or at a shard that lacks the key,
    a key stored twice, or a corrupt / truncated safetensors file.
    """
    d = os.fspath(model_dir)
    index_path, single_path = os.path.join(d, INDEX_FILE), os.path.join(d, SINGLE_FILE)
    if os.path.isfile(index_path):
        weight_map = read_config_json(index_path, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: invalid safetensors index (need a 'weight_map' object of "
                                  f"tensor name -> shard file name)")
        files = sorted(set(weight_map.values()))
        for name in files:
            _check_shard_name(name, index_path)
            if not os.path.isfile(os.path.join(d, name)):
                keys = sorted(k for k, v in weight_map.items() if v == name)
                raise CheckpointError(f"{index_path} references shard {name!r} (for {keys[:3]}"
                                      f"{' ...' if len(keys) > 3 else ''}) but {os.path.join(d, name)} does not exist")
    elif os.path.isfile(single_path):
        weight_map, files = None, [SINGLE_FILE]
    else:
        present = [n for n in ("pytorch_model.bin", "model.bin") if os.path.isfile(os.path.join(d, n))]
        hint = f" (found {present}: only safetensors is supported)" if present else ""
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {d!r}{hint}")

    out: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for name in files:
        path = os.path.join(d, name)
        with open_safetensors(path) as f:
            for key in f.keys():
                if key in out:
                    raise CheckpointError(f"tensor {key!r} is stored twice: in {out[key][0]} and {path}")
                sl = f.get_slice(key)
                out[key] = (path, tuple(int(s) for s in sl.get_shape()), str(sl.get_dtype()))
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in out or out[key][0] != os.path.join(d, name):
                raise CheckpointError(f"{index_path} maps {key!r} to {name!r}, but that shard has no such tensor")
    return out


def _check_shard_name(name: str, index_path: str) -> None:
    """CheckpointError unless shard `name` is a relative path inside the model directory (no '..', not absolute)."""
    parts = name.replace("\\", "/").split("/")
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise CheckpointError(f"{index_path}: shard path {name!r} points outside the model directory; "
                              f"shards must be files inside it")


def check_tensor_dtypes(headers: Mapping[str, tuple[str, tuple[int, ...], str]], keys: Iterable[str]) -> None:
    """CheckpointError naming the file, key and dtype for a tensor among `keys` that is not floating point
    (an int / bool tensor is never cast to float silently)."""
    for key in sorted(keys):
        path, _, tag = headers[key]
        if tag not in _READABLE:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {tag}; only F32/F16/BF16 are supported")


def read_tensor(f: Any, key: str, file: str) -> np.ndarray:
    """Tensor `key` of the open safetensors file `f`; CheckpointError naming file and key if it is unreadable
    or holds NaN / infinity (a damaged or diverged checkpoint must not generate silent garbage)."""
    try:
        arr = f.get_tensor(key)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read tensor {key!r}: {e}") from e
    finite = np.isfinite(arr)
    if not finite.all():
        raise CheckpointError(f"{file}: tensor {key!r} holds {int(finite.size - finite.sum())} non-finite "
                              f"value(s) (NaN/inf); the checkpoint is damaged or came from a diverged run")
    return arr


# Tensor-name prefixes of checkpoints this library does not read, for a helpful "what is this" hint.
_FOREIGN_LAYOUTS = (("transformer.h.", "a GPT-2 checkpoint (transformer.h.*)"),
                    ("transformer.wte", "a GPT-2 checkpoint (transformer.wte)"),
                    ("h.0.attn.c_attn", "a GPT-2 checkpoint (h.*.attn.c_attn)"),
                    ("gpt_neox.", "a GPT-NeoX checkpoint (gpt_neox.*)"),
                    ("model.decoder.", "an OPT-style checkpoint (model.decoder.*)"),
                    ("model.language_model.", "a multimodal checkpoint (model.language_model.*)"))


def foreign_checkpoint_hint(keys: Iterable[str]) -> str:
    """A sentence saying what a checkpoint with these tensor names is, when it is recognisably not ours."""
    keys = list(keys)
    if "fc.weight" in keys and "hidden_norm.weight" in keys:
        return "; this is a DSpark/DFlash drafter (fc / hidden_norm tensors): pass it as the draft (--draft)"
    for prefix, what in _FOREIGN_LAYOUTS:
        if any(k.startswith(prefix) or ("." + prefix) in k for k in keys):
            return f"; the tensor names look like {what}, whatever config.json says"
    return ""


def _validate(headers: Mapping[str, tuple[str, tuple[int, ...], str]], config: TargetConfig, where: str) -> None:
    """Check the stored keys / shapes / dtypes against `config`; CheckpointError names key and shapes."""
    wanted = {k for k, _, _ in target_key_map(config)}
    present = set(headers)
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints still store it; ignored
    unexpected = sorted(k for k in present - wanted
                        if not any(a in k for a in _IGNORED_EXTRA) and not ignored_extra_key(config, k))
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
            f"(in {os.path.basename(headers[unexpected[0]][0])}) not used by a {config.family} model with this "
            f"config.json (tie_word_embeddings={config.tie_word_embeddings}, attention_bias="
            f"{config.attention_bias}, mlp_bias={config.mlp_bias}){foreign_checkpoint_hint(present)}")
    missing = sorted(wanted - present)
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    shapes = expected_hf_shapes(config)
    for key in sorted(wanted):
        path, shape, _ = headers[key]
        if shape != shapes[key]:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {shape}, expected {shapes[key]} from config.json")
    check_tensor_dtypes(headers, wanted)


def _sharding_at(shardings: Any, path: tuple[str, ...]) -> jax.sharding.Sharding | None:
    """The sharding for param `path` in a shardings pytree (None where the tree has no entry)."""
    node = shardings
    for p in path:
        if node is None or isinstance(node, jax.sharding.Sharding):
            break
        node = node.get(p) if isinstance(node, Mapping) else getattr(node, p, None)
    if node is not None and not isinstance(node, jax.sharding.Sharding):
        raise TypeError(f"shardings entry for {'/'.join(path)} is {type(node).__name__}, not a jax Sharding")
    return node



def load_target(model_dir: str | os.PathLike, *, dtype: Any = None,
                shardings: ShardingsArg = None) -> tuple[TargetConfig, dict]:
    """Load a Hugging Face Qwen3/Llama checkpoint directory -> (TargetConfig, params).

    Args:
      model_dir: directory with `config.json` and `model.safetensors` or a sharded safetensors
        checkpoint. F32 / F16 / BF16 tensors are accepted; tied checkpoints may omit `lm_head.weight`.
      dtype: parameter dtype ('float32' | 'bfloat16' | 'float16' or a dtype); None -> the dtype the
        checkpoint records in config.json (`dtype` / `torch_dtype`; float32 if none we support).
        The returned config's `dtype` is set to it.
      shardings: where to place each tensor as it is read: None (default device), one
        `jax.sharding.Sharding` for all, a pytree of shardings with the params' structure (missing
        entries -> default device), or a callable `config -> such a pytree`.
    Returns:
      (config, params) with params a nested dict of jax arrays ready for `TargetModel.apply`.
    Raises:
      CheckpointError naming the file and key for unusable files (including a tensor holding NaN/inf
      and an index whose shard paths leave the directory); ConfigError naming the field for a
      config.json this library cannot represent (e.g. an unknown architecture, text in a numeric field).
    """
    if is_remote(model_dir):
        with local_copy(model_dir) as d:
            return load_target(d, dtype=dtype, shardings=shardings)
    d = os.fspath(model_dir)
    if not os.path.isdir(d):
        recover_dir(d)  # a save interrupted between its two renames
    if not os.path.isdir(d):
        raise CheckpointError(f"model directory {d!r} does not exist")
    recover_files(d)  # an in-place export (publish_files) interrupted after it was complete
    if not os.path.isfile(os.path.join(d, "config.json")):
        raise CheckpointError(f"no config.json in model directory {d!r}")
    name = _dtype_name(dtype)
    config = load_hf_config(d, dtype=name)
    np_dtype = _NP_DTYPES[config.dtype]
    headers = read_safetensors_headers(d)
    _validate(headers, config, d)
    if callable(shardings) and not isinstance(shardings, (jax.sharding.Sharding, Mapping)):
        shardings = shardings(config)

    by_file: dict[str, list[tuple[str, tuple[str, ...], bool]]] = {}
    for hf_key, path, transpose in target_key_map(config):
        by_file.setdefault(headers[hf_key][0], []).append((hf_key, path, transpose))
    params: dict = {}
    for file, entries in by_file.items():
        with open_safetensors(file) as f:
            for hf_key, path, transpose in entries:
                arr = read_tensor(f, hf_key, file)  # [out, in] for linear weights
                arr = np.ascontiguousarray(arr.T if transpose else arr, dtype=np_dtype)  # one host copy
                set_path(params, path, jax.device_put(arr, _sharding_at(shardings, path)))
                del arr
    return config, params


def _plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy in-order packing of (key, nbytes) into shards of at most `max_shard_bytes` (a lone big tensor is allowed)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    return shards


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def save_target(params: Mapping[str, Any], config: TargetConfig, out_dir: str | os.PathLike, *,
                dtype: Any = None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
                copy_files: Iterable[str | os.PathLike] = ()) -> str:
    """Write `params` as a Hugging Face checkpoint directory that transformers can load.

    Args:
      params: nested param dict as used by `TargetModel` (jax or numpy arrays; sharded arrays are
        gathered one tensor at a time).
      config: the model's TargetConfig; written as `config.json` with `dtype` set to the saved dtype.
      out_dir: destination directory (local, or remote such as ``gs://`` via `etils.epath`); written
        beside the old one and swapped in atomically (`dspark_jax.checkpoint.atomic`): a crash at any
        point leaves the old or the new model there, complete.
      dtype: tensor dtype on disk ('bfloat16' | 'float16' | 'float32'); None -> `config.dtype`.
      max_shard_bytes: above this total size, write `model-0000i-of-0000n.safetensors` shards and
        `model.safetensors.index.json`; otherwise a single `model.safetensors`.
      overwrite: replace an existing `out_dir` (otherwise it is an error).
      copy_files: extra files (e.g. tokenizer.json, generation_config.json) copied into the directory.
    Returns:
      The absolute path of `out_dir` (a remote path as given).
    """
    name = _dtype_name(dtype) or config.dtype
    np_dtype = _NP_DTYPES[name]
    remote = is_remote(out_dir)
    out = os.fspath(out_dir) if remote else os.path.abspath(os.fspath(out_dir))
    if not remote:
        recover_dir(out)
    if path_exists(out) and not overwrite:
        raise CheckpointError(f"{out!r} already exists (pass overwrite=True to replace it)")
    shapes = expected_hf_shapes(config)
    entries: dict[str, tuple[Any, bool]] = {}
    for hf_key, path, transpose in target_key_map(config):
        node: Any = params
        for p in path:
            if not isinstance(node, Mapping) or p not in node:
                raise CheckpointError(f"params have no entry {'/'.join(path)} (for {hf_key!r})")
            node = node[p]
        got = tuple(np.shape(node))[::-1] if transpose else tuple(np.shape(node))
        if got != shapes[hf_key]:
            raise CheckpointError(f"param {'/'.join(path)} -> {hf_key!r} has HF shape {got}, "
                                  f"expected {shapes[hf_key]} from the config")
        entries[hf_key] = (node, transpose)
    sizes = [(k, int(np.prod(shapes[k])) * np_dtype.itemsize) for k in entries]
    shards = _plan_shards(sizes, max_shard_bytes)

    tmp = staging_dir_for(out)
    try:
        n = len(shards)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for fname, keys in zip(names, shards):
            tensors = {}
            for k in keys:  # host memory: at most one shard
                value, transpose = entries[k]
                arr = np.asarray(jax.device_get(value))
                tensors[k] = np.ascontiguousarray(arr.T if transpose else arr, dtype=np_dtype)
            save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
            del tensors
        if n > 1:
            _write_json(os.path.join(tmp, INDEX_FILE), {
                "metadata": {"total_size": sum(s for _, s in sizes)},
                "weight_map": {k: fname for fname, keys in zip(names, shards) for k in keys}})
        _write_json(os.path.join(tmp, "config.json"), config.replace(dtype=name).to_hf_config())
        for src in copy_files:
            shutil.copy2(os.fspath(src), os.path.join(tmp, os.path.basename(os.fspath(src))))
        publish_dir(tmp, out)  # overwrite=True: swap, then delete the old directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
