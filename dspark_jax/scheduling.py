"""Hardware-aware prefix scheduling of speculative drafts (DSpark spec §7.2–§7.4).

Every function here is jittable: sort-based, no Python loop over data. Shapes: R request rows,
γ draft slots per request, ``sps [B_max + 1]`` target steps per second indexed by the verify batch
size B in tokens (``sps[B]`` for B > B_max counts as 0, which forces a stop there).

Candidates are the pairs (r, j) with calibrated prefix survival ``a[r, j] > 0``; they are ranked by
``a`` descending, ties broken by slot j ascending, then request r ascending, so a request's slots
always appear in prefix order (``a`` is non-increasing along j). Admitting the top m candidates
verifies ``B(m) = R + m`` tokens and commits ``τ(m) = R + Σ_{i≤m} a_(i)`` tokens in expectation;
the objective is ``Θ(m) = τ(m) · SPS(B(m))``.

* ``prefix_schedule(..., early_stop=True)`` is Algorithm 1: walk the ranking, stop at the first
  candidate that does not strictly improve Θ. Lossless: admitting slot j of request r consults only
  candidates ranked at or above it (non-anticipation, spec §7.2 / Appendix A).
* ``prefix_schedule(..., early_stop=False)`` is the unconstrained global search ``argmax_m Θ(m)``
  (smallest m on ties). It is optimal over every prefix-consistent length vector for ANY SPS, but
  not lossless on current-step data (Appendix A); the async variant uses it on stale data only.
* ``fill_to_bucket`` admits the next-ranked candidates into the padding of the compiled token bucket
  a schedule already pays for (verify cost follows the padded bucket, so they are verified for
  free). Still non-anticipating: a candidate ranked i is admitted iff i <= bucket(R + m) − R, where m
  depends only on the candidates ranked at or above m + 1 <= i.
* ``global_capacity`` + ``top_k_schedule`` (and ``async_schedule`` combining them) are the
  asynchronous top-K variant of §7.4: the number of drafts to verify at step t comes from the
  t − 2 survivals by the global search, and the current survivals choose which drafts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["survival_from_confidence", "prefix_schedule", "global_capacity", "top_k_schedule", "async_schedule",
           "schedule_objective", "fill_to_bucket"]

Array = jax.Array


def survival_from_confidence(conf_logits: Array, temperatures: Array | None = None) -> Array:
    """Calibrated prefix survival ``a[r, j] = Π_{i≤j} σ(z[r, i] / T_i)`` in float32.

    conf_logits [R, γ] raw confidence-head logits; temperatures [≥γ] per-slot STS temperatures
    (``dspark_jax.calibration.load_temperatures`` of the drafter's calibration file) or None (raw).
    Returns [R, γ], non-increasing along γ.
    """
    z = conf_logits.astype(jnp.float32)
    if temperatures is not None:
        z = z / jnp.asarray(temperatures, jnp.float32)[None, : z.shape[1]]
    return jnp.cumprod(jax.nn.sigmoid(z), axis=1)


def _sps_at(sps: Array, batch_tokens: Array) -> Array:
    """SPS(B) with B beyond the table (or negative) = 0. batch_tokens int [...] -> float32 [...]."""
    b_max = sps.shape[0] - 1
    inside = (batch_tokens >= 0) & (batch_tokens <= b_max)
    return jnp.where(inside, sps.astype(jnp.float32)[jnp.clip(batch_tokens, 0, b_max)], 0.0)


def _ranking(survival: Array, active: Array | None) -> tuple[Array, Array, Array]:
    """Candidates ranked by (a desc, slot asc, request asc).

    Returns (sorted a [R·γ] with non-candidates set to 0 and last, request index of each sorted
    candidate [R·γ], valid [R·γ] bool).
    """
    r, g = survival.shape
    a = jax.lax.cummin(survival.astype(jnp.float32), axis=1)  # guard: enforce non-increasing along γ
    if active is not None:
        a = jnp.where(active[:, None], a, 0.0)
    a = jnp.where(a > 0, a, 0.0).reshape(-1)  # [R*γ] row-major: index = req * γ + slot
    req = jnp.repeat(jnp.arange(r, dtype=jnp.int32), g)
    slot = jnp.tile(jnp.arange(g, dtype=jnp.int32), r)
    order = jnp.lexsort((req, slot, -a))  # last key is primary
    a_sorted = a[order]
    return a_sorted, req[order], a_sorted > 0


def schedule_objective(survival: Array, sps: Array, *, active: Array | None = None,
                       num_requests: Array | int | None = None) -> Array:
    """Θ(m) for every admission count m = 0..R·γ along the ranking -> float32 [R·γ + 1].

    Θ(m) = (R + Σ_{i≤m} a_(i)) · SPS(R + m); counts past the last valid candidate are -inf.
    R is the number of active rows (or `num_requests` when given, used by the async variant).
    """
    a_sorted, _, valid = _ranking(survival, active)
    if num_requests is None:
        num_requests = survival.shape[0] if active is None else jnp.sum(active.astype(jnp.int32))
    n_req = jnp.asarray(num_requests, jnp.int32)
    m = jnp.arange(a_sorted.shape[0] + 1, dtype=jnp.int32)
    tau = n_req.astype(jnp.float32) + jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(a_sorted)])
    theta = tau * _sps_at(sps, n_req + m)
    return jnp.where(jnp.concatenate([jnp.ones((1,), bool), valid]), theta, -jnp.inf)


def _lengths_from_count(req_sorted: Array, valid: Array, count: Array, num_rows: int) -> Array:
    """ℓ_r = number of request r's candidates among the first `count` of the ranking -> int32 [R]."""
    admitted = (jnp.arange(req_sorted.shape[0]) < count) & valid
    return jnp.zeros((num_rows,), jnp.int32).at[req_sorted].add(admitted.astype(jnp.int32))


def prefix_schedule(survival: Array, sps: Array, *, early_stop: bool = True, active: Array | None = None) -> Array:
    """Draft counts ℓ_r to verify per request (Algorithm 1, spec §7.2) -> int32 [R].

    survival [R, γ] calibrated prefix-survival probabilities (non-increasing along γ; enforced with
    a running minimum); sps [B_max + 1] steps per second by verify batch size in tokens (B > B_max
    counts as 0). early_stop=True: Algorithm 1 (stop at the first candidate that does not strictly
    raise Θ; lossless). early_stop=False: unconstrained ``argmax_m Θ(m)`` (not lossless on
    current-step data; for stale data and the Appendix A test). active [R] bool: rows that take part
    (inactive rows get 0 and do not count in R). Static argument: early_stop.
    """
    r = survival.shape[0]
    theta = schedule_objective(survival, sps, active=active)  # [N + 1]
    _, req_sorted, valid = _ranking(survival, active)
    if early_stop:
        improves = theta[1:] > theta[:-1]  # [N]; -inf never improves
        count = jnp.sum(jnp.cumprod(improves.astype(jnp.int32)))
    else:
        count = jnp.argmax(theta)  # first maximum: smallest m on ties
    return _lengths_from_count(req_sorted, valid, count, r)


def global_capacity(stale_survival: Array, sps: Array, *, active: Array | None = None,
                    num_requests: Array | int | None = None) -> Array:
    """K_t = argmax_m Θ(m) on stale (t − 2) survivals: the number of drafts to verify -> int32 scalar.

    stale_survival [R, γ]; rows not in `active` (or with zero survival: requests that arrived since
    t − 2) contribute no candidates; `num_requests` = the current R_t (spec §7.4 [OURS]).
    """
    theta = schedule_objective(stale_survival, sps, active=active, num_requests=num_requests)
    return jnp.argmax(theta).astype(jnp.int32)


def top_k_schedule(survival: Array, capacity: Array | int, *, active: Array | None = None) -> Array:
    """Admit the current top-`capacity` candidates (prefix-consistent) -> ℓ_r int32 [R].

    survival [R, γ] current calibrated survivals; capacity a (traced) int; fewer valid candidates
    than `capacity` admits all of them.
    """
    _, req_sorted, valid = _ranking(survival, active)
    return _lengths_from_count(req_sorted, valid, jnp.asarray(capacity, jnp.int32), survival.shape[0])


def async_schedule(survival: Array, stale_survival: Array, sps: Array, *, active: Array | None = None,
                   stale_active: Array | None = None) -> tuple[Array, Array]:
    """The asynchronous top-K variant (spec §7.4): (ℓ [R] int32, capacity K_t int32).

    K_t from `stale_survival` (t − 2, rows in `stale_active`) by the global search with the current
    R_t; ℓ from the current `survival` ranking. Use K_t = 0 (or a fixed default) for t < 2 by
    passing an all-false `stale_active`.
    """
    n_now = survival.shape[0] if active is None else jnp.sum(active.astype(jnp.int32))
    stale_rows = stale_active if active is None or stale_active is None else stale_active & active
    capacity = global_capacity(stale_survival, sps, active=stale_rows, num_requests=n_now)
    return top_k_schedule(survival, capacity, active=active), capacity


def fill_to_bucket(survival: Array, ell: Array, buckets, *, active: Array | None = None) -> Array:
    """Extend a schedule ℓ into the padding of its token bucket with the next-ranked drafts -> int32 [R].

    survival [R, γ] (the ranking `ell` was chosen on; ℓ must be a ranking prefix, as every schedule
    here is); buckets: ascending compiled token-bucket sizes (static or traced int [n]). With
    B = R + Σℓ padded to the smallest bucket >= B, the top ``bucket − R`` candidates are admitted
    (all of them if fewer); B past the largest bucket keeps ℓ. Lossless with Algorithm 1 (see the
    module docstring): the cost of the round is the bucket's whatever ℓ is, so the extra drafts are free.
    """
    n_req = survival.shape[0] if active is None else jnp.sum(active.astype(jnp.int32))
    sizes = jnp.asarray(buckets, jnp.int32)
    count = jnp.sum(ell.astype(jnp.int32))
    bucket = sizes[jnp.clip(jnp.searchsorted(sizes, n_req + count), 0, sizes.shape[0] - 1)]
    return top_k_schedule(survival, jnp.maximum(bucket - n_req, count), active=active)
