"""Autoregressive decode speed: our jitted `infer.api.generate` vs transformers `generate()` on CPU.

Both sides load the same random-weight Qwen3 checkpoint (saved once with `save_pretrained`), run
greedy decoding (`do_sample=False`, no stop token, so exactly `--new-tokens` per row) on the same
random prompts, batch by batch size, interleaved rep by rep (so background load hits both alike).

Reported per side and batch size (medians over `--reps`):
  * e2e tok/s    = batch * new_tokens / wall time of one whole generate() call (prefill included),
  * decode tok/s = batch * (new_tokens - 1) / (wall(new_tokens) - wall(1)), i.e. prefill removed,
  * compile_s    = our one-off XLA compile per shape (reported separately, never in the timings).
Threads: XLA:CPU sizes its intra-op pool to the cores the process may run on, so `--threads N`
pins the whole process to N cores (sched_setaffinity, before JAX starts) and sets
torch.set_num_threads(N): both libraries then use exactly N threads on the same N cores. The
default is 1: on a small shared machine, 2+ OpenMP threads in PyTorch degrade badly whenever
another process holds a core (spin-wait barriers), which would flatter us.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_autoregressive.py            # default config
    PYTHONPATH=. .venv/bin/python benchmarks/bench_autoregressive.py --tiny     # smoke run

Writes a table to stdout and JSON to benchmarks/results/autoregressive_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _visible_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (model shape, workload, repetitions, output path)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=str, default="1,8")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="pin to this many cores; torch and XLA both use that many threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default=None,
                   help="JSON path (default benchmarks/results/autoregressive_cpu.json, or "
                        "autoregressive_cpu_<N>threads.json when --threads is not 1)")
    p.add_argument("--tiny", action="store_true", help="tiny model and workload (smoke test)")
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.hidden, args.heads, args.kv_heads, args.head_dim = 2, 64, 4, 2, 16
        args.intermediate, args.vocab, args.new_tokens, args.reps = 128, 512, 16, 2
    return args


def pin_cores(n: int) -> list[int]:
    """Restrict this process to the first `n` of its allowed cores; returns the cores kept."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cores:
        return []
    if not 1 <= n <= len(cores):
        raise SystemExit(f"--threads must be in [1, {len(cores)}], got {n}")
    os.sched_setaffinity(0, cores[:n])
    return cores[:n]


def git_commit() -> str | None:
    """`git rev-parse HEAD` of the repo (plus '-dirty' when the tree has local changes)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _rate(tokens: int, seconds: float) -> float:
    """tokens / seconds, NaN when the difference of medians is not positive (too noisy to tell)."""
    return tokens / seconds if seconds > 0 else float("nan")


def main(argv=None) -> int:
    """Run the benchmark; print the table and write the JSON result."""
    args = parse_args(argv)
    pinned = pin_cores(args.threads)  # before JAX creates its CPU thread pool
    import jax
    import numpy as np
    import torch
    import transformers

    from infer.api import generate, load_target_bundle

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    hf_config = transformers.Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=4096, tie_word_embeddings=False,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rng = np.random.RandomState(args.seed)
    prompts = {b: rng.randint(0, args.vocab, (b, args.prompt_len)).tolist() for b in batch_sizes}

    with tempfile.TemporaryDirectory(prefix="bench_ar_") as tmp:
        ref = transformers.Qwen3ForCausalLM(hf_config).to(torch.float32).eval()
        ref.save_pretrained(tmp)
        del ref
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        target = load_target_bundle(tmp, dtype="float32")
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"model: Qwen3 {args.layers}L hidden {args.hidden} heads {args.heads}/{args.kv_heads} "
          f"head_dim {args.head_dim} mlp {args.intermediate} vocab {args.vocab} = {n_params / 1e6:.1f}M params, float32",
          file=sys.stderr)
    print(f"threads: torch {torch.get_num_threads()}, XLA:CPU {_visible_cores()} visible cores, jax backend "
          f"{jax.default_backend()}", file=sys.stderr)

    def ours(b: int, n: int) -> tuple[float, float, list[list[int]]]:
        res = generate(target, prompts[b], max_new_tokens=n, stop_token_ids=[])
        assert all(len(t) == n for t in res.token_ids)
        return res.metrics["wall_s"], res.metrics["compile_s"], res.token_ids

    def theirs(b: int, n: int) -> tuple[float, list[list[int]]]:
        x = torch.tensor(prompts[b])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
        wall = time.perf_counter() - t0
        return wall, out[:, args.prompt_len:].tolist()

    rows = []
    for b in batch_sizes:
        n = args.new_tokens
        # Compile (ours) and warm up (both) outside the timed repetitions.
        _, compile_n, ours_ids = ours(b, n)
        _, compile_1, _ = ours(b, 1)
        _, hf_ids = theirs(b, n)
        theirs(b, 1)
        times = {"ours_n": [], "ours_1": [], "hf_n": [], "hf_1": []}
        for _ in range(args.reps):
            times["ours_n"].append(ours(b, n)[0])
            times["hf_n"].append(theirs(b, n)[0])
            times["ours_1"].append(ours(b, 1)[0])
            times["hf_1"].append(theirs(b, 1)[0])
        med = {k: statistics.median(v) for k, v in times.items()}
        match = float(np.mean([a == c for ra, rc in zip(ours_ids, hf_ids) for a, c in zip(ra, rc)]))
        row = {
            "batch": b, "prompt_len": args.prompt_len, "new_tokens": n, "reps": args.reps,
            "ours_e2e_tok_s": b * n / med["ours_n"], "hf_e2e_tok_s": b * n / med["hf_n"],
            "ours_decode_tok_s": _rate(b * (n - 1), med["ours_n"] - med["ours_1"]),
            "hf_decode_tok_s": _rate(b * (n - 1), med["hf_n"] - med["hf_1"]),
            "ours_prefill_s": med["ours_1"], "hf_prefill_s": med["hf_1"],
            "ours_wall_s": med["ours_n"], "hf_wall_s": med["hf_n"],
            "ours_compile_s": compile_n, "ours_compile_prefill_only_s": compile_1,
            "greedy_token_agreement": match, "times_s": times,
        }
        row["e2e_ratio"] = row["ours_e2e_tok_s"] / row["hf_e2e_tok_s"]
        row["decode_ratio"] = row["ours_decode_tok_s"] / row["hf_decode_tok_s"]
        rows.append(row)
        print(f"batch {b}: done", file=sys.stderr)

    header = (f"{'batch':>5} | {'ours e2e':>9} | {'HF e2e':>8} | {'ratio':>5} | {'ours dec':>9} | {'HF dec':>8} | "
              f"{'ratio':>5} | {'compile s':>9} | {'agree':>5}")
    print(f"tokens/s, median of {args.reps}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, "
          f"float32, {args.threads} threads")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['batch']:>5} | {r['ours_e2e_tok_s']:>9.1f} | {r['hf_e2e_tok_s']:>8.1f} | {r['e2e_ratio']:>5.2f} | "
              f"{r['ours_decode_tok_s']:>9.1f} | {r['hf_decode_tok_s']:>8.1f} | {r['decode_ratio']:>5.2f} | "
              f"{r['ours_compile_s']:>9.2f} | {r['greedy_token_agreement']:>5.2f}")

    result = {
        "benchmark": "autoregressive_cpu",
        "git_commit": git_commit(),
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "visible_cores": _visible_cores(), "python": platform.python_version(),
            "jax": jax.__version__, "jaxlib": __import__("jaxlib").__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "xla_threads": _visible_cores(), "pinned_cores": pinned,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
        "model": {"family": "qwen3", "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                  "kv_heads": args.kv_heads, "head_dim": args.head_dim, "intermediate": args.intermediate,
                  "vocab": args.vocab, "params": n_params, "dtype": "float32"},
        "settings": {"greedy": True, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "reps": args.reps, "statistic": "median", "seed": args.seed},
        "results": rows,
    }
    if not args.tiny:
        name = "autoregressive_cpu.json" if args.threads == 1 else f"autoregressive_cpu_{args.threads}threads.json"
        out = Path(args.out or REPO / "benchmarks" / "results" / name)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
