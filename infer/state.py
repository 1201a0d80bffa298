"""Typed loop state and static loop descriptions shared by the autoregressive and speculative steps.

Learned from gemma's `SamplingState` + static `SamplerLoop` and levanter's `DecodeState`: all
per-row data lives in `flax.struct` pytrees (traced, donated, returned by each step) and every
shape-deciding choice in one frozen, hashable object (`SpecLoop` / `ARLoop`, passed as a static
argument). One compiled step then serves any mix of per-row settings.

    RowParams    per-row request settings: sampling values, PRNG key, stop ids, token limit,
                 confidence / survival thresholds
    OutputBuffer per-row committed tokens, counts, done flags
    Proposal     the drafts of the current round (speculative only)
    SpecState    everything the speculative round reads and writes
    ARState      everything the autoregressive step reads and writes

Randomness is per row: a row's keys for step s are `fold_in(key_r, s)` with key_r =
PRNGKey(seed_r), so with the same seed a row draws the same tokens whatever its batch neighbours.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.config import TargetConfig
from dspark_jax.draft.cache import DraftCache
from dspark_jax.draft.config import DraftConfig
from dspark_jax.sampling import SamplingConfig, SamplingMode, SamplingParams
from dspark_jax.target.kv_cache import KVCache
from infer.spec_metrics import RoundRecords, RoundStats

__all__ = ["RowParams", "OutputBuffer", "Pending", "Proposal", "SpecLoop", "SpecModels", "SpecState", "ARLoop", "ARState",
           "is_stop", "split_keys", "step_keys", "row_keys_from_seeds", "NONFINITE_PREFILL", "NONFINITE_TARGET",
           "NONFINITE_DRAFT", "describe_nonfinite", "all_finite"]

Array = jax.Array

# Bits of the per-row non-finite flag (state.nonfinite [B] int32).
NONFINITE_PREFILL = 1  # target logits at the end of the prompt
NONFINITE_TARGET = 2  # target logits of a decode / verify step
NONFINITE_DRAFT = 4  # draft logits of a proposal
_NONFINITE_NAMES = ((NONFINITE_PREFILL, "target logits after the prefill"),
                    (NONFINITE_TARGET, "target logits in a decode/verify step"),
                    (NONFINITE_DRAFT, "draft logits in a proposal"))


def describe_nonfinite(flags: np.ndarray) -> str | None:
    """Human-readable summary of per-row non-finite flags [B], or None when all rows are finite."""
    flags = np.asarray(flags)
    if not flags.any():
        return None
    parts = []
    for bit, name in _NONFINITE_NAMES:
        rows = np.flatnonzero(flags & bit).tolist()
        if rows:
            parts.append(f"{name} (rows {rows[:8]}{' ...' if len(rows) > 8 else ''})")
    return "non-finite values (NaN/Inf): " + "; ".join(parts)


def all_finite(x: Array) -> Array:
    """[B, ...] -> bool [B]: every value of the row is finite."""
    # Reduce over the trailing axes in place: a reshape would merge a vocabulary-sharded axis and
    # make the partitioner gather [B, ..., V] (docs/sharding.md).
    return jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))


def is_stop(tokens: Array, stop_ids: Array) -> Array:
    """tokens [B, ...] int32; stop_ids [n] shared or [B, n] per row (-1 = unused) -> bool [B, ...]."""
    if stop_ids.ndim == 2:
        stop_ids = stop_ids.reshape((stop_ids.shape[0],) + (1,) * (tokens.ndim - 1) + (stop_ids.shape[1],))
    return jnp.any(tokens[..., None] == stop_ids, axis=-1) & (tokens >= 0)


def split_keys(keys: Array, n: int) -> Array:
    """n independent keys from one key [2] -> [n, 2], or per row from keys [B, 2] -> [n, B, 2]."""
    if keys.ndim == 1:
        return jax.random.split(keys, n)
    return jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, n))(keys), 1, 0)


def step_keys(keys: Array, step: Array, n: int) -> Array:
    """Per-row keys of step `step`: fold_in(key_r, step) split n ways -> [n, B, 2]."""
    return split_keys(jax.vmap(lambda k: jax.random.fold_in(k, step))(keys), n)


def row_keys_from_seeds(seed: int | Sequence[int], batch: int) -> Array:
    """[B, 2] uint32 base keys: PRNGKey(seed_r) per row for a list of seeds (a row's draws then
    depend on its own seed only), or fold_in(PRNGKey(seed), r) for one int seed."""
    if isinstance(seed, (int, np.integer)):
        return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(int(seed)), i))(jnp.arange(batch))
    return jnp.stack([jax.random.PRNGKey(int(s)) for s in seed])


@flax.struct.dataclass
class RowParams:
    """Per-row request settings (all traced: changing values never recompiles).

    sampling: SamplingParams of [B] arrays; keys [B, 2] uint32 base PRNG key per row;
    stop_ids [B, n] int32 (-1 pads); max_new [B] int32 token limit (<= the loop's buffer);
    confidence_threshold [B] float32 (reference raw rule, 0 = off); survival_threshold [B] float32
    (cumulative rule on STS-calibrated confidences, 0 = off). The thresholds only matter to the
    speculative loop.
    """

    sampling: SamplingParams
    keys: Array
    stop_ids: Array
    max_new: Array
    confidence_threshold: Array
    survival_threshold: Array

    @classmethod
    def build(cls, sampling: Sequence[SamplingConfig], keys: Array, stop_ids: Sequence[Sequence[int]] | np.ndarray,
              max_new: Sequence[int] | int, confidence_threshold: Sequence[float] | float = 0.0,
              survival_threshold: Sequence[float] | float = 0.0) -> "RowParams":
        """Host-side constructor from per-row Python values (scalars broadcast); keys [B, 2]."""
        b = len(sampling)
        stops = np.asarray(stop_ids, np.int32)
        if stops.ndim == 1:
            stops = np.broadcast_to(stops, (b, stops.shape[0]))
        return cls(sampling=SamplingParams.from_configs(sampling), keys=jnp.asarray(keys, jnp.uint32),
                   stop_ids=jnp.asarray(stops), max_new=jnp.broadcast_to(jnp.asarray(max_new, jnp.int32), (b,)),
                   confidence_threshold=jnp.broadcast_to(jnp.asarray(confidence_threshold, jnp.float32), (b,)),
                   survival_threshold=jnp.broadcast_to(jnp.asarray(survival_threshold, jnp.float32), (b,)))


@flax.struct.dataclass
class OutputBuffer:
    """Committed tokens per row: tokens [B, N] (-1 = empty), count [B] int32, done [B] bool."""

    tokens: Array
    count: Array
    done: Array

    @classmethod
    def start(cls, first: Array, width: int, done: Array) -> "OutputBuffer":
        """A buffer of `width` slots per row holding the first token [B]."""
        b = first.shape[0]
        return cls(tokens=jnp.full((b, width), -1, jnp.int32).at[:, 0].set(first),
                   count=jnp.ones((b,), jnp.int32), done=done)

    def append(self, rows: Array, n_new: Array) -> "OutputBuffer":
        """Write the first n_new[b] entries of rows [B, W] at each row's count; counts advance."""
        w = rows.shape[1]
        rows = jnp.where(jnp.arange(w)[None, :] < n_new[:, None], rows, -1)

        def one(buf, r, s):
            cur = jax.lax.dynamic_slice(buf, (s,), (w,))
            return jax.lax.dynamic_update_slice(buf, jnp.where(r >= 0, r, cur), (s,))

        starts = jnp.minimum(self.count, self.tokens.shape[1] - w)
        return self.replace(tokens=jax.vmap(one)(self.tokens, rows, starts), count=self.count + n_new)


@flax.struct.dataclass
class Pending:
    """Target features not yet in the draft cache: features [B, C, n_ctx*d] at positions [B, C]
    (contiguous per row); only rows where valid [B, C] are committed. next_tokens [B, C] int32: the
    token at position + 1 of each row (the pair a chain drafter such as Eagle-3 caches with it);
    None where no chain drafter reads it (block drafters, the engine)."""

    features: Array
    positions: Array
    valid: Array
    next_tokens: Array | None = None


@flax.struct.dataclass
class Proposal:
    """K drafts per row with the distributions they were sampled from.

    tokens [B, K] int32; probs [B, K, V] float32 (warped, Markov-corrected; None when every row
    is greedy: verification compares token ids); conf_logits [B, K] float32 raw confidence
    logits (zeros without a confidence head); num [B] int32 drafts to verify.
    """

    tokens: Array
    probs: Array | None
    conf_logits: Array
    num: Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecLoop:
    """Everything static about a speculative loop (hashable; a jit static argument).

    target / draft: model configs; block_size: K drafts verified per round (<= the draft's
    trained block: the backbone always runs the full trained block, only the first K drafts are
    sampled and verified); mode: the batch's sampling class; max_new_tokens: output buffer size
    (per-row limits are `RowParams.max_new`); cache_len: KV cache capacity; share_lm_head: the
    draft's frozen LM head is the target's output layer; record_rounds: keep per-round
    calibration records; reference_length_rule: stop a row when start - prompt_len >=
    max_new (the reference: one more verify round when a round ends exactly at the limit;
    outputs are capped either way) instead of when max_new tokens are committed.
    """

    target: TargetConfig
    draft: DraftConfig
    block_size: int
    mode: SamplingMode
    max_new_tokens: int
    cache_len: int
    share_lm_head: bool = False
    record_rounds: bool = False
    reference_length_rule: bool = True
    backend: str = "xla"  # kernels of the sequential head and verification (dspark_jax.kernels): xla | pallas

    @property
    def buffer_width(self) -> int:
        """Output slots per row: max_new_tokens plus one round of overshoot."""
        return self.max_new_tokens + self.block_size + 1


@flax.struct.dataclass
class SpecModels:
    """Weights the speculative step reads: target params, draft params, the target's output
    kernel head [d, V] (laid out once), optional STS temperatures [K_trained] for the survival rule."""

    target: Any
    draft: Any
    head: Array
    sts_temperatures: Array | None = None


@flax.struct.dataclass
class SpecState:
    """The speculative loop's state between rounds (see `infer.speculative`).

    round [] int32 rounds run; anchor [B] last committed token (not yet in the target cache) at
    position start [B] == target cache length; prompt_len [B]; tcache / dcache; proposal: drafts
    to verify next; params: per-row settings; out: committed tokens; stats / records: metrics;
    nonfinite [B] int32 bitmask (NONFINITE_*): rows stop as soon as a flag is raised.
    """

    round: Array
    anchor: Array
    start: Array
    prompt_len: Array
    tcache: KVCache
    dcache: DraftCache
    proposal: Proposal
    params: RowParams
    out: OutputBuffer
    stats: RoundStats
    records: RoundRecords | None
    nonfinite: Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class ARLoop:
    """Everything static about an autoregressive loop: config, sampling class, buffer and cache size."""

    target: TargetConfig
    mode: SamplingMode
    max_new_tokens: int
    cache_len: int


@flax.struct.dataclass
class ARState:
    """The autoregressive loop's state: step [] int32 (tokens emitted so far by the longest row),
    cache, last [B] token to feed next, params, out, nonfinite [B] int32 bitmask."""

    step: Array
    cache: KVCache
    last: Array
    params: RowParams
    out: OutputBuffer
    nonfinite: Array
