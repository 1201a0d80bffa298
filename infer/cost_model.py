"""SPS(B) profiling and the whole-round cost model (DSpark spec §7.5, issue 11).

`profile_sps` times a verify step at every static token bucket and, optionally, the draft pass,
giving an `SPSProfile`. It is built to survive a shared, noisy machine: every program is compiled
and warmed first, then the repeats go round-robin over the buckets (one call of each bucket per
sweep, so a burst of load from another process hits every bucket alike instead of one bucket's
consecutive repeats), each bucket keeps its minimum (other processes only ever add time), and
the step times are made non-decreasing in the bucket size (`monotone_step_times`: a bigger bucket
does at least the work of a smaller one, so a smaller bucket measured slower than a bigger one was
disturbed and gets the bigger one's time; SPS(B) is then non-increasing).
Profiles are cached as JSON on disk, keyed by everything that changes the numbers: model
fingerprint, shapes, JAX backend, device kind and JAX version (`profile_key`). The default cache
directory is ``$DSPARK_CACHE_DIR/sps`` or ``$XDG_CACHE_HOME/dspark_jax/sps`` (``~/.cache``).

The scheduler consumes dense tables indexed by verify tokens B (`SPSProfile.sps_table`): the time
of B tokens is the time of the bucket B is padded to; B past the largest bucket gets SPS 0.
`SPSProfile.round_sps_table` adds the draft pass, so Θ = τ · SPS_round(B) is tokens per second of
the whole round. `RoundCostModel.drafting_pays` compares the best drafted round with a plain
decode step of the same requests (B = R, no draft pass): when drafting cannot pay on this hardware
and load, the engine decodes without drafting, so it is never slower than plain decoding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.scheduling import prefix_schedule, schedule_objective

__all__ = ["ESTIMATOR", "SPSProfile", "time_call", "time_round_robin", "monotone_step_times", "profile_key",
           "default_cache_dir", "profile_sps", "RoundCostModel", "plot_profile"]

FORMAT = "dspark-sps/v1"
# How step times are measured; cached profiles made otherwise are re-measured. "call-from-monotone": call_s
# fitted from the stored smallest-bucket time; "device-params": taken with the drafter's parameters on the
# device (before, every call also copied them from the host); "draft-loop-or-round": the draft pass's compute is the
# smaller of the in-loop and the one-round estimate.
ESTIMATOR = "round-robin-min/monotone/call-from-monotone/draft-loop-or-round/device-params"


def time_round_robin(fns: Sequence[Callable[[], Any]], *, warmup: int = 2, repeats: int = 7) -> list[float]:
    """Minimum wall seconds of ``jax.block_until_ready(fn())`` for each of `fns`, timed round-robin.

    Every fn is called `warmup` times untimed (compiles), then `repeats` sweeps call each fn once in
    turn; each fn keeps its fastest call. Interleaving spreads a load burst from other processes over
    all fns, and the minimum discards the time such bursts add.
    """
    for fn in fns:
        for _ in range(max(warmup, 1)):
            jax.block_until_ready(fn())
    best = [float("inf")] * len(fns)
    for _ in range(max(repeats, 1)):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def time_call(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 7) -> float:
    """Minimum wall seconds of ``jax.block_until_ready(fn())`` after `warmup` untimed calls."""
    return time_round_robin([fn], warmup=warmup, repeats=repeats)[0]


def monotone_step_times(times: Sequence[float]) -> tuple[float, ...]:
    """Step times per ascending bucket made non-decreasing: t_i <- min(t_j for j >= i).

    A bucket of more tokens does at least the work of a smaller one, and timing noise only adds
    time, so a smaller bucket measured slower than a bigger one takes the bigger one's time.
    """
    out, low = [], float("inf")
    for t in reversed(list(times)):
        low = min(low, float(t))
        out.append(low)
    return tuple(reversed(out))


def _device_kind() -> str:
    return str(getattr(jax.devices()[0], "device_kind", "unknown"))


def profile_key(fields: Mapping[str, Any]) -> str:
    """Cache key: sha1 of `fields` (model fingerprint, shapes, ...) + backend, device kind, JAX version."""
    full = {**{k: fields[k] for k in sorted(fields)}, "backend": jax.default_backend(),
            "device_kind": _device_kind(), "device_count": jax.device_count(), "jax": jax.__version__}
    return hashlib.sha1(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_cache_dir() -> str:
    """``$DSPARK_CACHE_DIR/sps``, else ``$XDG_CACHE_HOME/dspark_jax/sps`` (``~/.cache`` by default)."""
    if os.environ.get("DSPARK_CACHE_DIR"):
        return os.path.join(os.environ["DSPARK_CACHE_DIR"], "sps")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dspark_jax", "sps")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SPSProfile:
    """Measured step times.

    buckets: static verify token buckets (ascending); verify_s: seconds of one verify step at each
    bucket (the `time_round_robin` minimum, made non-decreasing by `monotone_step_times`); draft_s:
    seconds of one draft pass over all slots (None: not profiled); call_s: the fixed overhead of one
    engine call (dispatch + blocking device-to-host read; part of every verify_s and draft_s, which
    were each timed as one call; None: not measured); key / fields: what the profile
    was measured for; backend, device_kind: where; estimator: how the times were taken.
    """

    buckets: tuple[int, ...]
    verify_s: tuple[float, ...]
    draft_s: float | None = None
    call_s: float | None = None
    key: str = ""
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    backend: str = ""
    device_kind: str = ""
    estimator: str = ""

    def __post_init__(self):
        if len(self.buckets) != len(self.verify_s) or not self.buckets:
            raise ValueError(f"SPS profile needs one time per bucket, got {len(self.buckets)} buckets and "
                             f"{len(self.verify_s)} times")
        if list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ValueError(f"SPS buckets must be ascending positive token counts, got {list(self.buckets)}")
        if any(not (t > 0) for t in self.verify_s):
            raise ValueError(f"SPS step times must be positive, got {list(self.verify_s)}")

    @property
    def max_tokens(self) -> int:
        """The largest bucket (B_max)."""
        return self.buckets[-1]

    def step_seconds(self, num_tokens: int, *, interpolate: bool = False) -> float:
        """Seconds of a verify step over `num_tokens` (padded to its bucket); inf past the largest.

        interpolate=True: linear in B between the measured buckets (exact at each bucket; B below the
        smallest bucket takes its time): the cost per token of a round whose padding is filled with
        drafts (`dspark_jax.scheduling.fill_to_bucket`), without a cliff at each bucket edge.
        """
        prev = None
        for b, t in zip(self.buckets, self.verify_s):
            if b >= num_tokens:
                if not interpolate or prev is None:
                    return t
                return prev[1] + (t - prev[1]) * (num_tokens - prev[0]) / (b - prev[0])
            prev = (b, t)
        return float("inf")

    def round_seconds(self, num_tokens: int, *, drafted: bool, rounds_per_call: int = 1,
                      interpolate: bool = False) -> float:
        """Whole-round seconds at `num_tokens` verify tokens: verify compute, plus the draft pass's compute
        when `drafted`, plus the per-call overhead (`call_s`) shared by `rounds_per_call` rounds of one call.

        Every profiled time (verify_s, draft_s) was one call, so it includes one `call_s`; the engine
        runs the draft pass inside the round's program, so a drafted round pays the overhead once, not
        twice. Without `call_s` (not measured): verify_s (+ draft_s). interpolate: see `step_seconds`.
        """
        call = self.call_s or 0.0
        t = self.step_seconds(num_tokens, interpolate=interpolate) - call + call / max(int(rounds_per_call), 1)
        return t + (max((self.draft_s or 0.0) - call, 0.0) if drafted else 0.0)

    def sps_table(self, rounds_per_call: int = 1) -> np.ndarray:
        """Plain-round SPS(B) (verify, no draft pass) for B = 0..B_max, float32 [B_max + 1] (B = 0 -> 0)."""
        return np.asarray([0.0] + [1.0 / self.round_seconds(b, drafted=False, rounds_per_call=rounds_per_call)
                                   for b in range(1, self.max_tokens + 1)], np.float32)

    def round_sps_table(self, rounds_per_call: int = 1, *, interpolate: bool = False) -> np.ndarray:
        """Drafted whole-round SPS(B) = 1 / (draft pass + verify(B) + call overhead share), float32 [B_max + 1]
        (interpolate: verify(B) linear between buckets, see `step_seconds`)."""
        return np.asarray([0.0] + [1.0 / self.round_seconds(b, drafted=True, rounds_per_call=rounds_per_call,
                                                            interpolate=interpolate)
                                   for b in range(1, self.max_tokens + 1)], np.float32)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (format tag included)."""
        return {"format": FORMAT, **dataclasses.asdict(self), "fields": dict(self.fields)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], source: str = "SPS profile") -> "SPSProfile":
        """Inverse of `to_json`; a wrong format or missing key is a ValueError naming it and `source`."""
        if obj.get("format") != FORMAT:
            raise ValueError(f"{source}: format {obj.get('format')!r} is not {FORMAT!r}")
        try:
            return cls(buckets=tuple(int(b) for b in obj["buckets"]), verify_s=tuple(float(t) for t in obj["verify_s"]),
                       draft_s=None if obj.get("draft_s") is None else float(obj["draft_s"]),
                       call_s=None if obj.get("call_s") is None else float(obj["call_s"]), key=obj.get("key", ""),
                       fields=obj.get("fields", {}), backend=obj.get("backend", ""),
                       device_kind=obj.get("device_kind", ""), estimator=obj.get("estimator", ""))
        except KeyError as e:
            raise ValueError(f"{source}: missing key {e.args[0]!r}") from None


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def profile_sps(verify_at: Callable[[int], Callable[[], Any]], buckets: Sequence[int], *,
                fields: Mapping[str, Any], draft: Callable[[], Any] | None = None,
                rounds: tuple[Callable[[], Any], int] | None = None,
                draft_rounds: Callable[[], Any] | None = None,
                draft_at: tuple[Callable[[], Any], int] | None = None, warmup: int = 2,
                repeats: int = 7, cache_dir: str | None = None, refresh: bool = False) -> SPSProfile:
    """Profile (or load from the disk cache) the verify step at every bucket and the draft pass.

    verify_at(bucket) returns a zero-argument callable running one jitted verify step at that
    bucket; draft: a zero-argument callable running one draft pass (or None); rounds: (fn, n), fn
    running n verify rounds at the smallest bucket in ONE call (n >= 2), which measures the per-call
    overhead: call_s = t(1 round) - (t(n rounds) - t(1 round)) / (n - 1), clipped to [0, the
    smallest measured call] (None: call_s not measured). draft_rounds (with `rounds`): the same
    n-round program with the draft pass in every round: the draft pass's compute is measured inside
    the round program it runs in, (t(draft_rounds) − t(rounds)) / n, and draft_s = call_s + that
    (a separate draft-only program has its own, smaller call overhead, so subtracting call_s from its
    time undercounts the draft pass; `draft` is then not timed). draft_at (with draft_rounds): (fn, b),
    fn running ONE round at bucket b (one of `buckets`) with the draft pass: a second estimate of the
    draft pass's compute, t(fn) − t(bucket b); the smaller of the two is kept. Each is a difference of
    two minima, and a burst of load that every repeat of the longer program met inflates it (on this
    CPU the 8-round estimate at 4 slots came out 5.1 ms in one profile against 3.4–3.8 ms re-measured;
    the gate then declined drafting that paid 1.14x). fields: what
    identifies the measured program (model fingerprint, slots, cache length, dtype, ...).
    cache_dir: None = `default_cache_dir()`; "" disables the cache. Timing: `time_round_robin` over
    the buckets and the draft pass together (minimum of `repeats` interleaved sweeps), then
    `monotone_step_times`. A cached profile taken with another estimator is re-measured.
    """
    buckets = tuple(sorted(int(b) for b in buckets))
    loop_draft = draft_rounds is not None and rounds is not None
    key = profile_key({**fields, "buckets": buckets, "draft": draft is not None or loop_draft,
                       "call": rounds is not None})
    path = os.path.join(cache_dir if cache_dir is not None else default_cache_dir(), f"{key}.json") \
        if cache_dir != "" else None
    if path and os.path.isfile(path) and not refresh:
        with open(path) as f:
            cached = SPSProfile.from_json(json.load(f), path)
        if cached.estimator == ESTIMATOR:
            return cached
    fns = [verify_at(b) for b in buckets] + ([draft] if draft is not None and not loop_draft else [])
    if rounds is not None:
        if rounds[1] < 2:
            raise ValueError(f"profile_sps rounds=(fn, n) needs n >= 2, got {rounds[1]}")
        fns.append(rounds[0])
        if loop_draft:
            fns.append(draft_rounds)
            if draft_at is not None:
                fns.append(draft_at[0])
    times = time_round_robin(fns, warmup=warmup, repeats=repeats)
    verify_s = monotone_step_times(times[:len(buckets)])
    draft_s = times[len(buckets)] if draft is not None and not loop_draft else None
    call_s = None
    if rounds is not None:  # t1 = c + o, tn = n c + o  ->  o = t1 - (tn - t1) / (n - 1)
        n = rounds[1]
        # t1: the smallest bucket's time as stored (made monotone), not its raw time: call_s is subtracted
        # from verify_s, and a raw t1 disturbed upwards (one noisy minimum of a ~5 ms call) made call_s
        # swallow nearly the whole stored call (at 1 slot: a plain round in a device loop came out 0.5 ms
        # against 1.8 ms measured, and dspark's gate declined drafting at concurrency 1).
        t1, tn = verify_s[0], times[len(buckets) + (0 if draft_s is None else 1)]
        call_s = min(max(t1 - (tn - t1) / (n - 1), 0.0), verify_s[0], draft_s or verify_s[0])
        if loop_draft:  # the draft pass's compute inside the round program, plus one call overhead
            t_loop = times[len(buckets) + 1]
            compute = max(t_loop - tn, 0.0) / n
            if draft_at is not None:  # one drafted round at bucket b minus the plain round at b (raw time)
                compute = min(compute, max(times[-1] - times[buckets.index(int(draft_at[1]))], 0.0))
            draft_s = call_s + compute
    prof = SPSProfile(buckets=buckets, verify_s=verify_s, draft_s=draft_s, call_s=call_s, key=key, fields=dict(fields),
                      backend=jax.default_backend(), device_kind=_device_kind(), estimator=ESTIMATOR)
    if path:
        _write_json(path, prof.to_json())
    return prof


@dataclasses.dataclass(frozen=True)
class RoundCostModel:
    """Whole-round cost model over a profile: decides ℓ and whether drafting pays.

    Θ_draft = max over admission counts of τ(m) / (draft + verify(R + m) + o) (the Algorithm 1 path
    when `early_stop`); Θ_plain = R / (verify(R) + o) (plain decoding: no draft pass), o the measured
    per-call overhead (dispatch + read, `SPSProfile.call_s`) per round (`SPSProfile.round_seconds`).
    Drafting pays when Θ_draft > (1 + margin) · Θ_plain.
    """

    profile: SPSProfile
    margin: float = 0.0

    def tables(self, rounds_per_call: int = 1) -> tuple[jax.Array, jax.Array]:
        """(drafted whole-round SPS [B_max + 1], plain-round SPS [B_max + 1]) as float32 device arrays, with the
        per-call overhead shared by `rounds_per_call` rounds per engine call.

        The drafted table interpolates the verify time between buckets: the engine fills a drafted
        round's padding with the next-ranked drafts (`dspark_jax.scheduling.fill_to_bucket`), so a
        bucket's cost is spread over its tokens. On the padded step table Algorithm 1's break stops at
        every bucket edge (a single draft past a full bucket pays the whole next bucket: spec §7.4's
        "trapped" greedy), e.g. R = 4 slots with a bucket of 4 never drafted. A plain round verifies
        exactly R tokens, so its table is the padded one.
        """
        return (jnp.asarray(self.profile.round_sps_table(rounds_per_call, interpolate=True)),
                jnp.asarray(self.profile.sps_table(rounds_per_call)))

    @staticmethod
    def decide(survival: jax.Array, round_sps: jax.Array, plain_sps: jax.Array, *, active: jax.Array | None = None,
               early_stop: bool = True, margin: float = 0.0,
               plain_requests: jax.Array | int | None = None) -> tuple[jax.Array, jax.Array]:
        """Jittable: (ℓ [R] int32 — zeros when drafting does not pay —, drafting_pays bool scalar).

        survival [R, γ] (estimated before drafting: e.g. the previous round's calibrated survivals);
        round_sps / plain_sps from `tables()`. plain_requests: how many requests plain decoding would
        be serving instead (int scalar, at least the active ones; None: the active ones). An engine with
        requests waiting for a slot or in prefill passes the load it reaches once they are admitted:
        the time a drafted round spends delays their admission, so the drafted round at today's load
        must beat plain decoding at that load (see `infer.engine.core._plan`).
        """
        ell = prefix_schedule(survival, round_sps, early_stop=early_stop, active=active)
        theta_draft = schedule_objective(survival, round_sps, active=active)[jnp.sum(ell)]  # Θ at the chosen m
        n_req = survival.shape[0] if active is None else jnp.sum(active.astype(jnp.int32))
        if plain_requests is not None:
            n_req = jnp.maximum(n_req, plain_requests)
        theta_plain = n_req * plain_sps[jnp.clip(n_req, 0, plain_sps.shape[0] - 1)]
        pays = theta_draft > (1.0 + margin) * theta_plain
        return jnp.where(pays, ell, 0), pays

    def drafting_pays(self, survival: Any, *, early_stop: bool = True) -> bool:
        """Host convenience for `decide` on numpy survivals [R, γ]."""
        round_sps, plain_sps = self.tables()
        return bool(self.decide(jnp.asarray(survival, jnp.float32), round_sps, plain_sps, early_stop=early_stop,
                                margin=self.margin)[1])


def plot_profile(profile: SPSProfile, path: str | os.PathLike, *, title: str | None = None) -> None:
    """SPS(B) (verify only and whole round) against verify tokens B, as a PNG/PDF at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = np.arange(1, profile.max_tokens + 1)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.step(b, profile.sps_table()[1:], where="post", label="verify step")
    if profile.draft_s is not None:
        ax.step(b, profile.round_sps_table()[1:], where="post", label="whole round (draft + verify)")
    ax.plot(profile.buckets, [1 / t for t in profile.verify_s], "o", ms=3)
    ax.set_xlabel("verify batch B (tokens)")
    ax.set_ylabel("steps / s")
    ax.set_title(title or f"SPS(B) on {profile.backend} ({profile.device_kind})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=120)
    plt.close(fig)
