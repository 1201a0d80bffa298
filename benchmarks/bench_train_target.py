"""Target-pretraining throughput and peak memory at the default `TargetTrainConfig` sizes.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_train_target.py                 # float32 + bfloat16
    PYTHONPATH=. .venv/bin/python benchmarks/bench_train_target.py --compute-dtype float32 --steps 20

Each compute dtype runs in its own subprocess (so `ru_maxrss` is that configuration's peak):
build the sharded train program, compile with one step (timed separately), run `--warmup` more
steps, then time `--steps` steps on random tokens (vocab 8192 = the default tokenizer size).
Writes JSON (with git commit and machine info) to `benchmarks/results/train_target_cpu.json` and
prints a table.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, dtype_parser, run_per_dtype  # noqa: E402

DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "train_target_cpu.json")


def _child(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from dspark_jax.sharding import make_mesh
    from train.target_config import TargetTrainConfig
    from train.target_trainer import build_target_program

    overrides = {"vocab_size": args.vocab_size, "compute_dtype": args.compute_dtype, "steps": 1000}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.seq_len:
        overrides["seq_len"] = args.seq_len
    cfg = TargetTrainConfig(**overrides)
    prog = build_target_program(cfg, cfg.model_config(eos_id=0, pad_id=2), make_mesh(devices=jax.devices()[:1]))
    rng = np.random.default_rng(0)
    batches = [prog.put_batch({"tokens": rng.integers(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1)).astype(np.int32),
                               "mask": np.ones((cfg.batch_size, cfg.seq_len), np.float32)}) for _ in range(4)]
    t0 = time.perf_counter()
    state = prog.init(cfg.seed)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, m = prog.step(state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for i in range(args.warmup):
        state, m = prog.step(state, batches[(i + 1) % 4])
    jax.block_until_ready(m)
    times, losses = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        state, m = prog.step(state, batches[i % 4])
        losses.append(float(m["loss"]))  # blocks: per-step wall time
        times.append(time.perf_counter() - t0)
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(state.params))
    tokens = cfg.tokens_per_step * args.steps
    return {
        "compute_dtype": cfg.compute_dtype, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "intermediate_size": cfg.intermediate_size, "num_params": n_params, "timed_steps": args.steps,
        "warmup_steps": args.warmup, "init_s": init_s, "compile_plus_first_step_s": compile_s,
        "step_s_mean": float(np.mean(times)), "step_s_median": float(np.median(times)),
        "step_s_min": float(np.min(times)), "tokens_per_s": tokens / float(np.sum(times)),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "final_loss": losses[-1], "backend": jax.default_backend(), "jax_version": jax.__version__,
        "device_kind": jax.devices()[0].device_kind,
    }


def main(argv=None) -> int:
    p = dtype_parser(__doc__.split("\n\n")[0], dtypes="float32,bfloat16", steps=20, steps_help="timed steps",
                     warmup_help="untimed steps after the compile step", out=DEFAULT_OUT)
    p.add_argument("--batch-size", type=int, default=0, help="0 = config default")
    p.add_argument("--seq-len", type=int, default=0, help="0 = config default")
    args = p.parse_args(argv)
    cols = [("compute_dtype", "dtype", "{}"), ("num_params", "params", "{:,}"), ("batch_size", "batch", "{}"),
            ("seq_len", "seq", "{}"), ("compile_plus_first_step_s", "compile s", "{:.1f}"),
            ("step_s_median", "step s (med)", "{:.3f}"), ("tokens_per_s", "tokens/s", "{:,.0f}"),
            ("peak_rss_mib", "peak RSS MiB", "{:,.0f}")]
    return run_per_dtype("train_target", __file__, args, child=_child, cols=cols,
                         forward=("steps", "warmup", "vocab_size", "batch_size", "seq_len"))


if __name__ == "__main__":
    sys.exit(main())
