"""Decode and verify cost vs live context at a fixed cache capacity: full-capacity vs live-length attention.

A target forward over a KV cache of fixed capacity (16,384 positions by default) for one token
(decode) and K+1 = 8 tokens (verify), at live lengths 128 .. 8192 (cached tokens + the step's own).
"old" attends over the whole capacity (`TargetModel(live_bucket_min=0)`, the previous path);
"new" attends over the smallest power-of-two bucket >= the live length (`cached_attention`).
The context is a traced argument: one compiled program per (path, tokens), timed as a
`fori_loop` of `--iters` forwards (each feeding its argmax back), best of `--reps` interleaved
passes. Model: random float32 Qwen3, 4 layers, hidden 512, 8 query / 2 KV heads, head_dim 64,
vocab 8192, batch 1 (attention-heavy at long capacity on purpose).

    python benchmarks/bench_live_context.py            # saves benchmarks/results/live_context_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_round_cost import interleaved_best  # noqa: E402
from common import machine_info, print_table, save_result  # noqa: E402

from dspark_jax.config import TargetConfig  # noqa: E402
from dspark_jax.sampling import greedy_argmax  # noqa: E402
from dspark_jax.target.kv_cache import KVCache  # noqa: E402
from dspark_jax.target.model import TargetModel, output_kernel  # noqa: E402


def forward_program(cfg: TargetConfig, params, tokens: int, *, capacity: int, iters: int, bucket_min: int):
    """`iters` in-loop forwards of `tokens` tokens at batch 1 on a cache of `capacity`; context is traced."""
    model = TargetModel(cfg, live_bucket_min=bucket_min)

    @jax.jit
    def run(params, toks, context):
        head = output_kernel(cfg, params)
        cache = KVCache.create(cfg, 1, capacity).with_lengths(jnp.full((1,), context, jnp.int32))
        positions = context + jnp.arange(tokens, dtype=jnp.int32)[None, :]

        def body(_, carry):
            toks, cache = carry
            res = model.apply({"params": params}, toks, positions, cache, lm_head_kernel=head)
            return greedy_argmax(res.logits), res.cache.with_lengths(cache.lengths)

        return jax.lax.fori_loop(0, iters, body, (toks, cache))[0]

    toks = jnp.ones((1, tokens), jnp.int32)
    return lambda context: jax.block_until_ready(run(params, toks, jnp.int32(context)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capacity", type=int, default=16384)
    ap.add_argument("--contexts", default="128,512,2048,8192")
    ap.add_argument("--verify-tokens", type=int, default=8, help="K+1")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bucket-min", type=int, default=256)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "live_context_cpu.json"))
    args = ap.parse_args(argv)
    cfg = TargetConfig(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=65536)
    tok = jnp.zeros((1, 1), jnp.int32)
    params = nn.meta.unbox(TargetModel(cfg).init(jax.random.PRNGKey(0), tok, tok)["params"])
    contexts = [int(c) for c in args.contexts.split(",")]
    programs = {(path, t): forward_program(cfg, params, t, capacity=args.capacity, iters=args.iters,
                                           bucket_min=0 if path == "old" else args.bucket_min)
                for path in ("old", "new") for t in (1, args.verify_tokens)}
    # live length c = cached tokens + the step's t tokens
    fns = {(path, t, c): (lambda p=programs[(path, t)], c=c - t: p(c)) for (path, t) in programs for c in contexts}
    best = interleaved_best(fns, args.reps)
    rows = []
    for t in (1, args.verify_tokens):
        for c in contexts:
            old, new = best[("old", t, c)] / args.iters * 1e3, best[("new", t, c)] / args.iters * 1e3
            rows.append({"tokens": t, "step": "decode" if t == 1 else "verify", "live": c, "old_ms": old,
                         "new_ms": new, "speedup": old / new})
    print(f"target forward, capacity {args.capacity}, batch 1 ({args.iters} in-loop forwards, best of {args.reps})")
    print_table(rows, [("step", "step", "{}"), ("tokens", "T", "{}"), ("live", "live", "{}"),
                       ("old_ms", "full-capacity ms", "{:.2f}"), ("new_ms", "live-length ms", "{:.2f}"),
                       ("speedup", "speed-up", "{:.2f}x")])
    save_result(args.out, {"benchmark": "live_context", "machine": machine_info(), "capacity": args.capacity,
                           "bucket_min": args.bucket_min, "config": {"layers": 4, "hidden": 512, "heads": "8/2",
                                                                     "head_dim": 64, "vocab": 8192, "batch": 1},
                           "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
