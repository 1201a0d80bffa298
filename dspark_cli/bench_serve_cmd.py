"""``dspark bench-serve``: open-loop Poisson load against a running `dspark serve` (or in process).

    dspark serve --slots 4 &                                   # in another shell
    dspark bench-serve --url http://127.0.0.1:8000 --requests 32 --rate 4 --max-tokens 64 --json out.json
    dspark bench-serve --in-process --slots 4 --requests 32 --rate 4 --max-tokens 64   # same load, no HTTP

Requests arrive with exponential inter-arrival times (mean 1/rate; ``--rate inf`` sends them all at
once), each streaming one completion (temperature ``--temperature``, ``ignore_eos`` so every request
produces exactly ``--max-tokens`` tokens). Per request: time to first token (first streamed text),
time per output token after it, τ and verify budget from the response's ``usage.speculative``.
The JSON record follows the engine benchmark's schema (issue 11): ``{"results": [{"policy",
"concurrency", "throughput_tok_s", "per_user_tok_s", "ttft_ms_p50", "tpot_ms_p50",
"mean_verify_budget", "tau", ...}], "machine": {...}}``; `--in-process` drives the same engine
through the server's `EngineRunner` without HTTP, which measures the HTTP layer's overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

from dspark_cli.errors import CliError, check_output_file, log, positive_int, run_command

__all__ = ["build_parser", "main", "summarize", "DEFAULT_PROMPTS"]

PROG = "dspark bench-serve"
DEFAULT_PROMPTS = (
    'import os\nimport sys\n\n\ndef main(argv):\n    """Entry point."""\n',
    "def fibonacci(n):\n",
    "class Stack:\n    def __init__(self):\n",
    "The json module provides",
    "def read_lines(path):\n    with open(path) as f:\n",
    "import re\n\n\ndef tokenize(text):\n",
)


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"rate must be > 0 requests/s (or inf), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``dspark bench-serve``."""
    p = argparse.ArgumentParser(prog=PROG, description="Poisson load test of the OpenAI-compatible server (or of the "
                                "same engine in process).")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running `dspark serve`, e.g. http://127.0.0.1:8000")
    where.add_argument("--in-process", action="store_true", help="build the engine here (same options as dspark serve)")
    p.add_argument("--target", metavar="DIR", help="--in-process: target directory (default: the bundled pair)")
    p.add_argument("--draft", metavar="DIR", help="--in-process: drafter directory")
    p.add_argument("--policy", default=None, help="--in-process: scheduling policy (default dspark / ar)")
    p.add_argument("--slots", type=positive_int, default=4, help="--in-process: engine slots (default 4)")
    p.add_argument("--max-len", type=positive_int, default=None, help="--in-process: tokens per slot (as dspark serve)")
    p.add_argument("--requests", type=positive_int, default=32, help="requests to send (default 32)")
    p.add_argument("--rate", type=_rate, default=4.0, help="mean arrival rate, requests/s (default 4; inf = burst)")
    p.add_argument("--max-tokens", type=positive_int, default=64, help="tokens per request (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--prompts", metavar="FILE", help="JSONL prompts ({'turns': [...]} or {'token_ids': [...]}); "
                   "default: a few built-in code/prose prompts")
    p.add_argument("--warmup", type=int, default=8, metavar="N",
                   help="first send a burst of N unmeasured requests (compiles the engine's round buckets; default 8)")
    p.add_argument("--seed", type=int, default=0, help="arrival-time and prompt-order seed")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--json", metavar="FILE", help="write the result record here")
    return p


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def summarize(records: list[dict[str, Any]], makespan_s: float) -> dict[str, Any]:
    """Aggregate per-request records ({ok, tokens, ttft_s, tpot_s, e2e_s, tau, budget, in_flight}) into one row."""
    ok = [r for r in records if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft_s"] * 1e3 for r in ok if r["ttft_s"] is not None]
    tpot = [r["tpot_s"] * 1e3 for r in ok if r["tpot_s"] is not None]
    decode_speeds = [1.0 / r["tpot_s"] for r in ok if r["tpot_s"]]
    taus = [r["tau"] for r in ok if r.get("tau") is not None]
    budgets = [r["budget"] for r in ok if r.get("budget") is not None]
    return {
        "requests": len(records), "ok": len(ok), "rejected_429": sum(r.get("status") == 429 for r in records),
        "errors": sum(not r["ok"] and r.get("status") != 429 for r in records),
        "concurrency": max((r.get("in_flight", 1) for r in records), default=0),
        "tokens": tokens, "makespan_s": makespan_s,
        "throughput_tok_s": tokens / makespan_s if makespan_s > 0 else None,
        "per_user_tok_s": statistics.mean(decode_speeds) if decode_speeds else None,
        "ttft_ms_p50": _pct(ttft, 50), "ttft_ms_p90": _pct(ttft, 90), "ttft_ms_p99": _pct(ttft, 99),
        "tpot_ms_p50": _pct(tpot, 50), "tpot_ms_p90": _pct(tpot, 90), "tpot_ms_p99": _pct(tpot, 99),
        "e2e_ms_p50": _pct([r["e2e_s"] * 1e3 for r in ok], 50),
        "mean_verify_budget": statistics.mean(budgets) if budgets else None,
        "tau": statistics.mean(taus) if taus else None,
    }


class _InFlight:
    def __init__(self):
        self.now = self.peak = 0

    def __enter__(self):
        self.now += 1
        self.peak = max(self.peak, self.now)
        return self.now

    def __exit__(self, *exc):
        self.now -= 1


async def _http_one(client, url: str, model: str | None, prompt, args, gauge: _InFlight) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True,
            "ignore_eos": True, "seed": random.randrange(2 ** 31)}
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    first = last = None
    usage: dict[str, Any] = {}
    with gauge as in_flight:
        async with client.stream("POST", url + "/v1/completions", json=body, timeout=args.timeout) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return {"ok": False, "status": resp.status_code, "error": resp.text[:200], "in_flight": in_flight}
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "status": 500, "error": chunk["error"].get("message"), "in_flight": in_flight}
                now = time.perf_counter()
                if first is None and chunk["choices"][0].get("text"):
                    first = now
                last = now
                usage = chunk.get("usage") or usage
    return _record(t0, first, last, usage, in_flight)


def _record(t0, first, last, usage, in_flight) -> dict[str, Any]:
    n = usage.get("completion_tokens", 0)
    spec = usage.get("speculative") or {}
    tpot = (last - first) / (n - 1) if first is not None and last is not None and n > 1 else None
    return {"ok": True, "status": 200, "tokens": n, "ttft_s": None if first is None else first - t0, "tpot_s": tpot,
            "e2e_s": (last or time.perf_counter()) - t0, "tau": spec.get("acceptance_length"),
            "budget": spec.get("mean_verify_budget"), "in_flight": in_flight}


async def _local_one(runner, tokenizer, prompt, args, gauge: _InFlight) -> dict[str, Any]:
    from dspark_jax.sampling import SamplingConfig
    from infer.engine import Request

    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    req = Request(prompt=ids, max_new_tokens=args.max_tokens, sampling=SamplingConfig(temperature=args.temperature),
                  seed=random.randrange(2 ** 31), stop_token_ids=[])
    t0 = time.perf_counter()
    first = last = None
    with gauge as in_flight:
        handle = await runner.submit(req)
        async for out in handle:
            now = time.perf_counter()
            if first is None and out.new_token_ids:
                first = now
            last = now
    m = handle.last.metrics
    usage = {"completion_tokens": len(handle.last.token_ids),
             "speculative": {"acceptance_length": m.get("tau"), "mean_verify_budget": m.get("mean_verify_budget")}}
    return _record(t0, first, last, usage, in_flight)


async def _drive(one, prompts: list, args) -> tuple[list[dict[str, Any]], float]:
    if args.warmup > 0:
        gauge = _InFlight()
        await asyncio.gather(*(one(prompts[i % len(prompts)], gauge) for i in range(args.warmup)))
    rng = random.Random(args.seed)
    random.seed(args.seed + 1)
    order = [prompts[rng.randrange(len(prompts))] for _ in range(args.requests)]
    gaps = [0.0 if math.isinf(args.rate) else rng.expovariate(args.rate) for _ in range(args.requests)]
    gauge = _InFlight()

    async def fire(i: int, at: float):
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
        try:
            return await one(order[i], gauge)
        except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
            return {"ok": False, "status": None, "error": f"{type(e).__name__}: {e}"}

    start = time.perf_counter()
    arrivals = [sum(gaps[: i + 1]) for i in range(args.requests)]
    records = await asyncio.gather(*(fire(i, a) for i, a in enumerate(arrivals)))
    return list(records), time.perf_counter() - start


def _machine() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"platform": platform.platform(), "python": platform.python_version(), "processor": platform.processor(),
            "commit": commit or None}


def _load_prompts(path: str | None) -> list:
    if path is None:
        return list(DEFAULT_PROMPTS)
    from infer.evaluate import read_prompt_file

    prompts = read_prompt_file(path)
    if not prompts:
        raise CliError(f"--prompts {path}: no prompts")
    return prompts


def _bench(args: argparse.Namespace) -> int:
    import httpx

    if args.json:
        check_output_file(args.json, "--json")
    if args.temperature < 0:
        raise CliError(f"--temperature must be >= 0, got {args.temperature}")
    prompts = _load_prompts(args.prompts)
    if args.url:
        url = args.url.rstrip("/")
        try:
            info = httpx.get(url + "/health", timeout=10).json()
        except (httpx.HTTPError, ValueError) as e:
            raise CliError(f"--url {args.url}: no dspark server answers /health ({e})") from None
        policy, mode = info.get("policy", "?"), "http"

        async def go():
            limits = httpx.Limits(max_connections=args.requests, max_keepalive_connections=args.requests)
            async with httpx.AsyncClient(limits=limits, timeout=args.timeout) as client:
                return await _drive(lambda p, g: _http_one(client, url, info.get("model"), p, args, g), prompts, args)

        log(f"{args.requests} requests at {args.rate:g}/s against {url} ({info.get('model')}, policy {policy})")
        records, makespan = asyncio.run(go())
    else:
        from dspark_cli.serve_cmd import build_parser as serve_parser, build_server

        sargs = serve_parser().parse_args(
            [*(["--target", args.target] if args.target else []), *(["--draft", args.draft] if args.draft else []),
             *(["--policy", args.policy] if args.policy else []), "--slots", str(args.slots),
             *(["--max-len", str(args.max_len)] if args.max_len else []),
             "--max-queue", str(max(args.requests, 1))])
        _app, runner, what = build_server(sargs)
        policy, mode = runner.engine.policy.kind, "in-process"
        tokenizer = runner.engine.target.tokenizer

        async def go():
            try:
                return await _drive(lambda p, g: _local_one(runner, tokenizer, p, args, g), prompts, args)
            finally:
                await runner.shutdown(grace_s=0)

        log(f"{args.requests} requests at {args.rate:g}/s in process ({what})")
        records, makespan = asyncio.run(go())
    row = {"policy": policy, "mode": mode, "rate": args.rate, "max_tokens": args.max_tokens, **summarize(records,
                                                                                                        makespan)}
    failed = [r for r in records if not r["ok"] and r.get("status") != 429]  # 429s are a result, counted in the row
    if row["rejected_429"]:
        log(f"{row['rejected_429']} request(s) refused with 429 (queue full)")
    if failed:
        log(f"{len(failed)} request(s) failed, first: {failed[0].get('status')} {failed[0].get('error')}")
    keys = ("policy", "mode", "ok", "concurrency", "throughput_tok_s", "per_user_tok_s", "ttft_ms_p50", "ttft_ms_p99",
            "tpot_ms_p50", "tpot_ms_p99", "mean_verify_budget", "tau")
    print(" | ".join(keys))
    print(" | ".join(f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in keys))
    record = {"results": [row], "machine": _machine(), "command": " ".join(["dspark", "bench-serve", *sys.argv[2:]])}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        log(f"wrote {args.json}")
    return 0 if not failed else 1  # exit 1 when a request failed other than by a 429


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dspark bench-serve``; returns the exit status."""
    return run_command(PROG, build_parser(), _bench, argv)


if __name__ == "__main__":
    sys.exit(main())
