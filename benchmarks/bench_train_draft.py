"""Draft-training throughput, peak memory and the cost of online target features (default sizes).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_train_draft.py                  # float32
    PYTHONPATH=. .venv/bin/python benchmarks/bench_train_draft.py --compute-dtype float32,bfloat16 --steps 10

Each compute dtype runs in its own subprocess (so `ru_maxrss` is that configuration's peak). Sizes:
the default `DraftTrainConfig` (2 draft layers, K=7, r=64, 32 anchors, seq 256, batch 8) against a
random target of the default `TargetTrainConfig` shape (4 layers, hidden 256, vocab 8192). Timed:
  * the full training step with online target features (target forward inside the step);
  * the same step fed precomputed bf16 features (what an offline cache costs per step);
  * the target-feature forward alone (jitted `make_feature_fn`).
The three are measured interleaved; times are medians, the two ratios use per-measurement minima.
Writes JSON (git commit + machine info) to `benchmarks/results/train_draft_cpu.json`, prints a table.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, dtype_parser, run_per_dtype  # noqa: E402

DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "train_draft_cpu.json")


def _timed(fn, n: int) -> list[float]:
    import jax

    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def _child(args: argparse.Namespace) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dspark_jax.draft import DraftConfig, default_target_layer_ids
    from dspark_jax.sharding import make_mesh
    from dspark_jax.target.model import TargetModel
    from train.draft_config import DraftTrainConfig
    from train.draft_features import make_feature_fn
    from train.draft_trainer import build_draft_program
    from train.target_config import TargetTrainConfig

    tcfg = TargetTrainConfig(vocab_size=args.vocab_size).model_config(eos_id=0, pad_id=2).replace(
        dtype=args.compute_dtype)
    cfg = DraftTrainConfig(compute_dtype=args.compute_dtype, steps=1000)
    ids = default_target_layer_ids(tcfg.num_hidden_layers, min(cfg.num_context_layers, tcfg.num_hidden_layers - 1))
    dcfg = DraftConfig.from_target(tcfg.replace(dtype="float32"), mask_token_id=1, target_layer_ids=ids,
                                   **cfg.draft_fields())
    mesh = make_mesh(devices=jax.devices()[:1])
    prog = build_draft_program(cfg, dcfg, tcfg, mesh)
    tok = jnp.zeros((1, 1), jnp.int32)
    tparams = nn.meta.unbox(jax.jit(TargetModel(tcfg).init)(jax.random.PRNGKey(0), tok, tok)["params"])
    tparams = jax.tree_util.tree_map(jax.device_put, tparams, prog.target_shardings)
    rng = np.random.default_rng(0)
    b, s = cfg.batch_size, cfg.seq_len
    batches = [{"input_ids": rng.integers(3, args.vocab_size, (b, s)).astype(np.int32),
                "loss_mask": np.ones((b, s), np.float32)} for _ in range(4)]
    feat_fn = jax.jit(make_feature_fn(tcfg, dcfg.target_layer_ids, cfg.feature_dtype))
    offline = []
    for bt in batches:
        ctx, last = jax.device_get(feat_fn(tparams, jnp.asarray(bt["input_ids"])))
        offline.append(prog.program.put_batch({**bt, "ctx_feats": np.asarray(ctx), "last_hidden": np.asarray(last)}))
    online = [prog.program.put_batch(bt) for bt in batches]

    state = prog.program.init(cfg.seed, tparams)
    box = {"state": state, "i": 0}

    def step(data, tp):
        def run():
            box["state"], m = prog.program.step(box["state"], data[box["i"] % 4], tp)
            box["i"] += 1
            return m
        return run

    t0 = time.perf_counter()
    m = step(online, tparams)()
    jax.block_until_ready(m)
    compile_online = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(step(offline, None)())
    compile_offline = time.perf_counter() - t0
    _timed(step(online, tparams), args.warmup)
    ids_dev = [jnp.asarray(bt["input_ids"]) for bt in batches]
    on, off, feat = [], [], []
    for _ in range(args.steps):  # interleaved, so load changes on a shared machine hit all three alike
        on += _timed(step(online, tparams), 1)
        off += _timed(step(offline, None), 1)
        feat += _timed(lambda: feat_fn(tparams, ids_dev[0]), 1)
    m = {k: float(v) for k, v in jax.device_get(step(online, tparams)()).items()}
    anchors = m["sampled_anchors_abs"] * b
    med = lambda x: float(np.median(x))  # noqa: E731
    count = lambda tree: sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    trainable = {k: v for k, v in box["state"].params.items() if k not in ("embed_tokens", "lm_head")}
    return {
        "compute_dtype": args.compute_dtype, "batch_size": b, "seq_len": s, "num_anchors": cfg.num_anchors,
        "block_size": cfg.block_size, "draft_layers": cfg.num_draft_layers, "markov_rank": cfg.markov_rank,
        "target_layers": tcfg.num_hidden_layers, "hidden_size": tcfg.hidden_size, "vocab_size": tcfg.vocab_size,
        "target_layer_ids": list(dcfg.target_layer_ids), "draft_params_trainable": count(trainable),
        "draft_params_total": count(box["state"].params), "target_params": count(tparams),
        "timed_steps": args.steps, "compile_online_s": compile_online, "compile_offline_s": compile_offline,
        "step_online_s": med(on), "step_offline_s": med(off), "feature_forward_s": med(feat),
        "step_online_min_s": min(on), "step_offline_min_s": min(off), "feature_forward_min_s": min(feat),
        "tokens_per_s": b * s / med(on), "anchors_per_s": anchors / med(on),
        "tokens_per_s_offline": b * s / med(off), "anchors_per_s_offline": anchors / med(off),
        # shares from the per-measurement minima (least disturbed by other processes)
        "feature_share_of_step": min(feat) / min(on), "online_overhead_vs_offline": min(on) / min(off) - 1.0,
        "sampled_anchors_per_step": anchors, "loss_after": m["loss"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "backend": jax.default_backend(), "jax_version": jax.__version__, "device_kind": jax.devices()[0].device_kind,
    }


def main(argv=None) -> int:
    """Run the benchmark (one subprocess per compute dtype), save JSON, print a table."""
    p = dtype_parser(__doc__.split("\n\n")[0], dtypes="float32", steps=10, steps_help="timed steps per measurement",
                     warmup_help="untimed steps after compilation", out=DEFAULT_OUT)
    args = p.parse_args(argv)
    cols = [("compute_dtype", "dtype", "{}"), ("draft_params_trainable", "trainable", "{:,}"),
            ("compile_online_s", "compile s", "{:.1f}"), ("step_online_s", "step s", "{:.3f}"),
            ("step_offline_s", "step s (cached feats)", "{:.3f}"), ("feature_forward_s", "target fwd s", "{:.3f}"),
            ("feature_share_of_step", "fwd/step", "{:.1%}"),
            ("online_overhead_vs_offline", "online extra", "{:+.1%}"), ("tokens_per_s", "tokens/s", "{:,.0f}"),
            ("anchors_per_s", "anchors/s", "{:,.0f}"), ("peak_rss_mib", "peak RSS MiB", "{:,.0f}")]
    return run_per_dtype("train_draft", __file__, args, child=_child, cols=cols)


if __name__ == "__main__":
    sys.exit(main())
