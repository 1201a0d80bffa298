"""Cost of the on-device plan + `lax.switch` over token buckets: `scheduled_rounds` vs `engine_rounds`.

    .venv/bin/python benchmarks/bench_scheduled_round.py --target models/pystd-qwen3-target \
        --draft models/pystd-dspark-k7 --slots 4 --json benchmarks/results/scheduled_round_cpu.json

Both programs run `--rounds` rounds in one call over `--slots` active slots with ℓ = 0 (bucket =
the smallest bucket >= slots) and a draft pass every round: `engine_rounds` at the static bucket,
`scheduled_rounds` with the traced policy static:0 (plan, bucket choice and both switches on
device). Timed round-robin, minimum of `--repeats` (`infer.cost_model.time_round_robin`).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine_info, save_result  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True)
    p.add_argument("--draft", required=True)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default="benchmarks/results/scheduled_round_cpu.json")
    args = p.parse_args(argv)

    import jax.numpy as jnp

    from infer.api import load_target_bundle
    from infer.cost_model import time_round_robin
    from infer.engine import Engine
    from infer.engine.core import Policy, engine_rounds, scheduled_rounds
    from infer.ragged import pick_bucket
    from infer.speculative_api import load_draft_bundle

    try:
        target = load_target_bundle(args.target)
        draft = load_draft_bundle(args.draft, target)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    eng = Engine(target, draft, policy="mtp1", slots=args.slots, max_len=args.max_len, sampling="greedy",
                 multi_round=args.rounds)
    r, m = args.slots, args.rounds
    act, no_prop = jnp.ones((r,), bool), jnp.zeros((r,), bool)
    budget, stops = jnp.full((r,), 1 << 30, jnp.int32), jnp.full((r, 1), -1, jnp.int32)
    bucket = pick_bucket(r, eng.buckets)
    round_sps, plain_sps = eng._tables[True]
    holder = [eng.state]

    def carry(st, toks):  # the state is donated: keep it, positions reset so every call is alike
        holder[0] = st.replace(start=jnp.zeros_like(st.start))
        return toks

    def fixed():
        st, toks, *_ = engine_rounds(target.params, eng._dparams, eng._head, holder[0], jnp.zeros((r,), jnp.int32),
                                     act, eng._temps, budget, stops, jnp.int32(m), spec=eng.spec, bucket=bucket,
                                     draft_pass=True, max_rounds=m)
        return carry(st, toks)

    def scheduled():
        st, toks, *_ = scheduled_rounds(target.params, eng._dparams, eng._head, holder[0], no_prop, act, round_sps,
                                        plain_sps, eng._temps, Policy("static", k=0).device_args(), budget, stops,
                                        jnp.int32(m), spec=eng.spec, buckets=eng.buckets, max_rounds=m)
        return carry(st, toks)

    t_fixed, t_sched = time_round_robin([fixed, scheduled], warmup=2, repeats=args.repeats)
    row = {"slots": r, "rounds_per_call": m, "bucket": bucket, "buckets": list(eng.buckets),
           "engine_rounds_ms_per_round": t_fixed / m * 1e3, "scheduled_rounds_ms_per_round": t_sched / m * 1e3,
           "ratio": t_sched / t_fixed}
    print(f"{m} rounds/call, {r} slots, bucket {bucket}, draft pass: engine_rounds "
          f"{row['engine_rounds_ms_per_round']:.1f} ms/round, scheduled_rounds "
          f"{row['scheduled_rounds_ms_per_round']:.1f} ms/round (ratio {row['ratio']:.2f})")
    save_result(args.json, {"results": [row], "machine": machine_info(), "args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
