"""Open-loop Poisson load over the engine and its plots (shared by benchmarks/bench_serve.py and
notebooks/serving.ipynb).

`prepare_load` builds an engine for one (policy, concurrency), measures (or loads) its SPS(B)
profile and warms every program variant up with the same requests; `timed_pass` replays them with
exponential inter-arrival times and returns one result row (`run_load` = both, once). Repeated
passes interleaved over the policies of one concurrency (`benchmarks/bench_serve.py --repeats`)
spread a load burst from other processes over all policies. `plot_load` draws throughput vs per-user speed,
verify budget vs concurrency and the SPS(B) curves.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import numpy as np

__all__ = ["LoadRun", "prepare_load", "timed_pass", "run_load", "plot_load"]


def _pct(xs, q):
    xs = [x for x in xs if x is not None]
    return float(np.percentile(xs, q)) * 1e3 if xs else None


@dataclasses.dataclass
class LoadRun:
    """One (policy, concurrency) load set up by `prepare_load`: the warmed engine, its requests and their
    arrival offsets in seconds; `timed_pass` replays it (as often as wanted)."""

    policy: str
    slots: int
    engine: Any
    requests: list
    arrivals: np.ndarray


def prepare_load(target, draft, prompts: Sequence[Sequence[int]], policy: str, slots: int, *, requests: int,
                 max_new_tokens: int, max_len: int, rate: float = 0.0, temperature: float = 0.0, seed: int = 0,
                 profile_repeats: int = 7, sps_cache: str | None = None,
                 buckets: Sequence[int] | None = None) -> tuple[LoadRun, dict[str, Any]]:
    """Build the engine of one (policy, concurrency = slots), measure (or load) its SPS(B) profile and compile
    every program variant the load needs with one untimed pass. Returns (run, SPS profile JSON)."""
    from dspark_jax.sampling import SamplingConfig
    from infer.engine import Engine, Request

    eng = Engine(target, draft if policy != "ar" else None, policy=policy, slots=slots, max_len=max_len,
                 sampling="temperature" if temperature > 0 else "greedy", buckets=buckets)
    prof = eng.profile(repeats=profile_repeats, cache_dir=sps_cache)
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, requests) if rate > 0 else np.zeros(requests)
    reqs = [Request(prompt=list(prompts[i % len(prompts)]), max_new_tokens=max_new_tokens, seed=seed + i,
                    sampling=SamplingConfig(temperature=temperature), stop_token_ids=()) for i in range(requests)]
    # Warm-up: the same requests once, untimed, so every program variant the timed run needs
    # (prompt buckets, token buckets, with / without a draft pass) is compiled.
    eng.generate(reqs)
    return LoadRun(policy=policy, slots=slots, engine=eng, requests=reqs, arrivals=np.cumsum(gaps)), prof.to_json()


def timed_pass(run: LoadRun) -> dict[str, Any]:
    """Replay `run`'s requests at their arrival times on its engine (metrics reset first) -> one result row:
    tokens/s, mean per-user tokens/s (tokens over first-token-to-finish time), TTFT and TPOT p50/p90 in ms,
    mean verify budget, τ, rounds, draft passes, plain rounds, scheduler share, wall time."""
    eng, reqs, arrivals = run.engine, run.requests, run.arrivals
    eng.stats = {k: type(v)(0) for k, v in eng.stats.items()}
    ids, nxt = [], 0
    t0 = time.perf_counter()
    while nxt < len(reqs) or eng.has_work():
        now = time.perf_counter() - t0
        while nxt < len(reqs) and arrivals[nxt] <= now:
            ids.append(eng.submit(reqs[nxt]))
            nxt += 1
        if eng.has_work():
            eng.step()
        elif nxt < len(reqs):
            time.sleep(max(0.0, min(arrivals[nxt] - now, 0.01)))
    wall = time.perf_counter() - t0
    outs = [eng.result(i) for i in ids]
    tokens = sum(len(o.token_ids) for o in outs)
    per_user = [len(o.token_ids) / (o.metrics["tpot_s"] * (len(o.token_ids) - 1))
                for o in outs if o.metrics["tpot_s"] and len(o.token_ids) > 1]
    m = eng.metrics()
    return {"policy": run.policy, "concurrency": run.slots, "requests": len(outs), "tokens": tokens,
            "throughput_tok_s": tokens / wall, "per_user_tok_s": float(np.mean(per_user)) if per_user else 0.0,
            "ttft_ms_p50": _pct([o.metrics["ttft_s"] for o in outs], 50),
            "ttft_ms_p90": _pct([o.metrics["ttft_s"] for o in outs], 90),
            "tpot_ms_p50": _pct([o.metrics["tpot_s"] for o in outs], 50),
            "tpot_ms_p90": _pct([o.metrics["tpot_s"] for o in outs], 90),
            "mean_verify_budget": m["mean_verify_budget"], "tau": m["tau"], "rounds": m["rounds"],
            "draft_passes": m["draft_passes"], "plain_rounds": m["plain_rounds"],
            "scheduler_share": m["scheduler_share"], "wall_s": wall}


def run_load(target, draft, prompts: Sequence[Sequence[int]], policy: str, slots: int, *, requests: int,
             max_new_tokens: int, max_len: int, rate: float = 0.0, temperature: float = 0.0, seed: int = 0,
             profile_repeats: int = 7, sps_cache: str | None = None,
             buckets: Sequence[int] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One (policy, concurrency = slots) run -> (result row, SPS profile JSON): `prepare_load` then one
    `timed_pass`. `requests` requests (prompt i mod len(prompts)) arrive at `rate` requests/s (Poisson;
    0 = all at t = 0). `buckets`: the engine's verify token buckets (default `default_token_buckets`;
    fewer = fewer compiles)."""
    run, prof = prepare_load(target, draft, prompts, policy, slots, requests=requests, max_new_tokens=max_new_tokens,
                             max_len=max_len, rate=rate, temperature=temperature, seed=seed,
                             profile_repeats=profile_repeats, sps_cache=sps_cache, buckets=buckets)
    return timed_pass(run), prof


def plot_load(results: list[dict], sps: dict, out_prefix: str) -> list[str]:
    """Save `<out_prefix>_throughput.png` (throughput vs per-user speed, verify budget vs concurrency)
    and `<out_prefix>_sps.png` (SPS(B) of every profile in `sps`); return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for pol in dict.fromkeys(r["policy"] for r in results):
        rows = sorted((r for r in results if r["policy"] == pol), key=lambda r: r["concurrency"])
        ax[0].plot([r["per_user_tok_s"] or 0 for r in rows], [r["throughput_tok_s"] for r in rows], "o-", label=pol)
        ax[1].plot([r["concurrency"] for r in rows], [r["mean_verify_budget"] for r in rows], "o-", label=pol)
    ax[0].set(xlabel="per-user tokens/s", ylabel="aggregate tokens/s", title="throughput vs per-user speed")
    ax[1].set(xlabel="concurrency (slots)", ylabel="verify tokens per request-round", xscale="log",
              title="verify budget")

    def finish(fig, axes, suffix):
        for a in axes:
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_prefix + suffix)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    finish(fig, ax, "_throughput.png")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, prof in sps.items():
        ax.plot(prof["buckets"], [1 / t for t in prof["verify_s"]], "o-", label=f"{name} verify")
    ax.set(xlabel="verify tokens B", ylabel="steps/s", xscale="log", title="SPS(B)")
    finish(fig, [ax], "_sps.png")
    return paths
