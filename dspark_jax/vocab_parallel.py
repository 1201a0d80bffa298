"""Sampling and rejection-sampling pieces over vocabulary-sharded logits, without gathering [*, V].

Under a mesh (`jax.set_mesh`) whose `model` axis divides the vocabulary, the target's logits
[..., V] come out of the output layer sharded over `model` along V. Every function here then runs
as a `shard_map` over that layout: each device works on its [..., V/m] slice and only per-row
scalars (or, for top-k, m x bound candidates per row) cross devices:

  * `argmax`, `max_logit`, `logsumexp`: local reduction + `pmax` / `psum`;
  * `warp_probs` (temperature, top-k, top-p; same semantics and ties as `dspark_jax.sampling`):
    top-k takes the global k-th value from the union of per-shard top-`bound` candidates (exact:
    the global top-bound values are among them); top-p under top-k cuts inside that candidate
    list; top-p alone finds the global threshold by a 32-step bisection over the float32 order
    (the smallest logit value whose strictly-larger mass is < p — exactly the `sampling` rule),
    each step one `psum` of [rows] partial masses;
  * `inverse_cdf`: given one uniform per row (drawn by the caller at the global shape, so a row's
    draw does not depend on the layout), each shard counts its CDF entries <= u after adding the mass of
    the shards before it (an all-gather of [m, rows] shard totals), counts are `psum`-ed;
  * `token_probs` (p[x] for the rejection test) and `residual` (norm(max(p_t - p_d, 0))).
Without such a mesh the same calls run the single-device code (collectives become identities),
so callers need one code path. Sampling parameters are per row: `temperature`, `top_k`, `top_p`
of shape [rows] (or broadcastable to logits.shape[:-1] from the left); temperature 0 makes a row
greedy (one-hot argmax), top_k 0 and top_p 1 disable those filters. Static: `top_k_bound`
(>= every k; 0 = top-k off for the batch) and `use_top_p`.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dspark_jax.sharding import current_mesh, logical_to_spec

__all__ = ["VOCAB_AXIS", "vocab_sharded", "argmax", "max_logit", "logsumexp", "warp_probs", "inverse_cdf", "token_probs",
           "residual"]

Array = jax.Array
VOCAB_AXIS = "model"
_BISECT_STEPS = 32


def vocab_sharded(vocab: int) -> int:
    """Number of vocabulary shards these functions use under the current mesh (1 = unsharded)."""
    mesh = current_mesh()
    if mesh is None or VOCAB_AXIS not in mesh.shape:
        return 1
    m = int(mesh.shape[VOCAB_AXIS])
    return m if m > 1 and vocab % m == 0 else 1


class _Axis:
    """The collectives of one code path: over the vocab mesh axis inside shard_map, or identities."""

    def __init__(self, name: str | None, vocab_local: int):
        self.name = name
        self.local = vocab_local

    def offset(self) -> Array:
        return jnp.int32(0) if self.name is None else jax.lax.axis_index(self.name).astype(jnp.int32) * self.local

    def psum(self, x):
        return x if self.name is None else jax.lax.psum(x, self.name)

    def pmax(self, x):
        return x if self.name is None else jax.lax.pmax(x, self.name)

    def pmin(self, x):
        return x if self.name is None else jax.lax.pmin(x, self.name)

    def gather(self, x):  # [...] -> [m, ...]
        return x[None] if self.name is None else jax.lax.all_gather(x, self.name)

    def index(self) -> Array:
        return jnp.int32(0) if self.name is None else jax.lax.axis_index(self.name).astype(jnp.int32)


def _run(local_fn: Callable, vocab_args: tuple, row_args: tuple, out_vocab: bool, vocab: int):
    """Run `local_fn(axis, *vocab_args, *row_args)` on vocab shards (shard_map) or directly.

    vocab_args: arrays [..., V] (sharded on V); row_args: arrays of the leading shape [...].
    The output has the leading shape (plus V when `out_vocab`).
    """
    m = vocab_sharded(vocab)
    if m == 1:
        return local_fn(_Axis(None, vocab), *vocab_args, *row_args)
    mesh = current_mesh()
    lead = vocab_args[0].shape[:-1]
    batch = logical_to_spec(("batch",) + (None,) * (len(lead) - 1), lead, mesh) if lead else P()
    row_spec = P(*batch)
    vocab_spec = P(*batch, VOCAB_AXIS)
    fn = jax.shard_map(functools.partial(local_fn, _Axis(VOCAB_AXIS, vocab // m)), mesh=mesh,
                       in_specs=(vocab_spec,) * len(vocab_args) + (row_spec,) * len(row_args),
                       out_specs=vocab_spec if out_vocab else row_spec)
    return fn(*vocab_args, *row_args)


def _rows(x, lead: tuple[int, ...], dtype) -> Array:
    """Per-row parameter [rows] (or scalar) broadcast from the left to the leading shape `lead`."""
    x = jnp.asarray(x, dtype)
    return jnp.broadcast_to(x.reshape(x.shape + (1,) * (len(lead) - x.ndim)), lead)


# ---------------------------------------------------------------- reductions


def _argmax_local(ax: _Axis, z: Array) -> Array:
    vocab = ax.local * (1 if ax.name is None else jax.lax.psum(1, ax.name))
    top = ax.pmax(jnp.max(z, axis=-1, keepdims=True))
    iota = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1) + ax.offset()
    first = ax.pmin(jnp.min(jnp.where(z == top, iota, vocab), axis=-1))
    return jnp.minimum(first, vocab - 1).astype(jnp.int32)


def argmax(logits: Array) -> Array:
    """First index of the maximum over the last axis, int32 [...] (== `sampling.greedy_argmax`)."""
    return _run(_argmax_local, (logits,), (), False, logits.shape[-1])


def max_logit(logits: Array) -> Array:
    """Maximum over the (sharded) last axis, [...]."""
    return _run(lambda ax, z: ax.pmax(jnp.max(z, axis=-1)), (logits,), (), False, logits.shape[-1])


def _logsumexp_local(ax: _Axis, z: Array) -> Array:
    z = z.astype(jnp.float32)
    m = ax.pmax(jnp.max(z, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return (jnp.log(ax.psum(jnp.sum(jnp.exp(z - m), axis=-1, keepdims=True))) + m)[..., 0]


def logsumexp(logits: Array) -> Array:
    """log(sum(exp(logits))) over the (sharded) last axis, float32 [...]."""
    return _run(_logsumexp_local, (logits,), (), False, logits.shape[-1])


# ---------------------------------------------------------------- warping


def _float_key(x: Array) -> Array:
    """Monotone map float32 -> int32 (x < y  <=>  key(x) < key(y) for non-NaN x, y)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _key_float(k: Array) -> Array:
    """Inverse of `_float_key`."""
    return jax.lax.bitcast_convert_type(k ^ ((k >> 31) & 0x7FFFFFFF), jnp.float32)


def _top_p_threshold(ax: _Axis, z: Array, top_p: Array) -> Array:
    """Smallest value v among z [N, Vl] (all shards) whose strictly-larger softmax mass is < top_p [N].

    That is the value at the last sorted position whose mass-before is < p — `sampling`'s cut.
    Bisection over the float32 order between the global min and max finite values; each step
    reduces one partial mass per row across shards.
    """
    finite = jnp.isfinite(z)
    m = ax.pmax(jnp.max(jnp.where(finite, z, -jnp.inf), axis=-1, keepdims=True))  # [N, 1]
    e = jnp.where(finite, jnp.exp(z - m), 0.0)
    total = ax.psum(jnp.sum(e, axis=-1))  # [N]
    lo = _float_key(ax.pmin(jnp.min(jnp.where(finite, z, jnp.inf), axis=-1)))
    hi = _float_key(m[:, 0])  # F(max) = 0 < p always

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        above = ax.psum(jnp.sum(jnp.where(z > _key_float(mid)[:, None], e, 0.0), axis=-1))
        ok = above < top_p * total
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo, hi = jax.lax.fori_loop(0, _BISECT_STEPS, step, (lo, hi))
    return _key_float(hi)


def _warp_local(ax: _Axis, logits: Array, temperature: Array, top_k: Array, top_p: Array, *,
                top_k_bound: int, use_top_p: bool, all_greedy: bool) -> Array:
    lead, vl = logits.shape[:-1], logits.shape[-1]
    z = logits.astype(jnp.float32).reshape(-1, vl)  # [N, Vl]
    temperature, top_k, top_p = (x.reshape(-1) for x in (temperature, top_k, top_p))
    best = _argmax_local(ax, z)  # [N]
    iota = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) + ax.offset()
    one_hot = (iota == best[:, None]).astype(jnp.float32)
    if all_greedy:
        return one_hot.reshape(logits.shape)
    greedy = temperature <= 0.0
    z = z / jnp.where(greedy, 1.0, temperature)[:, None]
    if top_k_bound > 0:
        bound = top_k_bound
        local_top = jax.lax.top_k(z, min(bound, vl))[0]  # [N, <=bound] per-shard candidates
        cands = jnp.moveaxis(ax.gather(local_top), 0, 1).reshape(z.shape[0], -1)  # [N, m*<=bound]
        bound = min(bound, cands.shape[-1])
        top = jax.lax.top_k(cands, bound)[0]  # [N, bound] the global top-bound values, descending
        on = top_k > 0
        k = jnp.clip(top_k, 1, bound)
        kth = jnp.take_along_axis(top, (k - 1)[:, None], axis=-1)  # [N, 1]
        kth = jnp.where(on[:, None], kth, -jnp.inf)
        z = jnp.where(z >= kth, z, -jnp.inf)
        if use_top_p:  # cut inside top[:k] (sampling's rule): rows with top-k on
            mx = top[:, :1]
            total = ax.psum(jnp.sum(jnp.exp(z - mx), axis=-1, keepdims=True))
            in_k = jnp.arange(bound)[None, :] < k[:, None]
            p_sorted = jnp.where(in_k, jnp.exp(top - mx), 0.0) / total
            mass_before = jnp.cumsum(p_sorted, axis=-1) - p_sorted
            n_keep = jnp.maximum(jnp.sum((mass_before < top_p[:, None]) & in_k, axis=-1, keepdims=True), 1)
            cut_k = jnp.take_along_axis(top, n_keep - 1, axis=-1)
            cut = jnp.where(on[:, None], cut_k, _top_p_threshold(ax, z, top_p)[:, None])
            z = jnp.where((z >= cut) | (top_p[:, None] >= 1.0), z, -jnp.inf)
    elif use_top_p:
        cut = _top_p_threshold(ax, z, top_p)[:, None]
        z = jnp.where((z >= cut) | (top_p[:, None] >= 1.0), z, -jnp.inf)
    mx = ax.pmax(jnp.max(z, axis=-1, keepdims=True))
    e = jnp.exp(z - mx)
    probs = e / ax.psum(jnp.sum(e, axis=-1, keepdims=True))
    return jnp.where(greedy[:, None], one_hot, probs).reshape(logits.shape)


def warp_probs(logits: Array, temperature, top_k=0, top_p=1.0, *, top_k_bound: int = 0, use_top_p: bool = False,
               all_greedy: bool = False) -> Array:
    """Warped float32 distribution [..., V] (sharded like `logits`), per-row parameters.

    Same rule as `dspark_jax.sampling.warp_probs` (temperature, then top-k keeping ties at the
    k-th value, then top-p keeping the smallest prefix with mass >= p and ties at its last value).
    temperature / top_k / top_p: [rows] or scalars (see the module docstring); `top_k_bound`
    (static) bounds every k; `all_greedy` (static) skips everything but the one-hot argmax.
    """
    lead = logits.shape[:-1]
    rows = (_rows(temperature, lead, jnp.float32), _rows(top_k, lead, jnp.int32), _rows(top_p, lead, jnp.float32))
    local = functools.partial(_warp_local, top_k_bound=int(top_k_bound), use_top_p=bool(use_top_p),
                              all_greedy=bool(all_greedy))
    return _run(local, (logits,), rows, True, logits.shape[-1])


# ---------------------------------------------------------------- sampling and rejection pieces


def _sample_local(ax: _Axis, probs: Array, u: Array) -> Array:
    p = probs.astype(jnp.float32)
    local_total = jnp.sum(p, axis=-1)  # [...]
    totals = ax.gather(local_total)  # [m, ...]
    before = jnp.sum(jnp.where(jnp.arange(totals.shape[0]).reshape((-1,) + (1,) * local_total.ndim) < ax.index(),
                               totals, 0.0), axis=0)
    target = u * jnp.sum(totals, axis=0)  # u * total mass
    cdf = jnp.cumsum(p, axis=-1) + before[..., None]
    idx = ax.psum(jnp.sum(cdf <= target[..., None], axis=-1))
    iota = jax.lax.broadcasted_iota(jnp.int32, p.shape, p.ndim - 1) + ax.offset()
    last_positive = ax.pmax(jnp.max(jnp.where(p > 0, iota, -1), axis=-1))
    return jnp.minimum(idx, last_positive).astype(jnp.int32)


def inverse_cdf(probs: Array, u: Array) -> Array:
    """One token per row from probs [..., V] for uniforms u [...] in [0, 1); int32 [...].

    The draw of `dspark_jax.sampling.sample_from_probs` for the same uniforms (drawn there at the
    global shape, so a row's draw does not depend on the layout), up to the float32 summation
    order of the CDF.
    """
    return _run(_sample_local, (probs,), (u.astype(jnp.float32),), False, probs.shape[-1])


def _token_probs_local(ax: _Axis, probs: Array, tokens: Array) -> Array:
    local = tokens - ax.offset()
    inside = (local >= 0) & (local < probs.shape[-1])
    got = jnp.take_along_axis(probs, jnp.clip(local, 0, probs.shape[-1] - 1)[..., None], axis=-1)[..., 0]
    return ax.psum(jnp.where(inside, got, 0.0))


def token_probs(probs: Array, tokens: Array) -> Array:
    """probs[..., tokens] for tokens [...] int32 (p_t[x] / p_d[x] of the rejection test)."""
    return _run(_token_probs_local, (probs,), (tokens.astype(jnp.int32),), False, probs.shape[-1])


def _residual_local(ax: _Axis, p_target: Array, p_draft: Array) -> Array:
    r = jnp.maximum(p_target - p_draft, 0.0)
    mass = ax.psum(jnp.sum(r, axis=-1, keepdims=True))
    return jnp.where(mass > 1e-8, r / jnp.where(mass > 1e-8, mass, 1.0), p_target)


def residual(p_target: Array, p_draft: Array) -> Array:
    """norm(max(p_t - p_d, 0)) over the (sharded) last axis; p_t where that mass is <= 1e-8."""
    return _run(_residual_local, (p_target, p_draft), (), True, p_target.shape[-1])
