"""Why (and when) speculative decoding pays on this machine: verify cost vs tokens, and break-even τ.

Speculative decoding is faster than autoregressive decoding only if a round (draft K tokens +
verify K+1) costs less than τ autoregressive steps. On a GPU, scoring K+1 tokens costs about
as much as scoring one (the step is bound by reading the weights); whether that holds here is
measured, with the bundled pair (or any --target/--draft), greedy, batch 1:

  A. in-loop target cost for T = 1 .. K_max+1 tokens on a cache: a `fori_loop` of `--iters`
     real loop pieces (T = 1: `autoregressive_step`; T = K+1: the round's `target_verify`, each
     feeding its argmax back), as ms per pass and as a multiple of T = 1;
  B. end to end with `infer.api.generate` on the default demo prompt: autoregressive ms/token,
     then per block size K the measured τ, ms per round, round / AR step, the speed-up, and the
     τ a round of that cost would need for 1.0x and for 1.5x.

Both parts run in one process, interleaved; only ratios are meaningful on a shared machine.

    ./run bench round_cost                         # bundled pair, K = 1, 2, 3, 5, 7
    ./run bench round_cost --block-sizes 3,7 --max-new-tokens 96

Prints two tables; saves JSON with commit and machine info to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, save_result  # noqa: E402

from dspark_jax.sampling import SamplingConfig, greedy_argmax  # noqa: E402
from dspark_jax.target.model import output_kernel  # noqa: E402
from infer.api import generate, load_target_bundle  # noqa: E402
from infer.autoregressive import autoregressive_step  # noqa: E402
from infer.demo import DEFAULT_PROMPT, bundled_paths  # noqa: E402
from infer.speculative import target_verify  # noqa: E402
from infer.speculative_api import load_draft_bundle  # noqa: E402
from infer.state import ARLoop, RowParams, SpecLoop, row_keys_from_seeds  # noqa: E402
from infer.step import ar_init, spec_init, spec_models  # noqa: E402


def forward_program(target, draft, tokens: int, *, context: int, iters: int):
    """A compiled-on-first-call program: `iters` in-loop target passes of `tokens` tokens at batch 1.

    tokens = 1 runs the real autoregressive step (`autoregressive_step`: forward + next token +
    output write); tokens = K+1 runs the real verify forward of a K-draft round (`target_verify`)
    with each pass's argmax fed back as the next anchor + drafts (the cache is not advanced).
    """
    cfg = target.config
    prompt = jnp.ones((1, context), jnp.int32)
    lengths = jnp.full((1,), context, jnp.int32)
    rows = RowParams.build([SamplingConfig()], row_keys_from_seeds(0, 1), [-1], iters + 2)
    if tokens == 1:
        loop = ARLoop(target=cfg, mode=SamplingConfig().mode, max_new_tokens=iters + 2,
                      cache_len=context + iters + 64)
        state = ar_init(loop, target.params, prompt, lengths, rows)

        @jax.jit
        def run(params, state):
            head = output_kernel(cfg, params)
            return jax.lax.fori_loop(0, iters, lambda _, s: autoregressive_step(loop, params, head, s), state).last

        return lambda: jax.block_until_ready(run(target.params, state))
    loop = SpecLoop(target=cfg, draft=draft.config, block_size=tokens - 1, mode=SamplingConfig().mode,
                    max_new_tokens=1, cache_len=context + tokens + 64, share_lm_head=draft.shares_target_lm_head)
    models = spec_models(loop, target.params, draft.params, None)
    state = spec_init(loop, models, prompt, lengths, rows)

    @jax.jit
    def run(models, state):
        def body(_, s):
            toks = greedy_argmax(target_verify(loop, models, s).logits)  # [1, T]
            return s.replace(anchor=toks[:, 0], proposal=s.proposal.replace(tokens=toks[:, 1:]))

        return jax.lax.fori_loop(0, iters, body, state).anchor

    return lambda: jax.block_until_ready(run(models, state))


def interleaved_best(fns: dict, reps: int) -> dict:
    """Warm every callable once, then `reps` round-robin passes; the fastest wall time (s) of each.

    Round-robin spreads the shared machine's slow periods over all configurations alike.
    """
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", help="target model dir (default: the bundled one)")
    ap.add_argument("--draft", help="draft dir (default: the bundled DSpark drafter)")
    ap.add_argument("--block-sizes", default="1,2,3,5,7")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--context", type=int, default=128, help="cached tokens before the timed forwards (part A)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "round_cost_cpu.json"))
    args = ap.parse_args(argv)
    target_dir = args.target or bundled_paths()[0]
    draft_dir = args.draft or bundled_paths()[1]
    target = load_target_bundle(target_dir)
    draft = load_draft_bundle(draft_dir, target)
    ks = [int(k) for k in args.block_sizes.split(",")]
    if max(ks) > draft.config.block_size:
        raise SystemExit(f"block size {max(ks)} > the draft's {draft.config.block_size}")

    forward_fns = {t: forward_program(target, draft, t, context=args.context, iters=args.iters)
                   for t in range(1, max(ks) + 2)}
    forward_s = interleaved_best(forward_fns, args.reps)
    forward = [{"tokens": t, "forward_ms": forward_s[t] / args.iters * 1e3} for t in forward_fns]
    for row in forward:
        row["over_one_token"] = row["forward_ms"] / forward[0]["forward_ms"]

    prompt = [DEFAULT_PROMPT]
    n = args.max_new_tokens
    results, wall = {}, {}

    def runner(name, **kw):
        def fn():  # keeps the fastest compiled-program time (generate's wall_s: no host pre/post-processing)
            results[name] = generate(target, prompt, max_new_tokens=n, **kw)
            wall[name] = min(wall.get(name, float("inf")), results[name].metrics["wall_s"])
        return fn

    gen_fns = {"ar": runner("ar")}
    gen_fns.update({k: runner(k, draft=draft, block_size=k) for k in ks})
    interleaved_best(gen_fns, args.reps)
    ar = results["ar"]
    ar_ms = wall["ar"] / ar.metrics["tokens"] * 1e3
    rounds = []
    for k in ks:
        m = results[k].metrics
        round_ms = wall[k] / m["rounds"] * 1e3
        rounds.append({
            "block_size": k, "tau": m["acceptance_length"], "round_ms": round_ms, "round_over_ar_step": round_ms / ar_ms,
            "verify_forward_over_ar_forward": forward[k]["over_one_token"],
            "speedup": wall["ar"] / wall[k], "tau_for_1x": round_ms / ar_ms,
            "tau_for_1_5x": 1.5 * round_ms / ar_ms, "tau_max": k + 1,
            "greedy_outputs_equal": results[k].token_ids == ar.token_ids,
        })

    print(f"A. target forward at batch 1, {args.context} tokens cached ({args.iters} in-loop forwards)")
    print("tokens | ms/forward | x one token")
    for r in forward:
        print(f"{r['tokens']:6d} | {r['forward_ms']:10.3f} | {r['over_one_token']:6.2f}")
    print(f"\nB. greedy generate, {n} new tokens: autoregressive {ar_ms:.3f} ms/token")
    print("K | tau  | ms/round | round/AR | speed-up | tau for 1x | tau for 1.5x | max tau | lossless")
    for r in rounds:
        print(f"{r['block_size']} | {r['tau']:.2f} | {r['round_ms']:8.3f} | {r['round_over_ar_step']:8.2f} | "
              f"{r['speedup']:8.2f} | {r['tau_for_1x']:10.2f} | {r['tau_for_1_5x']:12.2f} | {r['tau_max']:7d} | "
              f"{r['greedy_outputs_equal']}")
    save_result(args.out, {"benchmark": "round_cost", "config": vars(args), "target": os.path.relpath(target_dir),
                           "draft": os.path.relpath(draft_dir),
                           "autoregressive_ms_per_token": ar_ms, "forward": forward, "rounds": rounds,
                           "machine": machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
