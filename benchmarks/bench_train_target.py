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
import json
import os
import platform
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def _git_commit() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _machine() -> dict:
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_model": model,
            "cpu_count": os.cpu_count(), "affinity_cpus": len(os.sched_getaffinity(0)),
            "load_avg_at_start": os.getloadavg()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compute-dtype", default="float32,bfloat16", help="comma list (one subprocess each)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile step")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=0, help="0 = config default")
    p.add_argument("--seq-len", type=int, default=0, help="0 = config default")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_child(args)))
        return 0
    machine, runs = _machine(), []
    for dtype in [d.strip() for d in args.compute_dtype.split(",") if d.strip()]:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--compute-dtype", dtype,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--vocab-size", str(args.vocab_size),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        runs.append(json.loads(proc.stdout.split("RESULT ", 1)[1]))
    result = {"benchmark": "train_target", "git": _git_commit(), "machine": machine,
              "load_avg_at_end": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": runs}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    cols = [("compute_dtype", "dtype", "{}"), ("num_params", "params", "{:,}"), ("batch_size", "batch", "{}"),
            ("seq_len", "seq", "{}"), ("compile_plus_first_step_s", "compile s", "{:.1f}"),
            ("step_s_median", "step s (med)", "{:.3f}"), ("tokens_per_s", "tokens/s", "{:,.0f}"),
            ("peak_rss_mib", "peak RSS MiB", "{:,.0f}")]
    rows = [[c[1] for c in cols]] + [[fmt.format(r[k]) for k, _, fmt in cols] for r in runs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    for i, row in enumerate(rows):
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"machine: {machine['cpu_model']} ({machine['affinity_cpus']} CPUs), load avg {machine['load_avg_at_start']}")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
