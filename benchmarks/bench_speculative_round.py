"""Per-round latency of speculative decoding, broken into its parts, vs one autoregressive step.

Random-weight float32 target (8 layers, hidden 512, vocab 32k by default) and a DSpark draft of
1 layer (1/8 of the target's depth), K = 7, vanilla Markov head (rank 64 ~ hidden/8, the
proportion of the released rank-256 drafts at hidden 2560) + confidence head.
Times, on the same jitted target, at a context of `--context` tokens:
  ar_step          one-token target decode (the autoregressive baseline step)
  draft_backbone   draft pass: project pending context (K+1 rows) + block of K
  sequential_head  Markov-corrected sampling of K drafts + confidences (lax.scan over slots)
  target_verify    target forward over anchor + K drafts with taps
  sampling         warping target distributions + rejection sampling
  round            all of the above in one jitted function
Prints a table, saves JSON (with commit and machine info) to benchmarks/results/.

    ./run bench speculative_round
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, save_result  # noqa: E402

from dspark_jax.config import TargetConfig  # noqa: E402
from dspark_jax.draft.cache import DraftCache  # noqa: E402
from dspark_jax.draft.config import DraftConfig  # noqa: E402
from dspark_jax.draft.model import DraftModel, init_draft_params  # noqa: E402
from dspark_jax.sampling import SamplingConfig, warp_probs  # noqa: E402
from dspark_jax.target.kv_cache import KVCache  # noqa: E402
from dspark_jax.target.model import TargetModel, output_kernel  # noqa: E402
from infer.speculative import SpecOptions, draft_backbone, sample_block  # noqa: E402
from infer.verify import rejection_sample  # noqa: E402


def median_ms(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(batch: int, args) -> dict:
    cfg = TargetConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                       num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                       max_position_embeddings=4096)
    k = args.block_size
    tok = jnp.zeros((1, 1), jnp.int32)
    target = TargetModel(cfg)
    params = nn.meta.unbox(jax.jit(target.init)(jax.random.PRNGKey(0), tok, tok)["params"])
    dcfg = DraftConfig.from_target(cfg, num_hidden_layers=max(1, args.layers // 8), block_size=k,
                                   mask_token_id=args.vocab - 1, markov_rank=args.markov_rank,
                                   target_layer_ids=tuple(range(min(5, args.layers - 1))))
    dparams = init_draft_params(dcfg, jax.random.PRNGKey(1))
    # As in the decode loops: the output layer laid out once as [d, V]; a real drafter's frozen LM
    # head is the target's, so the draft reads the same kernel.
    head = jax.jit(output_kernel, static_argnums=0)(cfg, params)
    dparams = {**dparams, "lm_head": {"kernel": head}}
    draft = DraftModel(dcfg)
    taps = tuple(dcfg.target_layer_ids)
    sampling = SamplingConfig(temperature=1.0)
    values, mode = sampling.values(), sampling.mode
    options = SpecOptions(block_size=k)
    cache_len = args.context + 64
    ctx = args.context
    tcache = KVCache.create(cfg, batch, cache_len).with_lengths(jnp.full((batch,), ctx, jnp.int32))
    dcache = DraftCache.create(dcfg, batch, cache_len).with_lengths(jnp.full((batch,), ctx - k - 1, jnp.int32))
    anchor = jnp.ones((batch,), jnp.int32)
    start = jnp.full((batch,), ctx, jnp.int32)
    pending = jnp.ones((batch, k + 1, dcfg.context_dim), jnp.float32)
    pend_pos = start[:, None] - (k + 1) + jnp.arange(k + 1)[None, :]
    pend_valid = jnp.ones((batch, k + 1), bool)
    key = jax.random.PRNGKey(2)
    stop_ids = jnp.asarray([-1], jnp.int32)

    @jax.jit
    def ar_step(params, head, tcache, anchor):
        out = target.apply({"params": params}, anchor[:, None], tcache.lengths[:, None], tcache, lm_head_kernel=head)
        return warp_probs(out.logits[:, 0], values, mode), out.cache

    @jax.jit
    def backbone(dparams, dcache, pending, anchor):
        return draft_backbone(draft, dparams, dcfg, dcache, pending, pend_pos, pend_valid, anchor, start, k)

    h, u, _ = backbone(dparams, dcache, pending, anchor)

    @jax.jit
    def seq_head(dparams, h, u, anchor, key):
        return sample_block(dparams, dcfg, h, u, anchor, key, values, mode, options)

    prop = seq_head(dparams, h, u, anchor, key)
    verify_tokens = jnp.concatenate([anchor[:, None], prop.tokens], axis=1)
    positions = start[:, None] + jnp.arange(k + 1)[None, :]

    @jax.jit
    def verify(params, head, tcache, verify_tokens):
        out = target.apply({"params": params}, verify_tokens, positions, tcache, tap_layers=taps, lm_head_kernel=head)
        return out.logits, out.taps, out.cache

    logits, _, _ = verify(params, head, tcache, verify_tokens)

    @jax.jit
    def sampling_step(logits, prop, key):
        target_probs = warp_probs(logits, values, mode)
        return rejection_sample(key, prop.tokens, prop.probs, target_probs, prop.num, stop_ids, mode)

    @jax.jit
    def full_round(params, head, dparams, tcache, dcache, pending, anchor, key):
        h, u, dcache = draft_backbone(draft, dparams, dcfg, dcache, pending, pend_pos, pend_valid, anchor, start, k)
        prop = sample_block(dparams, dcfg, h, u, anchor, key, values, mode, options)
        toks = jnp.concatenate([anchor[:, None], prop.tokens], axis=1)
        out = target.apply({"params": params}, toks, positions, tcache, tap_layers=taps, lm_head_kernel=head)
        ver = rejection_sample(key, prop.tokens, prop.probs, warp_probs(out.logits, values, mode), prop.num,
                               stop_ids, mode)
        return ver, out.cache, dcache, out.taps

    reps = args.reps
    row = {
        "batch": batch,
        "ar_step_ms": median_ms(ar_step, params, head, tcache, anchor, reps=reps),
        "draft_backbone_ms": median_ms(backbone, dparams, dcache, pending, anchor, reps=reps),
        "sequential_head_ms": median_ms(seq_head, dparams, h, u, anchor, key, reps=reps),
        "target_verify_ms": median_ms(verify, params, head, tcache, verify_tokens, reps=reps),
        "sampling_ms": median_ms(sampling_step, logits, prop, key, reps=reps),
        "round_ms": median_ms(full_round, params, head, dparams, tcache, dcache, pending, anchor, key, reps=reps),
    }
    row["sequential_head_share"] = row["sequential_head_ms"] / row["round_ms"]
    row["round_over_ar_step"] = row["round_ms"] / row["ar_step_ms"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--block-size", type=int, default=7)
    # DSpark's released drafts use rank 256 at hidden 2560 (~d/10); keep that proportion by default.
    ap.add_argument("--markov-rank", type=int, default=64)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "speculative_round_cpu.json"))
    args = ap.parse_args(argv)
    rows = [run(int(b), args) for b in args.batches.split(",")]
    cols = ["batch", "ar_step_ms", "draft_backbone_ms", "sequential_head_ms", "target_verify_ms", "sampling_ms",
            "round_ms", "sequential_head_share", "round_over_ar_step"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    save_result(args.out, {"benchmark": "speculative_round", "config": vars(args), "rows": rows,
                           "machine": machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
