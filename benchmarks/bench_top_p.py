"""Top-p speculative vs autoregressive decoding, full-vocabulary sort (before) vs sort-free (after).

Issue 10 measured speculative decoding with top-p at batch 256 at ~10x the autoregressive time:
top-p sorted a full vocabulary row per draft slot and per verify row. The sort-free path
(`dspark_jax.sampling`: 64 `lax.top_k` candidates, else an exact 32-step bisection on the
threshold) gives the same distributions. Random-weight float32 target and draft (random weights
give flat distributions: every row needs the bisection fallback — the worst case for the new
path), temperature 1, top-p 0.9, `--max-new-tokens` tokens per row, batch 1/8/64/256. Times the
compiled programs only (compile excluded), best of `--reps`.

    ./run bench top_p                # ~ a few minutes on 2 CPU cores
    ./run bench top_p --batches 1,8 --vocab 4096

Prints a table; saves JSON with commit and machine info to benchmarks/results/top_p_cpu.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, print_table, save_result  # noqa: E402

from dspark_jax.config import TargetConfig  # noqa: E402
from dspark_jax.draft.config import DraftConfig  # noqa: E402
from dspark_jax.draft.model import init_draft_params  # noqa: E402
from dspark_jax.sampling import SamplingConfig  # noqa: E402
from dspark_jax.target.model import TargetModel  # noqa: E402
from infer.autoregressive import autoregressive_generate  # noqa: E402
from infer.speculative import speculative_generate  # noqa: E402
from infer.state import ARLoop, RowParams, SpecLoop, row_keys_from_seeds  # noqa: E402


def best_s(fn, reps: int) -> float:
    """Compile + warm once, then the fastest of `reps` runs (seconds)."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "top_p_cpu.json"))
    args = ap.parse_args(argv)

    cfg = TargetConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                       num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=args.hidden // 4, max_position_embeddings=1024)
    tok = jnp.zeros((1, 1), jnp.int32)
    params = nn.meta.unbox(jax.jit(TargetModel(cfg).init)(jax.random.PRNGKey(0), tok, tok)["params"])
    dcfg = DraftConfig.from_target(cfg, num_hidden_layers=1, block_size=args.block_size, mask_token_id=args.vocab - 1,
                                   markov_rank=32, target_layer_ids=(-1, 0))
    dparams = init_draft_params(dcfg, jax.random.PRNGKey(1))
    sampling = SamplingConfig(temperature=1.0, top_p=args.top_p)
    n, k = args.max_new_tokens, args.block_size
    cache_len = -(-(args.prompt_len + n + k + 1) // 64) * 64
    rows_out = []
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = jax.random.randint(jax.random.PRNGKey(b), (b, args.prompt_len), 0, args.vocab - 1)
        lengths = jnp.full((b,), args.prompt_len, jnp.int32)
        rows = RowParams.build([sampling] * b, row_keys_from_seeds(0, b), [-1], n)
        row = {"batch": b}
        for path, by_sort in (("sort", True), ("sort_free", False)):
            mode = dataclasses.replace(sampling.mode, top_p_by_sort=by_sort)
            ar_loop = ARLoop(target=cfg, mode=mode, max_new_tokens=n, cache_len=cache_len)
            spec_loop = SpecLoop(target=cfg, draft=dcfg, block_size=k, mode=mode, max_new_tokens=n,
                                 cache_len=cache_len)
            row[f"ar_{path}_s"] = best_s(lambda: autoregressive_generate(params, prompts, lengths, rows,
                                                                         loop=ar_loop), args.reps)
            row[f"spec_{path}_s"] = best_s(lambda: speculative_generate(params, dparams, None, prompts, lengths, rows,
                                                                        loop=spec_loop), args.reps)
        row["spec_over_ar_sort"] = row["spec_sort_s"] / row["ar_sort_s"]
        row["spec_over_ar_sort_free"] = row["spec_sort_free_s"] / row["ar_sort_free_s"]
        row["spec_speedup_sort_free_vs_sort"] = row["spec_sort_s"] / row["spec_sort_free_s"]
        row["ar_speedup_sort_free_vs_sort"] = row["ar_sort_s"] / row["ar_sort_free_s"]
        rows_out.append(row)
        print(row, flush=True)
        # Saved after every batch size, so a long run leaves its finished rows behind.
        save_result(args.out, {"benchmark": "top_p", "config": vars(args), "rows": rows_out, "machine": machine_info()})
    print_table(rows_out, [("batch", "batch", "{}"), ("ar_sort_s", "AR sort s", "{:.3f}"),
                           ("ar_sort_free_s", "AR new s", "{:.3f}"), ("spec_sort_s", "spec sort s", "{:.3f}"),
                           ("spec_sort_free_s", "spec new s", "{:.3f}"),
                           ("spec_over_ar_sort", "spec/AR before", "{:.2f}"),
                           ("spec_over_ar_sort_free", "spec/AR after", "{:.2f}"),
                           ("spec_speedup_sort_free_vs_sort", "spec new vs sort", "{:.2f}")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
