"""Static-shape KV cache for batched inference with per-row lengths.

Keys/values of layer l live in `k[l]`, `v[l]`: [B, S, K, D] (post-norm, post-RoPE keys). A token
at absolute position p is stored at cache index p, so roll-back is free: lowering `lengths`
makes stale entries invisible (attention only admits keys at index <= the query's position) and
the next append overwrites them.

Buffers carry the logical axes (CACHE_BATCH, CACHE_SEQUENCE, CACHE_HEADS, CACHE_KV): under a mesh
(`jax.set_mesh`) the cache is batch-sharded over data and head-sharded over `model` when the KV
heads divide it, else replicated over `model` (never split along head_dim).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from dspark_jax.config import TargetConfig
from dspark_jax.layers import dtype_of
from dspark_jax.sharding import CACHE_BATCH, CACHE_HEADS, CACHE_KV, CACHE_SEQUENCE, constrain, target_rules_scope

__all__ = ["KVCache", "CACHE_AXES", "constrain_cache"]

CACHE_AXES = (CACHE_BATCH, CACHE_SEQUENCE, CACHE_HEADS, CACHE_KV)  # logical axes of a [B, S, K, D] buffer


def constrain_cache(buffer: jax.Array) -> jax.Array:
    """Shard one [B, S, K, D] buffer by `CACHE_AXES` (no-op without a mesh and rules context)."""
    return constrain(buffer, CACHE_AXES)


@flax.struct.dataclass
class KVCache:
    """Per-layer key/value buffers plus the number of committed tokens of each row."""

    k: tuple[jax.Array, ...]  # L x [B, S, K, D]
    v: tuple[jax.Array, ...]  # L x [B, S, K, D]
    lengths: jax.Array  # [B] int32, committed tokens per row

    @classmethod
    def create(cls, config: TargetConfig, batch_size: int, max_length: int, dtype: str | None = None) -> "KVCache":
        """An empty cache of `max_length` positions for `batch_size` rows."""
        dt = dtype_of(dtype or config.dtype)
        shapes = [(batch_size, max_length, kvh, hd) for kvh, hd in config.kv_cache_layer_shapes()]
        with target_rules_scope(config):
            k = tuple(constrain_cache(jnp.zeros(sh, dt)) for sh in shapes)
            v = tuple(constrain_cache(jnp.zeros(sh, dt)) for sh in shapes)
            lengths = constrain(jnp.zeros((batch_size,), jnp.int32), (CACHE_BATCH,))
        return cls(k=k, v=v, lengths=lengths)

    @property
    def max_length(self) -> int:
        """Number of positions each row can hold."""
        return self.k[0].shape[1]

    def with_lengths(self, lengths: jax.Array) -> "KVCache":
        """Same buffers, new committed lengths (used to commit appended rows or roll back)."""
        return self.replace(lengths=lengths.astype(jnp.int32))


def key_layout(cache: KVCache | None, positions: jax.Array, attention_mask: jax.Array | None):
    """(key positions [B, S], key validity [B, S] or None) for attention over the cache or the inputs."""
    if cache is None:
        return positions, attention_mask
    s = cache.max_length
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (positions.shape[0], s)), None


def write_rows(buffer: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Write `new` [B, T, K, D] into `buffer` [B, S, K, D] at row-specific offsets `starts` [B]."""

    def one(buf, x, s):
        return jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype), (s, 0, 0))

    return jax.vmap(one)(buffer, new, starts)
