"""Per-round latency of speculative decoding, broken into its parts, vs one autoregressive step.

Random-weight float32 target (8 layers, hidden 512, vocab 32k by default) and a DSpark draft of
1 layer (1/8 of the target's depth), K = 7, vanilla Markov head (rank 64 ~ hidden/8, the
proportion of the released rank-256 drafts at hidden 2560) + confidence head.
Times the loops' own step pieces (`infer.speculative` / `infer.autoregressive`) on states
prefilled with `--context` random tokens:
  ar_step          `autoregressive_step`: one-token target decode (the baseline step)
  draft_backbone   `draft_backbone`: project pending context (K+1 rows) + the trained block
  sequential_head  `sample_block`: Markov-corrected sampling of K drafts + confidences
  target_verify    `target_verify`: target forward over anchor + K drafts with taps
  sampling         `verify_proposal`: warping target distributions + rejection sampling
  round            `speculative_step`: one whole round (verify, commit, propose, metrics)
Prints a table, saves JSON (with commit and machine info) to benchmarks/results/.

    ./run bench speculative_round
"""

from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, median_ms, save_result  # noqa: E402

from dspark_jax.config import TargetConfig  # noqa: E402
from dspark_jax.draft.config import DraftConfig  # noqa: E402
from dspark_jax.draft.model import init_draft_params  # noqa: E402
from dspark_jax.sampling import SamplingConfig  # noqa: E402
from dspark_jax.target.model import TargetModel  # noqa: E402
from infer.speculative import (Pending, draft_backbone, sample_block, speculative_step, target_verify,  # noqa: E402
                               verify_proposal)
from infer.state import ARLoop, RowParams, SpecLoop, row_keys_from_seeds  # noqa: E402
from infer.step import ar_init, ar_step, spec_init, spec_models  # noqa: E402


def run(batch: int, args) -> dict:
    """Time the loop's own step pieces on a state prefilled with `args.context` random tokens."""
    cfg = TargetConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                       num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                       max_position_embeddings=4096)
    k = args.block_size
    tok = jnp.zeros((1, 1), jnp.int32)
    params = nn.meta.unbox(jax.jit(TargetModel(cfg).init)(jax.random.PRNGKey(0), tok, tok)["params"])
    dcfg = DraftConfig.from_target(cfg, num_hidden_layers=max(1, args.layers // 8), block_size=k,
                                   mask_token_id=args.vocab - 1, markov_rank=args.markov_rank,
                                   target_layer_ids=tuple(range(min(5, args.layers - 1))))
    dparams = init_draft_params(dcfg, jax.random.PRNGKey(1))
    sampling = SamplingConfig(temperature=1.0)
    ctx, max_new = args.context, 64
    cache_len = ctx + max_new + k + 1
    # As in the decode loops: the output layer laid out once as [d, V]; a real drafter's frozen LM
    # head is the target's, so the draft reads the same kernel (share_lm_head).
    loop = SpecLoop(target=cfg, draft=dcfg, block_size=k, mode=sampling.mode, max_new_tokens=max_new,
                    cache_len=cache_len, share_lm_head=True)
    models = spec_models(loop, params, dparams, None)
    prompts = jax.random.randint(jax.random.PRNGKey(2), (batch, ctx), 0, args.vocab - 1)
    lengths = jnp.full((batch,), ctx, jnp.int32)
    rows = RowParams.build([sampling] * batch, row_keys_from_seeds(0, batch), [-1], max_new)
    state = spec_init(loop, models, prompts, lengths, rows)
    ar_loop = ARLoop(target=cfg, mode=sampling.mode, max_new_tokens=max_new, cache_len=cache_len)
    ar_state = ar_init(ar_loop, params, prompts, lengths, rows)
    keys = rows.keys
    pending = Pending(features=jnp.ones((batch, k + 1, dcfg.context_dim), jnp.float32),
                      positions=ctx - (k + 1) + jnp.broadcast_to(jnp.arange(k + 1, dtype=jnp.int32), (batch, k + 1)),
                      valid=jnp.ones((batch, k + 1), bool), next_tokens=jnp.zeros((batch, k + 1), jnp.int32))

    # Weights travel as arguments (closed-over arrays would be baked into the programs as constants).
    ar = jax.jit(lambda p, head, s: ar_step(ar_loop, p, head, s).out.tokens)
    backbone = jax.jit(lambda m, s: draft_backbone(loop, m, s.dcache, pending, s.anchor, s.start))
    h, u, _ = backbone(models, state)
    seq_head = jax.jit(lambda m, s, h, u: sample_block(loop, m, h, u, s.anchor, keys, s.params))
    verify = jax.jit(lambda m, s: target_verify(loop, m, s))
    logits = verify(models, state).logits
    sampling_step = jax.jit(lambda s, logits: verify_proposal(loop, s.proposal, logits, s.proposal.num, keys, s.params))
    full_round = jax.jit(lambda m, s: speculative_step(loop, m, s))

    reps = args.reps
    row = {
        "batch": batch,
        "ar_step_ms": median_ms(ar, params, models.head, ar_state, reps=reps),
        "draft_backbone_ms": median_ms(backbone, models, state, reps=reps),
        "sequential_head_ms": median_ms(seq_head, models, state, h, u, reps=reps),
        "target_verify_ms": median_ms(verify, models, state, reps=reps),
        "sampling_ms": median_ms(sampling_step, state, logits, reps=reps),
        "round_ms": median_ms(full_round, models, state, reps=reps),
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
