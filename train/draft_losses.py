"""DSpark / DFlash draft-training math: anchors, blocks, losses and metrics (spec §4.2-§4.4, §4.6).

Shapes: B batch, S sequence length, N = num_anchors blocks per sample, K = block_size slots,
V vocabulary, d hidden. Slots are 0-indexed (code convention): slot k of the block anchored at
position p predicts the token at p + 1 + k. Everything numerical here is float32.

Pipeline of one training sample (all pure jnp, jit/shard friendly):

    anchors, keep = sample_anchors(rng, loss_mask, N)                 # §4.2 steps 1-2
    blocks = make_blocks(input_ids, loss_mask, anchors, keep, K, M)    # §4.2 steps 3, 5, 7, 2.4
    stats = chunked_map(chunk_fn, {...[B, N, ...]}, chunk)             # per-slot ce / l1 / bce / a
    loss, parts = reduce_losses(stats, blocks.eval_mask, weights, alphas)
    metrics = training_metrics(stats, blocks, loss_mask, keep, N, weights)

`chunk_fn` (built by the trainer, it needs the draft model) turns a chunk of anchors into
Markov-corrected draft logits Z and target logits T ([B, c, K, V]) and calls `slot_stats`; the
vocabulary-wide softmax / L1 therefore never materialises more than one chunk of anchors, and
`jax.checkpoint` makes the backward pass recompute it instead of storing it.

Normalisation [documented deviation, spec §4.4 OURS]: one *global token-weighted mean per
optimizer step*: each term is `Σ W·ℓ / (Σ W + 1e-6)` over the whole global batch, where
`W = eval_mask · exp(-k / gamma)` is shared by the three terms. The reference instead averages
per-micro-step global means over 64 accumulation steps; with a single big batch these coincide.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Blocks", "position_weights", "sample_anchors", "make_blocks", "slot_stats", "chunked_map",
           "reduce_losses", "training_metrics", "largest_divisor_at_most", "metric_names", "as_host_floats"]

Array = jax.Array
_F32 = jnp.float32
_EPS = 1e-6  # denominator guard of the reference (`num / (den + 1e-6)`)


class Blocks(NamedTuple):
    """Teacher-forced block tensors, all [B, N, K] (eval_mask float32, the rest int32)."""

    block_tokens: Array  # [x_p, M, ..., M]; dummies all M
    label_idx: Array  # p + 1 + k clamped to S - 1; 0 for dummies
    target_ids: Array  # input_ids[label_idx]
    prev_ids: Array  # [x_p, target_ids[..., :K-1]] (Markov / confidence previous token)
    teacher_idx: Array  # max(label_idx - 1, 0): position whose target last-hidden predicts the label
    eval_mask: Array  # keep & (p+1+k < S) & loss_mask[p+1+k], cumulative product along k


def position_weights(block_size: int, gamma: float | None) -> np.ndarray:
    """[K] float32 `exp(-k / gamma)` for 0-indexed k (code convention; gamma=4 -> 1, .7788, .6065, ...).

    gamma None or <= 0 disables the decay (all ones), as in the reference.
    """
    k = np.arange(int(block_size), dtype=np.float32)
    if gamma is None or gamma <= 0:
        return np.ones_like(k)
    return np.exp(-k / np.float32(gamma)).astype(np.float32)


def sample_anchors(rng: Array, loss_mask: Array, num_anchors: int) -> tuple[Array, Array]:
    """Uniform anchor sampling without replacement (spec §4.2 steps 1-2).

    loss_mask [B, S] (bool/0-1). Candidates: p in [0, S-2] with loss_mask[p] = loss_mask[p+1] = 1.
    Every candidate gets an i.i.d. U(0, 1) key (others 2), the `min(#candidates, N)` smallest keys
    are taken and their positions sorted ascending. Returns (anchors [B, N] int32, keep [B, N] bool):
    kept anchors first (ascending), then dummies with keep=False and anchor 0.
    """
    lm = loss_mask.astype(bool)
    b, s = lm.shape
    n = int(num_anchors)
    cand = jnp.zeros((b, s), bool).at[:, :-1].set(lm[:, :-1] & lm[:, 1:])  # [B, S]
    keys = jnp.where(cand, jax.random.uniform(rng, (b, s), _F32), 2.0)
    if n > s:  # more slots than positions: pad with never-chosen keys
        keys = jnp.concatenate([keys, jnp.full((b, n - s), 2.0, _F32)], axis=1)
    order = jnp.argsort(keys, axis=1)[:, :n]  # [B, N] positions of the n smallest keys
    chosen = jnp.take_along_axis(keys, order, axis=1) < 2.0
    pos = jnp.sort(jnp.where(chosen, order, np.iinfo(np.int32).max), axis=1)  # kept ascending, dummies last
    keep = pos < s
    return jnp.where(keep, pos, 0).astype(jnp.int32), keep


def make_blocks(input_ids: Array, loss_mask: Array, anchors: Array, keep: Array, block_size: int,
                mask_token_id: int) -> Blocks:
    """Block inputs, labels, teacher positions and the cumulative-product eval_mask (spec §4.2, §2.4).

    input_ids, loss_mask [B, S]; anchors [B, N] int; keep [B, N] bool -> `Blocks` of [B, N, K].
    """
    b, s = input_ids.shape
    k = int(block_size)
    keep = keep.astype(bool)
    offs = jnp.arange(k, dtype=jnp.int32)
    raw = anchors[:, :, None].astype(jnp.int32) + 1 + offs  # [B, N, K] p + 1 + k
    label_idx = jnp.where(keep[:, :, None], jnp.minimum(raw, s - 1), 0)
    gather = jax.vmap(lambda row, idx: row[idx])  # [S], [N, K] -> [N, K]
    target_ids = gather(input_ids, label_idx)
    anchor_tok = jnp.take_along_axis(input_ids, anchors.astype(jnp.int32), axis=1)  # [B, N]
    mask_fill = jnp.full((b, anchors.shape[1], k - 1), mask_token_id, input_ids.dtype)
    block_tokens = jnp.concatenate([anchor_tok[:, :, None], mask_fill], axis=-1)
    block_tokens = jnp.where(keep[:, :, None], block_tokens, jnp.asarray(mask_token_id, input_ids.dtype))
    prev_ids = jnp.concatenate([anchor_tok[:, :, None], target_ids[:, :, :-1]], axis=-1)
    valid = keep[:, :, None] & (raw < s) & gather(loss_mask.astype(bool), label_idx)
    eval_mask = jnp.cumprod(valid.astype(jnp.int32), axis=-1).astype(_F32)
    return Blocks(block_tokens=block_tokens.astype(jnp.int32), label_idx=label_idx, target_ids=target_ids,
                  prev_ids=prev_ids.astype(jnp.int32), teacher_idx=jnp.maximum(label_idx - 1, 0),
                  eval_mask=eval_mask)


def slot_stats(z: Array, target_ids: Array, t: Array | None = None, conf_logits: Array | None = None
               ) -> dict[str, Array]:
    """Per-slot losses from Markov-corrected draft logits at temperature 1 (spec §4.3), float32.

    z [..., V] draft logits; target_ids [...] int; t [..., V] target logits (None: no L1 / accept);
    conf_logits [...] (None: no confidence head). Returns [...] arrays:
      ce   = -log softmax(z)[target]
      l1   = ||softmax(z) - softmax(t)||_1          (full L1, no 1/2)
      a    = stop_gradient(clamp(1 - l1 / 2, 0, 1))  (acceptance estimate = confidence target)
      bce  = BCEWithLogits(conf_logits, a)
    """
    z = z.astype(_F32)
    logp = jax.nn.log_softmax(z, axis=-1)
    out = {"ce": -jnp.take_along_axis(logp, target_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]}
    if t is not None:
        p_t = jax.nn.softmax(t.astype(_F32), axis=-1)
        l1 = jnp.sum(jnp.abs(jnp.exp(logp) - p_t), axis=-1)
        out["l1"] = l1
        out["a"] = jax.lax.stop_gradient(jnp.clip(1.0 - 0.5 * l1, 0.0, 1.0))
        if conf_logits is not None:
            x = conf_logits.astype(_F32)
            out["bce"] = jnp.maximum(x, 0.0) - x * out["a"] + jnp.log1p(jnp.exp(-jnp.abs(x)))
            out["conf"] = jax.lax.stop_gradient(x)
    return out


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of n that is <= max(cap, 1) (the anchor chunk actually used)."""
    n, cap = int(n), max(int(cap), 1)
    return max(c for c in range(1, min(n, cap) + 1) if n % c == 0)


def chunked_map(fn: Callable[[Mapping[str, Array]], Mapping[str, Array]], xs: Mapping[str, Array],
                chunk: int) -> dict[str, Array]:
    """Apply `fn` to chunks of the anchor axis, rematerialised in the backward pass.

    xs: dict of [B, N, ...] arrays; `fn` maps a dict of [B, c, ...] to a dict of [B, c, ...]
    (c = largest divisor of N <= `chunk`). Runs `lax.map(jax.checkpoint(fn))` over the N / c chunks
    (a single call when c = N), so peak memory holds one chunk's [B, c, K, V] logits.
    """
    n = next(iter(xs.values())).shape[1]
    c = largest_divisor_at_most(n, chunk)
    if c == n:
        return dict(fn(xs))

    def split(x):  # [B, N, ...] -> [N/c, B, c, ...] (batch stays the sharded leading dim of a chunk)
        return jnp.moveaxis(x.reshape(x.shape[0], n // c, c, *x.shape[2:]), 1, 0)

    def merge(y):  # [N/c, B, c, ...] -> [B, N, ...]
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape(y.shape[0], n, *y.shape[3:])

    ys = jax.lax.map(jax.checkpoint(lambda x: dict(fn(x))), {k: split(v) for k, v in xs.items()})
    return {k: merge(v) for k, v in ys.items()}


def reduce_losses(stats: Mapping[str, Array], eval_mask: Array, weights: Array,
                  alphas: tuple[float, float, float]) -> tuple[Array, dict[str, Array]]:
    """Weighted, normalised total loss (spec §4.3-§4.4).

    stats: from `slot_stats`, [B, N, K]; eval_mask [B, N, K]; weights [K] (`position_weights`);
    alphas = (ce, l1, conf). Each term = Σ W·ℓ / (Σ W + 1e-6) with W = eval_mask · weights; terms
    with alpha 0 (or absent stats) are left out of the loss but `ce_loss` is always reported.
    Returns (loss, {ce_loss, l1_loss, confidence_loss (when available), weight_sum}).
    """
    w = eval_mask.astype(_F32) * jnp.asarray(weights, _F32)
    den = jnp.sum(w) + _EPS
    parts = {"weight_sum": jnp.sum(w)}
    loss = jnp.zeros((), _F32)
    for name, key, alpha in (("ce_loss", "ce", alphas[0]), ("l1_loss", "l1", alphas[1]),
                             ("confidence_loss", "bce", alphas[2])):
        if key not in stats:
            continue
        term = jnp.sum(w * jnp.where(w > 0, stats[key], 0.0)) / den  # where: 0 * inf never poisons
        parts[name] = term
        if alpha:
            loss = loss + float(alpha) * term
    return loss, parts


def _safe_div(a: Array, b: Array) -> Array:
    return jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)


def training_metrics(stats: Mapping[str, Array], blocks: Blocks, loss_mask: Array, keep: Array,
                     num_anchors: int, weights: Array) -> dict[str, Array]:
    """Parity-dashboard metrics (spec §4.6) over the whole (global) batch; float32 scalars.

    Normalised exactly as the reference trainer (DeepSpec `dspark/loss.py` and
    `dspark/common.py::log_sampler_stats`; see docs/training_metrics.md). With m = eval_mask [B, N, K],
    W = m · weights (the loss weights, `position_weights`) and a = clamp(1 - L1/2) (needs target logits):
      accept_rate@k (k 0-indexed slot) = Σ a·m / Σ m at slot k;
      tau_probabilistic = mean over kept blocks of 1 + Σ_k Π_{j<=k} a_j m_j;
      confidence_abs_error / confidence_bias = Σ W·|σ(c) - a| / Σ W  and  Σ W·(σ(c) - a) / Σ W;
      confidence_cumprod_bias = Σ W·(Π_{j<=k} σ(c_j) m_j - Π_{j<=k} a_j m_j) / Σ W.
    Anchor statistics: means over the B samples of per-sample values (a sample with no kept block
    counts as 0):
      valid_anchors_abs / _ratio     = candidates / candidates ÷ S;
      sampled_anchors_abs / _ratio   = kept blocks / kept blocks ÷ num_anchors;
      block_supervised_tokens_abs / _ratio = supervised slots ÷ max(kept blocks, 1) / the same ÷ K.
    """
    m = blocks.eval_mask.astype(_F32)  # [B, N, K]
    b, s = loss_mask.shape
    k = m.shape[-1]
    lm = loss_mask.astype(bool)
    cand = jnp.sum((lm[:, :-1] & lm[:, 1:]).astype(_F32), axis=1)  # [B] anchor candidates per sample
    kept = jnp.sum(keep.astype(_F32), axis=1)  # [B] kept blocks per sample
    sup_per_block = jnp.sum(m, axis=(1, 2)) / jnp.maximum(kept, 1.0)  # [B] supervised slots per kept block
    out = {
        "valid_anchors_abs": jnp.mean(cand), "valid_anchors_ratio": jnp.mean(cand) / max(s, 1),
        "sampled_anchors_abs": jnp.mean(kept), "sampled_anchors_ratio": jnp.mean(kept) / max(num_anchors, 1),
        "block_supervised_tokens_abs": jnp.mean(sup_per_block),
        "block_supervised_tokens_ratio": jnp.mean(sup_per_block) / k,
    }
    if "a" in stats:
        a = stats["a"] * m
        per_slot = _safe_div(jnp.sum(a, axis=(0, 1)), jnp.sum(m, axis=(0, 1)))  # [K]
        out.update({f"accept_rate@{i}": per_slot[i] for i in range(k)})
        kept_blocks = m[..., 0]
        tau = 1.0 + jnp.sum(jnp.cumprod(a, axis=-1), axis=-1)  # [B, N]
        out["tau_probabilistic"] = _safe_div(jnp.sum(tau * kept_blocks), jnp.sum(kept_blocks))
        if "conf" in stats:
            w = m * jnp.asarray(weights, _F32)  # [B, N, K] the loss weights W
            w_sum = jnp.sum(w)
            sig = jax.nn.sigmoid(stats["conf"])
            out["confidence_abs_error"] = _safe_div(jnp.sum(w * jnp.abs(sig - stats["a"])), w_sum)
            out["confidence_bias"] = _safe_div(jnp.sum(w * (sig - stats["a"])), w_sum)
            cum = jnp.cumprod(sig * m, axis=-1) - jnp.cumprod(a, axis=-1)  # [B, N, K] prefix products
            out["confidence_cumprod_bias"] = _safe_div(jnp.sum(w * cum), w_sum)
    return out


def metric_names(block_size: int, *, has_target: bool, has_confidence: bool) -> list[str]:
    """Names `training_metrics` returns for this configuration (for table headers / docs)."""
    names = ["valid_anchors_abs", "valid_anchors_ratio", "sampled_anchors_abs", "sampled_anchors_ratio",
             "block_supervised_tokens_abs", "block_supervised_tokens_ratio"]
    if has_target:
        names += [f"accept_rate@{i}" for i in range(block_size)] + ["tau_probabilistic"]
        if has_confidence:
            names += ["confidence_abs_error", "confidence_bias", "confidence_cumprod_bias"]
    return names


def as_host_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device scalars -> Python floats (one transfer)."""
    return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
