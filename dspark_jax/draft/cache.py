"""Static-shape draft KV cache (spec §5.3, §12.12).

Per draft layer, keys/values of the committed *context* rows only (post-`k_norm`, post-RoPE keys;
values as projected), shape [B, S, KVH, hd], plus the number of committed rows per batch row.
Context rows of a batch row are stored contiguously at indices 0..lengths[b]-1 in the order they
were committed (their RoPE positions are applied before writing, so the index need not equal the
position). Block tokens are never cached, so no crop is needed after a round; to roll back, lower
`lengths` (`with_lengths`). Rows that would land at index >= S are dropped: size S for the longest
sequence (prompt + max new tokens).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from dspark_jax.draft.config import DraftConfig
from dspark_jax.layers import dtype_of

__all__ = ["DraftCache", "commit_indices"]


@flax.struct.dataclass
class DraftCache:
    """Per-layer context K/V buffers plus committed context rows per batch row."""

    k: tuple[jax.Array, ...]  # L x [B, S, KVH, hd]
    v: tuple[jax.Array, ...]  # L x [B, S, KVH, hd]
    lengths: jax.Array  # [B] int32

    @classmethod
    def create(cls, config: DraftConfig, batch_size: int, max_length: int, dtype: str | None = None) -> "DraftCache":
        """An empty cache holding up to `max_length` context rows per batch row."""
        dt = dtype_of(dtype or config.dtype)
        shape = (batch_size, max_length, config.num_key_value_heads, config.head_dim)
        return cls(k=tuple(jnp.zeros(shape, dt) for _ in range(config.num_hidden_layers)),
                   v=tuple(jnp.zeros(shape, dt) for _ in range(config.num_hidden_layers)),
                   lengths=jnp.zeros((batch_size,), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def with_lengths(self, lengths: jax.Array) -> "DraftCache":
        """Same buffers, new committed lengths (roll back / reset rows)."""
        return self.replace(lengths=jnp.asarray(lengths, jnp.int32))


def commit_indices(lengths: jax.Array, valid: jax.Array, max_length: int) -> tuple[jax.Array, jax.Array]:
    """Where each new row goes: (write_idx [B, C] int32, new_lengths [B] int32).

    Valid rows are packed after the committed ones in order (`lengths + #valid rows before it`);
    invalid rows — and rows past `max_length` — get index `max_length`, which a scatter with
    mode='drop' ignores. `new_lengths` is capped at `max_length`.
    """
    valid = valid.astype(bool)
    rank = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
    idx = lengths[:, None].astype(jnp.int32) + rank
    idx = jnp.where(valid & (idx < max_length), idx, max_length)
    new_lengths = jnp.minimum(lengths + jnp.sum(valid, axis=1, dtype=jnp.int32), max_length)
    return idx.astype(jnp.int32), new_lengths.astype(jnp.int32)
