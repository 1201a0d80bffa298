"""``dspark generate``: generate continuations of prompts with a target model.

    dspark generate --target DIR --prompt "def fib(n):" --max-new-tokens 64
    dspark generate --target DIR --prompts-file prompts.txt --batch-size 8 --temperature 0.7 --top-p 0.9
    dspark generate --target DIR --prompt hi --json          # one JSON object on stdout
    dspark generate --target DIR --prompt hi --mesh 1,1,8    # shard the target over 8 devices

Prompts are grouped into batches of ``--batch-size`` (one compiled program per batch shape; the
last partial batch is padded with copies of its last prompt, whose outputs are dropped, so it
reuses that program). Batch ``i`` uses seed ``--seed + i``. stdout carries only the results;
progress and log lines go to stderr. Expected failures (bad options, missing files, invalid
checkpoints, invalid sampling values) print ``dspark generate: error: <message>`` to stderr and return 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Sequence

from dspark_cli.errors import CliError, check_text, log, positive_int, read_text_lines, run_command, seed_int

__all__ = ["build_parser", "main", "read_prompts_file", "parse_mesh"]

PROG = "dspark generate"
def parse_mesh(text: str) -> tuple[int, int, int]:
    """``"data,fsdp,model"`` (e.g. ``"1,1,8"``) -> three positive ints; CliError otherwise."""
    parts = [p.strip() for p in text.split(",")]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise CliError(f"--mesh expects three positive integers DATA,FSDP,MODEL (e.g. 1,1,8), got {text!r}")
    return sizes  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``dspark generate``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Generate continuations of one or more prompts with a Qwen3/Llama target "
                    "(Hugging Face layout directory: config.json, *.safetensors, tokenizer.json).",
    )
    p.add_argument("--target", metavar="DIR",
                   help="target model directory (default: the bundled pystd target + DSpark drafter, "
                        "run side by side with autoregressive decoding)")
    p.add_argument("--draft", metavar="DIR", default=None,
                   help="DeepSpec-layout draft directory: decode speculatively (lossless; same output distribution)")
    spec = p.add_argument_group("speculative decoding (with --draft)")
    spec.add_argument("--block-size", type=positive_int, default=None, metavar="K",
                      help="drafts per round, <= the checkpoint's block_size (default: the checkpoint's)")
    spec.add_argument("--confidence-threshold", type=float, default=None, metavar="C",
                      help="verify drafts up to the first slot whose confidence is below C (reference rule; 0 = off)")
    spec.add_argument("--survival-threshold", type=float, default=None, metavar="S",
                      help="verify drafts while the cumulative (STS-calibrated) survival is >= S (0 = off)")
    spec.add_argument("--compare", action="store_true",
                      help="also decode autoregressively and report both speeds and the speed-up "
                           "(default when no --target is given)")
    src = p.add_argument_group("prompts (at least one)")
    src.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                     help="a prompt (repeatable)")
    src.add_argument("--prompts-file", metavar="FILE", default=None,
                     help="one prompt per line, or JSONL with {\"turns\": [...]} (first turn is used)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, metavar="N",
                   help="tokens to generate per prompt, stop token included (default 128)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples from softmax(logits / temperature)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1 = off (default)")
    p.add_argument("--seed", type=seed_int, default=0, help="sampling seed (batch i uses seed + i; default 0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="parameter/activation dtype (default: the checkpoint's dtype)")
    p.add_argument("--mesh", type=str, default=None, metavar="DATA,FSDP,MODEL",
                   help="shard the target over a device mesh, e.g. 1,1,8 (product = number of devices)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="B",
                   help="prompts decoded together (default 8)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at the model's stop tokens (always generate --max-new-tokens)")
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON object {results, metrics} on stdout")
    return p


def read_prompts_file(path: str) -> list[str]:
    """Prompts from `path`: JSONL records with a ``turns`` list (first turn used), else one per line.

    The file is read as JSONL when its name ends in ``.jsonl`` or when every non-blank line is a
    JSON object with ``turns``. Blank lines are skipped in both formats.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file not found: {path!r}")
    lines = read_text_lines(path)
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    if not numbered:
        raise CliError(f"prompts file {path!r} contains no prompts")
    if path.endswith(".jsonl") or all(_is_turns_record(ln) for _, ln in numbered):
        prompts = []
        for lineno, ln in numbered:
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError as e:
                raise CliError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            turns = rec.get("turns") if isinstance(rec, dict) else None
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                raise CliError(f"{path}:{lineno}: expected an object with a non-empty 'turns' list of strings")
            prompts.append(check_text(turns[0], f"{path}:{lineno}"))
        return prompts
    return [ln for _, ln in numbered]


def _is_turns_record(line: str) -> bool:
    if not line.lstrip().startswith("{"):
        return False
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(rec, dict) and "turns" in rec


def _load_draft(draft_dir: str, target: Any, dtype: str | None = None) -> Any:
    """SPECULATIVE HOOK: load the drafter in `draft_dir` for `infer.api.generate(draft=...)`.

    Uses `infer.speculative_api.load_draft_bundle(draft_dir, target, dtype=...)`. Speculative options
    (block size, confidence thresholds) are for the speculative-decoding engineer to add here and
    pass through `generate(**speculative_options)`. If that module cannot be imported this raises
    a clear CliError ('speculative decoding not available') instead of a traceback.
    """
    try:
        from infer import speculative_api
    except ImportError as e:
        raise CliError(f"speculative decoding not available ({e}); run without --draft") from None
    loader = getattr(speculative_api, "load_draft_bundle", None)
    if loader is None:
        raise CliError("speculative decoding not available: infer.speculative_api has no load_draft_bundle()")
    return loader(draft_dir, target=target, dtype=dtype)


def _batches(prompts: list[str], batch_size: int) -> list[tuple[list[str], int]]:
    """(batch prompts, number of real prompts) per batch; partial last batch padded when > 1 batch."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        real = len(chunk)
        if len(prompts) > batch_size and real < batch_size:
            chunk = chunk + [chunk[-1]] * (batch_size - real)
        out.append((chunk, real))
    return out


def _run(args: argparse.Namespace) -> int:
    # Validate everything cheap before importing JAX or loading weights.
    if not args.target:
        if args.draft:
            raise CliError("--draft needs --target (the drafter must match its target)")
        from infer.demo import DEFAULT_PROMPT, bundled_paths

        args.target, args.draft = bundled_paths()
        args.compare = True
        if not args.prompt and not args.prompts_file:
            args.prompt = [DEFAULT_PROMPT]
    if args.compare and not args.draft:
        raise CliError("--compare needs --draft DIR (it compares speculative with autoregressive decoding)")
    if not args.draft:
        given = [flag for flag, value in (("--block-size", args.block_size),
                                          ("--confidence-threshold", args.confidence_threshold),
                                          ("--survival-threshold", args.survival_threshold)) if value is not None]
        if given:
            raise CliError(f"{', '.join(given)} only apply to speculative decoding: add --draft DIR or drop "
                           f"{'them' if len(given) > 1 else 'it'}")
    if not os.path.isdir(args.target):
        raise FileNotFoundError(f"--target directory not found: {args.target!r}")
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    if not prompts:
        raise CliError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    for i, p in enumerate(prompts):
        check_text(p, f"prompt {i}")
        if not p.strip():
            raise CliError(f"prompt {i} is empty")
    mesh_sizes = parse_mesh(args.mesh) if args.mesh else None
    if args.draft is not None and not os.path.isdir(args.draft):
        raise FileNotFoundError(f"--draft directory not found: {args.draft!r}")

    from dspark_jax.sampling import SamplingConfig

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)

    import contextlib

    import jax

    from infer.api import generate, load_target_bundle

    shardings, mesh_ctx = None, contextlib.nullcontext()
    if mesh_sizes is not None:
        from dspark_jax.config import load_hf_config
        from dspark_jax.sharding import make_mesh, target_param_shardings

        data, fsdp, model = mesh_sizes
        try:
            mesh = make_mesh(data=data, fsdp=fsdp, model=model)
        except ValueError as e:
            raise CliError(f"--mesh {args.mesh}: {e}") from None
        shardings = target_param_shardings(load_hf_config(args.target, dtype=args.dtype), mesh)
        mesh_ctx = jax.set_mesh(mesh)

    t0 = time.perf_counter()
    target = load_target_bundle(args.target, dtype=args.dtype, shardings=shardings)
    load_s = time.perf_counter() - t0
    if target.tokenizer is None:
        raise CliError(f"{args.target!r} has no tokenizer.json; text prompts need one")
    log(f"loaded {target.config.family} target from {args.target} in {load_s:.2f}s "
         f"({target.config.num_hidden_layers} layers, dtype {target.config.dtype}"
         f"{', mesh ' + args.mesh if args.mesh else ''})")
    draft = _load_draft(args.draft, target, args.dtype) if args.draft else None
    stop_ids = [] if args.ignore_eos else None
    spec_kw: dict[str, Any] = {}
    if draft is not None:
        spec_kw = dict(block_size=args.block_size, confidence_threshold=args.confidence_threshold or 0.0,
                       survival_threshold=args.survival_threshold or 0.0)
    if args.compare:
        with mesh_ctx:
            return _compare(args, target, draft, prompts, sampling, stop_ids, spec_kw, load_s)

    from tqdm import tqdm

    batches = _batches(prompts, args.batch_size)
    results: list[dict[str, Any]] = []
    per_batch: list[dict[str, Any]] = []
    with mesh_ctx:
        bar = tqdm(batches, desc="generate", unit="batch", file=sys.stderr,
                   disable=len(batches) <= 1, dynamic_ncols=True)
        for i, (chunk, real) in enumerate(bar):
            kw = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed + i,
                      stop_token_ids=stop_ids)
            if draft is not None:
                kw.update(draft=draft, **spec_kw)
            res = generate(target, chunk, **kw)
            metrics = dict(res.metrics)
            if real < len(chunk):  # padded last batch: count only the real rows
                metrics["tokens"] = sum(len(t) for t in res.token_ids[:real])
            per_batch.append(metrics)
            for j in range(real):
                results.append({"prompt": chunk[j], "text": res.texts[j] if res.texts else None,
                                "token_ids": [int(t) for t in res.token_ids[j]]})
            bar.set_postfix(tok_s=f"{metrics['tokens'] / max(metrics['wall_s'], 1e-9):.1f}")

    tokens = sum(m["tokens"] for m in per_batch)
    wall = sum(m["wall_s"] for m in per_batch)
    summary: dict[str, Any] = {
        "mode": per_batch[0].get("mode", "autoregressive"),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else math.inf,
        "compile_s": sum(m.get("compile_s", 0.0) for m in per_batch),
        "load_s": load_s,
        "num_prompts": len(prompts),
        "num_batches": len(batches),
        "batch_size": args.batch_size,
        "dtype": target.config.dtype,
        "mesh": list(mesh_sizes) if mesh_sizes else None,
        "backend": jax.default_backend(),
        "batches": per_batch,
    }
    if draft is not None:
        summary.update(aggregate_speculative(per_batch))
    if args.json:
        json.dump({"results": results, "metrics": summary}, sys.stdout, default=_json_default)
        sys.stdout.write("\n")
    else:
        for k, r in enumerate(results):
            print(f"=== [{k}] {r['prompt']}")
            print(r["text"])
        print(f"--- {tokens} tokens in {wall:.3f}s ({summary['tokens_per_s']:.1f} tok/s), "
              f"compile {summary['compile_s']:.2f}s, load {load_s:.2f}s, {summary['mode']}", file=sys.stderr)
    sys.stdout.flush()
    return 0


def aggregate_speculative(per_batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Round-weighted speculative metrics over batches (tau, verify rate, per-position acceptance)."""
    rounds = sum(m["rounds"] for m in per_batch)
    if rounds == 0:
        return {"rounds": 0, "acceptance_length": None, "verify_rate": None}
    tau = sum(m["acceptance_length"] * m["rounds"] for m in per_batch if m["rounds"])
    proposed = sum(m["draft_tokens_per_proposal"] * m["rounds"] for m in per_batch if m["rounds"])
    k = len(per_batch[0]["accept_rate"])

    def pooled(key: str) -> list[float | None]:
        # Weight each batch's per-slot rate by its rounds (exact when proposals are fixed-length).
        out = []
        for j in range(k):
            num = [(m[key][j], m["rounds"]) for m in per_batch if m[key][j] is not None]
            out.append(sum(v * w for v, w in num) / sum(w for _, w in num) if num else None)
        return out

    return {"rounds": rounds, "acceptance_length": tau / rounds, "verify_rate": tau / (proposed + rounds),
            "draft_tokens_per_proposal": proposed / rounds, "accept_rate": pooled("accept_rate"),
            "conditional_accept_rate": pooled("conditional_accept_rate")}


def _compare(args, target, draft, prompts, sampling, stop_ids, spec_kw, load_s) -> int:
    """Speculative vs autoregressive side by side on the same prompts (compile time excluded)."""
    from infer.demo import side_by_side

    report = side_by_side(target, draft, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                          seed=args.seed, repeats=2, stop_token_ids=stop_ids, **spec_kw)
    report["load_s"] = load_s
    if args.json:
        results = [{"prompt": p, "text": t, "token_ids": ids}
                   for p, t, ids in zip(prompts, report.pop("texts"), report.pop("token_ids"))]
        json.dump({"results": results, "metrics": report}, sys.stdout, default=_json_default)
        sys.stdout.write("\n")
        return 0
    for k, (p, t) in enumerate(zip(prompts, report["texts"])):
        print(f"=== [{k}] prompt:\n{p}")
        print(f"=== [{k}] continuation:\n{t}")
    acc = " ".join(f"{a:.2f}" if a is not None else "-" for a in report["accept_rate"])
    print(f"\n--- speculative (DSpark, K={report['block_size']}) vs autoregressive, same target, compile excluded")
    print(f"autoregressive : {report['autoregressive_tokens_per_s']:8.1f} tok/s")
    print(f"speculative    : {report['speculative_tokens_per_s']:8.1f} tok/s   speed-up {report['speedup']:.2f}x")
    print(f"acceptance length tau = {report['acceptance_length']:.2f}, verify rate {report['verify_rate']:.2f}")
    print(f"accept rate per position: {acc}")
    print(f"one round costs {report['round_over_ar_step']:.2f} autoregressive steps here: speculative decoding "
          f"is faster when tau exceeds that")
    if report["greedy_outputs_equal"] is not None:
        print(f"greedy outputs identical: {report['greedy_outputs_equal']}")
    return 0


def _json_default(obj: Any) -> Any:
    """JSON for numpy scalars/arrays that may appear in metrics."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dspark generate`` with `argv` (the arguments after ``generate``); return exit status.

    ``--help`` raises SystemExit(0) and argparse usage errors SystemExit(2); expected runtime
    errors print ``dspark generate: error: <message>`` to stderr and return 2.
    """
    return run_command(PROG, build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
