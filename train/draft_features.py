"""Target features for draft training: online (frozen JAX target inside the step) or an offline cache.

Online (`make_feature_fn`): the frozen target runs inside the jitted training step with
`tap_layers=draft.target_layer_ids, return_final_hidden=True`; taps are HF `hidden_states[l+1]`
(raw residual stream, id -1 = embedding output) concatenated in ascending id order, the last
hidden is *after* the final norm (spec §4.1 step 4). Both are wrapped in `stop_gradient` and
rounded to `feature_dtype` (bfloat16 by default, exactly what the reference's bf16 cache holds),
so online and offline features are bit-identical. Target logits are never stored: the trainer
applies the draft's frozen `lm_head` to the last hidden at `label_idx - 1` (spec §4.2 step 6).

Offline cache, DeepSpec format version 2 (spec §4.1 step 4):

    manifest.json   version=2, num_samples, num_shards, target_layer_ids, hidden_dtype="bfloat16",
                    token_dtype="int32", mask_dtype="uint8", index_record_size=56, hidden_size,
                    shards=[{shard_id, file_name}], target_model_name_or_path, extras...
    samples.idx     56-byte little-endian records `<QIIQQQQQ`: (sample_id, shard_id, seq_len, offsets of
                    input_ids, attention_mask, loss_mask, target_hidden_states, target_last_hidden_states)
    shard-%05d.bin  per sample: input_ids int32 [S], attention_mask u8 [S], loss_mask u8 [S],
                    target_hidden_states bf16 [S, n_ctx*d], target_last_hidden_states bf16 [S, d]

Samples are stored with padding stripped (S = real length) and re-padded on read.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dspark_jax.config import TargetConfig
from dspark_jax.layers import dtype_of
from dspark_jax.target.model import TargetModel

__all__ = ["CACHE_VERSION", "INDEX_RECORD", "FeatureCacheError", "make_feature_fn", "gather_positions",
           "FeatureCacheWriter", "FeatureCache", "write_feature_cache"]

CACHE_VERSION = 2
INDEX_RECORD = struct.Struct("<QIIQQQQQ")  # 56 bytes
_INDEX_DTYPE = np.dtype([("sample_id", "<u8"), ("shard_id", "<u4"), ("seq_len", "<u4"), ("ids", "<u8"),
                         ("attn", "<u8"), ("loss", "<u8"), ("hidden", "<u8"), ("last", "<u8")])
_BF16 = np.dtype(ml_dtypes.bfloat16)
MANIFEST, INDEX = "manifest.json", "samples.idx"
assert INDEX_RECORD.size == 56 and _INDEX_DTYPE.itemsize == 56


class FeatureCacheError(ValueError):
    """A missing, corrupt or mismatched feature cache (message names the directory and field)."""


def make_feature_fn(target_config: TargetConfig, layer_ids: Sequence[int], feature_dtype: str = "bfloat16"
                    ) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """fn(target_params, input_ids [B, S]) -> (ctx [B, S, n_ctx*d], last_hidden [B, S, d]) in feature_dtype.

    Pure and traceable (call it inside a jitted step); positions are 0..S-1 (right padding does not
    affect real positions: attention is causal). Outputs are `stop_gradient`-ed.
    """
    model = TargetModel(target_config)
    ids = tuple(int(i) for i in layer_ids)
    fdt = dtype_of(feature_dtype)

    def fn(target_params, input_ids):
        b, s = input_ids.shape
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        out = model.apply({"params": target_params}, input_ids, pos, tap_layers=ids, return_final_hidden=True,
                          compute_logits=False)
        ctx = jnp.concatenate([t.astype(fdt) for t in out.taps], axis=-1)
        return jax.lax.stop_gradient(ctx), jax.lax.stop_gradient(out.final_hidden.astype(fdt))

    return fn


def gather_positions(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, S, D], idx [B, ...] int -> [B, ..., D] (row-wise gather along S)."""
    flat = idx.reshape(idx.shape[0], -1)
    out = jnp.take_along_axis(x, flat[:, :, None], axis=1)
    return out.reshape(*idx.shape, x.shape[-1])


# ------------------------------------------------------------------------------------- writing


class FeatureCacheWriter:
    """Write a version-2 cache into `directory` (built in a sibling temp dir, renamed on `close`).

    `extras` go into the manifest (e.g. target_model_name_or_path, max_length, git_sha). An existing
    cache at `directory` is replaced only once the new one is complete.
    """

    def __init__(self, directory: str | os.PathLike, *, target_layer_ids: Sequence[int], hidden_size: int,
                 max_shard_bytes: int = 64 * 1024 ** 3, extras: Mapping[str, Any] | None = None):
        self.directory = os.path.abspath(os.fspath(directory))
        self.layer_ids = [int(i) for i in target_layer_ids]
        self.hidden_size = int(hidden_size)
        self.max_shard_bytes = int(max_shard_bytes)
        self.extras = dict(extras or {})
        parent = os.path.dirname(self.directory)
        os.makedirs(parent, exist_ok=True)
        self._tmp = f"{self.directory}.tmp-{os.getpid()}"
        shutil.rmtree(self._tmp, ignore_errors=True)
        os.makedirs(self._tmp)
        self._index = open(os.path.join(self._tmp, INDEX), "wb")
        self._shard, self._shard_id, self._shard_size, self._n = None, -1, 0, 0
        self._shards: list[dict[str, Any]] = []

    def _new_shard(self) -> None:
        if self._shard is not None:
            self._shard.close()
        self._shard_id += 1
        name = f"shard-{self._shard_id:05d}.bin"
        self._shards.append({"shard_id": self._shard_id, "file_name": name})
        self._shard = open(os.path.join(self._tmp, name), "wb")
        self._shard_size = 0

    def add(self, input_ids: np.ndarray, loss_mask: np.ndarray, hidden: np.ndarray, last_hidden: np.ndarray) -> int:
        """Append one unpadded sample: ids [S], loss_mask [S], hidden [S, n_ctx*d], last [S, d]; returns its id."""
        s = int(np.shape(input_ids)[0])
        n_ctx_d = len(self.layer_ids) * self.hidden_size
        if np.shape(hidden) != (s, n_ctx_d) or np.shape(last_hidden) != (s, self.hidden_size) \
                or np.shape(loss_mask) != (s,):
            raise FeatureCacheError(f"sample {self._n}: shapes ids {np.shape(input_ids)}, loss_mask "
                                    f"{np.shape(loss_mask)}, hidden {np.shape(hidden)}, last {np.shape(last_hidden)} "
                                    f"do not match S={s}, n_ctx*d={n_ctx_d}, d={self.hidden_size}")
        parts = [np.asarray(input_ids, "<i4"), np.ones((s,), np.uint8), np.asarray(loss_mask).astype(np.uint8),
                 np.asarray(hidden).astype(_BF16), np.asarray(last_hidden).astype(_BF16)]
        nbytes = sum(p.nbytes for p in parts)
        if self._shard is None or (self._shard_size and self._shard_size + nbytes > self.max_shard_bytes):
            self._new_shard()
        offsets = []
        for p in parts:
            offsets.append(self._shard_size)
            self._shard.write(np.ascontiguousarray(p).tobytes())
            self._shard_size += p.nbytes
        self._index.write(INDEX_RECORD.pack(self._n, self._shard_id, s, *offsets))
        self._n += 1
        return self._n - 1

    def close(self) -> str:
        """Finish shards + index, write the manifest, move the cache into place; returns the directory."""
        if self._shard is not None:
            self._shard.close()
        self._index.close()
        manifest = dict(self.extras)
        manifest.update(version=CACHE_VERSION, num_samples=self._n, num_shards=len(self._shards),
                        target_layer_ids=self.layer_ids, hidden_dtype="bfloat16", token_dtype="int32",
                        mask_dtype="uint8", index_record_size=INDEX_RECORD.size, hidden_size=self.hidden_size,
                        shards=self._shards)
        with open(os.path.join(self._tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        if os.path.isdir(self.directory):
            shutil.rmtree(self.directory)
        os.rename(self._tmp, self.directory)
        return self.directory


# ------------------------------------------------------------------------------------- reading


class FeatureCache:
    """Read-only view of a version-2 cache (shards memory-mapped; one sample or padded batches)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = d = os.path.abspath(os.fspath(directory))
        path = os.path.join(d, MANIFEST)
        if not os.path.isfile(path):
            raise FeatureCacheError(f"no {MANIFEST} in feature cache {d!r} (write one with --write-feature-cache)")
        try:
            with open(path, encoding="utf-8") as f:
                self.manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise FeatureCacheError(f"{path}: unreadable manifest ({e})") from e
        m = self.manifest
        expect = {"version": CACHE_VERSION, "index_record_size": INDEX_RECORD.size, "hidden_dtype": "bfloat16",
                  "token_dtype": "int32", "mask_dtype": "uint8"}
        for key, value in expect.items():
            if m.get(key) != value:
                raise FeatureCacheError(f"{path}: {key}={m.get(key)!r}, expected {value!r}")
        self.num_samples = int(m["num_samples"])
        self.hidden_size = int(m["hidden_size"])
        self.target_layer_ids = tuple(int(i) for i in m["target_layer_ids"])
        idx_path = os.path.join(d, INDEX)
        size = os.path.getsize(idx_path) if os.path.isfile(idx_path) else -1
        if size != self.num_samples * INDEX_RECORD.size:
            raise FeatureCacheError(f"{idx_path}: {size} bytes, expected {self.num_samples} x 56-byte records")
        self.index = np.fromfile(idx_path, dtype=_INDEX_DTYPE)
        if not np.array_equal(self.index["sample_id"], np.arange(self.num_samples)):
            raise FeatureCacheError(f"{idx_path}: sample ids are not dense 0..{self.num_samples - 1}")
        self._shards = {}
        for sh in m["shards"]:
            fpath = os.path.join(d, sh["file_name"])
            if not os.path.isfile(fpath):
                raise FeatureCacheError(f"feature cache {d!r}: shard {sh['file_name']!r} is missing")
            self._shards[int(sh["shard_id"])] = np.memmap(fpath, dtype=np.uint8, mode="r")

    def __len__(self) -> int:
        return self.num_samples

    def validate(self, *, target_layer_ids: Sequence[int], hidden_size: int,
                 expected: Mapping[str, Any] | None = None) -> None:
        """FeatureCacheError unless layer ids, hidden size and every `expected` manifest field match."""
        want = {"target_layer_ids": [int(i) for i in target_layer_ids], "hidden_size": int(hidden_size)}
        want.update(expected or {})
        diffs = [f"{k}: cache {self.manifest.get(k)!r} vs run {v!r}" for k, v in want.items()
                 if self.manifest.get(k) != v]
        if diffs:
            raise FeatureCacheError(f"feature cache {self.directory!r} does not match this run ({'; '.join(diffs)}); "
                                    f"rebuild it with --write-feature-cache")

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Unpadded sample i: input_ids int32 [S], attention_mask / loss_mask uint8 [S],
        target_hidden_states bf16 [S, n_ctx*d], target_last_hidden_states bf16 [S, d]."""
        r = self.index[int(i)]
        buf, s = self._shards[int(r["shard_id"])], int(r["seq_len"])
        n_ctx_d = len(self.target_layer_ids) * self.hidden_size

        def view(off, dtype, shape):
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            return np.frombuffer(buf[int(off):int(off) + n].tobytes(), dtype=dtype).reshape(shape)

        return {"input_ids": view(r["ids"], "<i4", (s,)).astype(np.int32),
                "attention_mask": view(r["attn"], np.uint8, (s,)), "loss_mask": view(r["loss"], np.uint8, (s,)),
                "target_hidden_states": view(r["hidden"], _BF16, (s, n_ctx_d)),
                "target_last_hidden_states": view(r["last"], _BF16, (s, self.hidden_size))}

    def batch(self, indices: Sequence[int], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
        """Right-padded batch: input_ids [B, L] (pad_id), loss_mask [B, L] (0 on padding),
        ctx_feats [B, L, n_ctx*d] and last_hidden [B, L, d] bf16 (zeros on padding)."""
        n_ctx_d = len(self.target_layer_ids) * self.hidden_size
        b, L = len(indices), int(seq_len)
        out = {"input_ids": np.full((b, L), pad_id, np.int32), "loss_mask": np.zeros((b, L), np.float32),
               "ctx_feats": np.zeros((b, L, n_ctx_d), _BF16), "last_hidden": np.zeros((b, L, self.hidden_size), _BF16)}
        for row, i in enumerate(indices):
            smp = self.sample(i)
            s = min(smp["input_ids"].shape[0], L)
            out["input_ids"][row, :s] = smp["input_ids"][:s]
            out["loss_mask"][row, :s] = smp["loss_mask"][:s]
            out["ctx_feats"][row, :s] = smp["target_hidden_states"][:s]
            out["last_hidden"][row, :s] = smp["target_last_hidden_states"][:s]
        return out


def write_feature_cache(directory: str | os.PathLike, features: Callable[[np.ndarray], tuple[Any, Any]], *,
                        input_ids: np.ndarray, loss_mask: np.ndarray, lengths: np.ndarray, batch_size: int,
                        target_layer_ids: Sequence[int], hidden_size: int, extras: Mapping[str, Any] | None = None,
                        max_shard_bytes: int = 64 * 1024 ** 3,
                        progress: Callable[[int, int], None] | None = None) -> FeatureCache:
    """Run `features(ids [b, L]) -> (ctx [b, L, n_ctx*d], last [b, L, d])` over all rows and cache them.

    input_ids / loss_mask [N, L]; lengths [N] real (unpadded) lengths. The last partial batch is
    padded with row 0 (and the padding rows dropped), so `features` sees one shape only.
    """
    n = int(input_ids.shape[0])
    writer = FeatureCacheWriter(directory, target_layer_ids=target_layer_ids, hidden_size=hidden_size,
                                max_shard_bytes=max_shard_bytes, extras=extras)
    for start in range(0, n, batch_size):
        rows = np.arange(start, start + batch_size) % n
        ctx, last = jax.device_get(features(input_ids[rows]))
        for j in range(min(batch_size, n - start)):
            s = int(lengths[start + j])
            writer.add(input_ids[start + j, :s], loss_mask[start + j, :s], np.asarray(ctx[j, :s]),
                       np.asarray(last[j, :s]))
        if progress is not None:
            progress(min(start + batch_size, n), n)
    return FeatureCache(writer.close())
