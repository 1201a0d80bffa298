"""Round breakdown, SPS(B) and AR vs speculative tokens/s at a Qwen3-4B-shaped target (random weights).

Random weights do not change cost. Target: Qwen3-4B shapes (36 layers, hidden 2560, 32:8 heads,
head_dim 128, MLP 9728, vocab 151,936; bf16), a 1-layer DSpark draft (gated head, rank 64,
confidence head) sharing the target's LM head. Per batch size B, at a live context of
``--context`` tokens:

  ar_step_ms        one-token target decode (the autoregressive step)
  verify_ms         target forward over anchor + K drafts  ->  SPS(B) = 1000 / verify_ms
  backbone_ms       draft backbone (pending context + block)
  head_xla_ms       sequential Markov head, XLA path (pallas_kernels.markov_sampler reference)
  head_pallas_ms    the fused Markov sampler kernel (accelerators only)
  verify_xla_ms     rejection sampling, XLA path (fused_verify reference)
  verify_pallas_ms  the fused verification kernel (accelerators only)
  round_ms          ar-free round = backbone + best head + verify forward + best verification
  AR tokens/s = B * 1000 / ar_step_ms; speculative tokens/s at acceptance length tau =
  B * tau * 1000 / round_ms, for the taus in ``--taus`` (random drafts accept nothing, so tau is
  an input here: the bundled pair measures 2.2-4.1, see README).

    python benchmarks/bench_accelerator.py [--layers 36] [--batches 1,8,32,64] [--context 2048] [--out ...]
"""

from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine_info, median_ms, print_table, save_result  # noqa: E402
from dspark_jax import kernels  # noqa: E402
from dspark_jax.config import TargetConfig  # noqa: E402
from dspark_jax.draft.cache import DraftCache  # noqa: E402
from dspark_jax.draft.config import DraftConfig  # noqa: E402
from dspark_jax.draft.model import DraftModel, init_draft_params  # noqa: E402
from dspark_jax.target.kv_cache import KVCache  # noqa: E402
from dspark_jax.target.model import TargetModel, output_kernel  # noqa: E402
from infer.speculative import draft_backbone  # noqa: E402

ACCEL = jax.default_backend() in ("tpu", "gpu")


def build(args):
    """(target config, params, LM head kernel, draft config, draft params) with random weights."""
    cfg = TargetConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       head_dim=args.head_dim, max_position_embeddings=max(4096, 2 * args.context), dtype=args.dtype)
    tok = jnp.zeros((1, 1), jnp.int32)
    params = nn.meta.unbox(jax.jit(TargetModel(cfg).init)(jax.random.PRNGKey(0), tok, tok)["params"])
    dcfg = DraftConfig.from_target(cfg, num_hidden_layers=1, block_size=args.block_size, mask_token_id=args.vocab - 1,
                                   markov_rank=args.markov_rank, markov_head_type="gated",
                                   target_layer_ids=tuple(range(0, args.layers - 1, max(1, args.layers // 5)))[:5])
    dparams = init_draft_params(dcfg, jax.random.PRNGKey(1))
    head = jax.jit(output_kernel, static_argnums=0)(cfg, params)
    return cfg, params, head, dcfg, {**dparams, "lm_head": {"kernel": head}}


def run(batch: int, args, built) -> dict:
    cfg, params, head, dcfg, dparams = built
    k, ctx = args.block_size, args.context
    target, draft = TargetModel(cfg), DraftModel(dcfg)
    cache_len = ctx + 2 * (k + 1)
    tcache = KVCache.create(cfg, batch, cache_len).with_lengths(jnp.full((batch,), ctx, jnp.int32))
    dcache = DraftCache.create(dcfg, batch, cache_len).with_lengths(jnp.full((batch,), ctx - k - 1, jnp.int32))
    anchor = jnp.ones((batch,), jnp.int32)
    start = jnp.full((batch,), ctx, jnp.int32)
    pending = jnp.ones((batch, k + 1, dcfg.context_dim), jnp.dtype(args.dtype))
    pend_pos = start[:, None] - (k + 1) + jnp.arange(k + 1)[None, :]
    pend_valid = jnp.ones((batch, k + 1), bool)
    positions = start[:, None] + jnp.arange(k + 1)[None, :]
    taps = tuple(dcfg.target_layer_ids)
    temp = jnp.ones((batch,), jnp.float32)
    seeds = jnp.arange(batch, dtype=jnp.uint32)
    mk, ck = dparams["markov_head"], dparams["confidence_head"]["proj"]
    head_kw = dict(head_type="gated", gate_w=mk["gate_proj"]["kernel"], gate_b=mk["gate_proj"]["bias"],
                   conf_w=ck["kernel"], conf_b=ck["bias"])

    @jax.jit
    def ar_step(params, tcache, anchor):
        out = target.apply({"params": params}, anchor[:, None], tcache.lengths[:, None], tcache, lm_head_kernel=head)
        return out.logits, out.cache

    @jax.jit
    def verify_forward(params, tcache, tokens):
        out = target.apply({"params": params}, tokens, positions, tcache, tap_layers=taps, lm_head_kernel=head)
        return out.logits, out.taps

    @jax.jit
    def backbone(dparams, dcache, pending, anchor):
        return draft_backbone(draft, dparams, dcfg, dcache, pending, pend_pos, pend_valid, anchor, start, k)

    def head_fn(backend):
        return jax.jit(lambda h, u: kernels.sample_drafts(u, h, anchor, temp, seeds, mk["markov_w1"]["embedding"],
                                                          mk["markov_w2"]["kernel"], backend=backend, **head_kw))

    def verify_fn(backend):
        def f(logits, tokens, probs):
            cuts = kernels.verify_cuts(logits, temp[:, None], jnp.zeros((batch, 1), jnp.int32), jnp.ones((batch, 1)))
            return kernels.verify(logits, tokens, probs, jnp.full((batch,), k, jnp.int32), temp, cuts, seeds,
                                  backend=backend)
        return jax.jit(f)

    reps = args.reps
    h, u, _ = backbone(dparams, dcache, pending, anchor)
    tokens, probs, _ = head_fn("xla")(h, u)
    verify_tokens = jnp.concatenate([anchor[:, None], tokens], axis=1)
    logits, _ = verify_forward(params, tcache, verify_tokens)
    row = {"batch": batch, "context": ctx, "K": k,
           "ar_step_ms": median_ms(ar_step, params, tcache, anchor, reps=reps),
           "verify_ms": median_ms(verify_forward, params, tcache, verify_tokens, reps=reps),
           "backbone_ms": median_ms(backbone, dparams, dcache, pending, anchor, reps=reps),
           "head_xla_ms": median_ms(head_fn("xla"), h, u, reps=reps),
           "verify_xla_ms": median_ms(verify_fn("xla"), logits, tokens, probs, reps=reps),
           "head_pallas_ms": None, "verify_pallas_ms": None}
    if ACCEL:
        row["head_pallas_ms"] = median_ms(head_fn("pallas"), h, u, reps=reps)
        row["verify_pallas_ms"] = median_ms(verify_fn("pallas"), logits, tokens, probs, reps=reps)
    best = lambda a, b: min(x for x in (row[a], row[b]) if x is not None)
    row["round_ms"] = row["backbone_ms"] + best("head_xla_ms", "head_pallas_ms") + row["verify_ms"] + best(
        "verify_xla_ms", "verify_pallas_ms")
    row["sps"] = 1000.0 / row["verify_ms"]
    row["ar_tokens_per_s"] = batch * 1000.0 / row["ar_step_ms"]
    for tau in args.taus:
        row[f"spec_tokens_per_s@tau={tau}"] = batch * tau * 1000.0 / row["round_ms"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--intermediate", type=int, default=9728)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--block-size", type=int, default=7)
    ap.add_argument("--markov-rank", type=int, default=64)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--taus", default="2.5,3.5", help="acceptance lengths for the speculative tokens/s columns")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/accelerator_<backend>.json)")
    args = ap.parse_args(argv)
    args.taus = [float(t) for t in args.taus.split(",") if t.strip()]
    built = build(args)
    rows = []
    for b in [int(x) for x in args.batches.split(",") if x.strip()]:
        rows.append(run(b, args, built))
        print(rows[-1], flush=True)
    cols = [("batch", "B", "{}"), ("ar_step_ms", "AR step ms", "{:.2f}"), ("verify_ms", "verify ms", "{:.2f}"),
            ("sps", "SPS(B)", "{:.1f}"), ("backbone_ms", "backbone ms", "{:.2f}"), ("head_xla_ms", "head xla", "{:.2f}"),
            ("verify_xla_ms", "verif xla", "{:.2f}"), ("round_ms", "round ms", "{:.2f}"),
            ("ar_tokens_per_s", "AR tok/s", "{:.0f}")]
    cols += [(f"spec_tokens_per_s@tau={t}", f"spec tok/s tau={t}", "{:.0f}") for t in args.taus]
    cells = [{key: "-" if r.get(key) is None else f.format(r[key]) for key, _, f in cols} for r in rows]
    print_table(cells, [(key, head, "{}") for key, head, _ in cols])
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"accelerator_{jax.default_backend()}.json")
    save_result(out, {"benchmark": "accelerator", "config": vars(args), "rows": rows, "machine": machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
