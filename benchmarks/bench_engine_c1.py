"""Engine at concurrency 1 vs the jitted `infer.api.generate()` of the same pair (issue 11 target: within 10 %).

    .venv/bin/python benchmarks/bench_engine_c1.py --target models/pystd-qwen3-target \
        --draft models/pystd-dspark-k7 --prompts eval_prompts/mbpp.jsonl --json benchmarks/results/engine_c1_cpu.json

Side by side in one process, for each mode — `ar` (engine policy ar vs generate() without a draft)
and `static:K` (engine verifying the drafter's full block every round vs speculative generate()
with no threshold, the same rounds) — the same prompts, greedy, the same max new tokens, no stop
tokens. Each repeat runs every prompt through both, alternating (so machine load hits both alike);
per prompt the minimum over repeats is kept. The engine has one slot whose capacity equals
generate()'s cache length, and its programs are compiled by an untimed first pass. Reported:
summed time per mode, the ratio engine / generate() (1.0 = as fast; the target is <= 1.10),
rounds, and the engine's per-round split (plan, rounds incl. device time, prefill chunks incl.
device time, host rest). Outputs are
checked equal token for token (both are greedy and lossless).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine_info, print_table, save_result  # noqa: E402


def _engine_stats_zero(eng) -> None:
    eng.stats = {k: type(v)(0) for k, v in eng.stats.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True)
    p.add_argument("--draft", required=True)
    p.add_argument("--prompts", required=True, help="JSONL prompt file")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=48, help="prompts are cut to this many tokens")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--modes", default="ar,static", help="ar and/or static (static:K with K = the block size)")
    p.add_argument("--dtype", default=None, help="load both models in this dtype (default: the checkpoints')")
    p.add_argument("--multi-round", type=int, default=8, help="engine rounds per dispatch when nobody waits (1 = off)")
    p.add_argument("--json", default="benchmarks/results/engine_c1_cpu.json")
    args = p.parse_args(argv)

    from infer.api import generate, load_target_bundle
    from infer.batching import bucket_length, cache_length
    from infer.engine import Engine, Request
    from infer.evaluate import read_prompt_file
    from infer.speculative_api import load_draft_bundle

    try:
        target = load_target_bundle(args.target, dtype=args.dtype)
        draft = load_draft_bundle(args.draft, target, dtype=args.dtype)
        prompts = []
        for pr in read_prompt_file(args.prompts):
            ids = target.tokenizer.encode(pr) if isinstance(pr, str) else list(pr)
            if ids:
                prompts.append(list(ids[: args.prompt_tokens]))
            if len(prompts) == args.num_prompts:
                break
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not prompts or any(m not in ("ar", "static") for m in modes):
        print("error: need at least one prompt; --modes takes ar and/or static", file=sys.stderr)
        return 2
    m_new, k = args.max_new_tokens, draft.config.block_size
    longest = max(len(q) for q in prompts)

    rows = []
    for mode in modes:
        d = draft if mode == "static" else None
        policy = "ar" if d is None else f"static:{k}"
        cap = cache_length(bucket_length(longest), longest + m_new) + k + 1
        eng = Engine(target, d, policy=policy, slots=1, max_len=cap, sampling="greedy", prefill_chunk=256,
                     multi_round=args.multi_round)

        def run_gen(q):
            return generate(target, [q], draft=d, max_new_tokens=m_new, stop_token_ids=[]).token_ids[0]

        def run_eng(q):
            return eng.generate([Request(prompt=q, max_new_tokens=m_new, stop_token_ids=())])[0].token_ids

        for q in prompts:  # compile every program (untimed) and check the outputs agree
            a, b = run_gen(q), run_eng(q)
            if a != b:
                print(f"warning: {mode}: engine and generate() differ on a prompt of {len(q)} tokens", flush=True)
        best_gen, best_eng = [float("inf")] * len(prompts), [float("inf")] * len(prompts)
        best_stats = [None] * len(prompts)
        for _ in range(args.repeats):
            for i, q in enumerate(prompts):
                t0 = time.perf_counter()
                run_gen(q)
                best_gen[i] = min(best_gen[i], time.perf_counter() - t0)
                _engine_stats_zero(eng)
                t0 = time.perf_counter()
                run_eng(q)
                t = time.perf_counter() - t0
                if t < best_eng[i]:
                    best_eng[i], best_stats[i] = t, dict(eng.stats)
        gen_s, eng_s = sum(best_gen), sum(best_eng)
        rounds = sum(s["rounds"] for s in best_stats)
        plan_s, round_s = sum(s["plan_s"] for s in best_stats), sum(s["round_s"] for s in best_stats)
        prefill_s = sum(s["prefill_s"] for s in best_stats)
        rows.append({"mode": policy, "prompts": len(prompts), "tokens": len(prompts) * m_new,
                     "generate_ms": gen_s * 1e3, "engine_ms": eng_s * 1e3, "ratio": eng_s / gen_s,
                     "engine_rounds": rounds, "engine_ms_per_round": eng_s * 1e3 / max(rounds, 1),
                     "generate_ms_per_round": gen_s * 1e3 / max(rounds, 1),
                     "plan_ms_per_round": plan_s * 1e3 / max(rounds, 1),
                     "round_ms_per_round": round_s * 1e3 / max(rounds, 1),
                     "prefill_ms_per_round": prefill_s * 1e3 / max(rounds, 1),
                     "host_rest_ms_per_round": (eng_s - plan_s - round_s - prefill_s) * 1e3 / max(rounds, 1),
                     "per_prompt_ratio": [e / g for e, g in zip(best_eng, best_gen)]})
        print(f"{policy:10s} generate {gen_s * 1e3:8.1f} ms  engine {eng_s * 1e3:8.1f} ms  "
              f"ratio {eng_s / gen_s:.3f}", flush=True)
    print_table(rows, [("mode", "mode", "{}"), ("tokens", "tokens", "{}"), ("generate_ms", "generate ms", "{:.1f}"),
                       ("engine_ms", "engine ms", "{:.1f}"), ("ratio", "engine/gen", "{:.3f}"),
                       ("engine_rounds", "rounds", "{}"), ("generate_ms_per_round", "gen ms/rnd", "{:.2f}"),
                       ("engine_ms_per_round", "eng ms/rnd", "{:.2f}"), ("plan_ms_per_round", "plan", "{:.2f}"),
                       ("round_ms_per_round", "round", "{:.2f}"), ("prefill_ms_per_round", "prefill", "{:.2f}"),
                       ("host_rest_ms_per_round", "host rest", "{:.2f}")])
    save_result(args.json, {"benchmark": "engine_c1_vs_generate", "results": rows, "machine": machine_info(),
                            "load_avg": os.getloadavg(), "args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
