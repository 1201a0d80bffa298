"""Shared helpers for benchmark scripts: machine/commit info, atomic JSON results, and the driver of
benchmarks that measure each compute dtype in a fresh process (`dtype_parser` + `run_per_dtype`)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = ["git_commit", "machine_info", "save_result", "run_children", "print_table", "dtype_parser",
           "run_per_dtype", "median_ms"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str | None:
    """HEAD commit of the repository (with '-dirty' when the tree has local changes), or None."""
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                        text=True, stderr=subprocess.DEVNULL).strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        return None


def machine_info(*, with_jax: bool = True) -> dict[str, Any]:
    """Platform, CPUs, accelerator and library versions — recorded with every result.

    `with_jax=False` (for a parent process whose children do the measuring) starts no JAX backend
    (no `jax_backend` / `devices`, so no accelerator is claimed) and imports no library: versions
    come from the installed package metadata.
    """
    info: dict[str, Any] = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    if with_jax:
        import jax

        info.update({"jax": jax.__version__, "jax_backend": jax.default_backend(),
                     "devices": [str(d) for d in jax.devices()]})
    info.update({"commit": git_commit(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    for mod in ("flax", "torch", "transformers") if with_jax else ("jax", "flax", "torch", "transformers"):
        try:
            info[mod] = __import__(mod).__version__ if with_jax else importlib.metadata.version(mod)
        except (ImportError, importlib.metadata.PackageNotFoundError):
            pass
    return info


def save_result(path: str, payload: dict[str, Any]) -> None:
    """Write `payload` as JSON atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)
    print(f"saved {path}")


def run_children(script: str, arg_lists: Iterable[Sequence[str]]) -> list[dict[str, Any]] | None:
    """Run `python script --child ARGS` once per entry of `arg_lists`, each in a fresh process.

    A fresh process per configuration makes `ru_maxrss` that configuration's peak. The repository
    is put on PYTHONPATH; a child prints its result as one line `RESULT <json>`. Returns the
    results in order, or None (after printing the tail of its stderr) when a child fails.
    """
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = []
    for args in arg_lists:
        cmd = [sys.executable, os.path.abspath(script), "--child", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return None
        runs.append(json.loads(proc.stdout.split("RESULT ", 1)[1]))
    return runs


def print_table(rows: Sequence[Mapping[str, Any]], cols: Sequence[tuple[str, str, str]]) -> None:
    """Print `rows` as a right-aligned table; `cols` = (key, header, format spec such as "{:.3f}")."""
    cells = [[c[1] for c in cols]] + [[fmt.format(r[k]) for k, _, fmt in cols] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    for i, row in enumerate(cells):
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def dtype_parser(description: str, *, dtypes: str, steps: int, steps_help: str, warmup_help: str,
                 out: str) -> argparse.ArgumentParser:
    """Flags of a per-dtype benchmark: --compute-dtype (comma list), --steps, --warmup, --vocab-size, --out."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--compute-dtype", default=dtypes, help="comma list (one subprocess each)")
    p.add_argument("--steps", type=int, default=steps, help=steps_help)
    p.add_argument("--warmup", type=int, default=2, help=warmup_help)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", default=out)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def run_per_dtype(name: str, script: str, args: argparse.Namespace, *, child: Callable[[argparse.Namespace], dict],
                  cols: Sequence[tuple[str, str, str]],
                  forward: Sequence[str] = ("steps", "warmup", "vocab_size")) -> int:
    """Body of a per-dtype benchmark's `main`: with `--child`, print `child(args)` as the `RESULT` line.

    Otherwise run the script once per `--compute-dtype` entry in a fresh process (passing on the
    flags named in `forward`), then print the table of `cols` and a machine line, and save
    {benchmark, machine, load averages, time, runs} to `--out`. Returns the exit status.
    """
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return 0
    machine, load_avg_at_start = machine_info(with_jax=False), os.getloadavg()
    passed = [a for key in forward for a in ("--" + key.replace("_", "-"), str(getattr(args, key)))]
    runs = run_children(script, [["--compute-dtype", dtype, *passed]
                                 for dtype in [d.strip() for d in args.compute_dtype.split(",") if d.strip()]])
    if runs is None:
        return 1
    result = {"benchmark": name, "machine": machine, "load_avg_at_start": load_avg_at_start,
              "load_avg_at_end": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": runs}
    print_table(runs, cols)
    print(f"machine: {machine['cpu_model']} ({machine['affinity_cpus']} CPUs), load avg {load_avg_at_start}")
    save_result(args.out, result)
    return 0


def median_ms(fn: Callable, *args: Any, reps: int) -> float:
    """Median wall time (ms) of `fn(*args)` over `reps` calls, after one compile + warm-up call
    (results are blocked on, so asynchronous dispatch is timed to completion)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
