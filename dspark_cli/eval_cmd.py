"""``dspark eval``: acceptance length, acceptance rates and speed-up of drafters on prompt sets.

    dspark eval --target TARGET_DIR --draft dspark=DRAFT_DIR --draft dflash=OTHER_DIR \\
        --datasets eval_prompts/mbpp.jsonl eval_prompts/gsm8k.jsonl corpus:code --corpus CORPUS_DIR \\
        --block-sizes 3,7 --temperature 1.0 --max-new-tokens 256 --max-prompts 64 --batch-size 1 --out OUT

Datasets are reference JSONL files (``{"turns": [...]}``, first turn; or ``{"token_ids": [...]}``) or
``corpus:DOMAIN[:SPLIT]`` (prefixes of ``--corpus-prompt-tokens`` tokens of held-out documents; split
``test`` by default). For every dataset x drafter x block size the speculative loop and plain decoding run
on the same prompts (see `infer.evaluate`). Writes ``OUT/results.json`` and ``OUT/results.md``
(and ``OUT/rounds/*.npz`` with ``--save-rounds``). Expected failures print ``dspark eval: error: <message>``
and return 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Sequence

from dspark_cli.errors import CliError, check_dir, check_output_dir, log, positive_int, run_command, seed_int

__all__ = ["build_parser", "eval_main", "parse_int_list", "parse_draft_arg", "format_results_markdown",
           "to_jsonable", "fmt_num", "add_common_options", "eval_config_from_args", "precheck_datasets"]

PROG = "dspark eval"


def parse_int_list(text: str, option: str = "--block-sizes") -> tuple[int, ...]:
    """``"3,7"`` -> (3, 7); CliError unless all are positive integers."""
    try:
        values = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise CliError(f"{option} expects comma-separated positive integers (e.g. 3,7), got {text!r}")
    return values


def parse_draft_arg(text: str) -> tuple[str, str]:
    """``NAME=DIR`` -> (NAME, DIR); a bare ``DIR`` is named after its last path component."""
    name, sep, path = text.partition("=")
    if not sep:
        path, name = text, os.path.basename(os.path.normpath(text))
    if not name or not path:
        raise CliError(f"--draft expects NAME=DIR or DIR, got {text!r}")
    return name, path


def add_common_options(p: argparse.ArgumentParser, *, max_new_tokens: int = 256) -> None:
    """Options shared by ``dspark eval`` and ``dspark calibrate``."""
    p.add_argument("--target", metavar="DIR", required=True, help="target model directory (HF layout)")
    p.add_argument("--corpus", metavar="DIR", default=None, help="built corpus directory for corpus:DOMAIN datasets")
    p.add_argument("--corpus-prompt-tokens", type=positive_int, default=64, metavar="N",
                   help="prompt length (tokens) of corpus:DOMAIN datasets (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default 1.0)")
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, metavar="N",
                   help=f"tokens generated per prompt (default {max_new_tokens})")
    p.add_argument("--max-prompts", type=positive_int, default=None, metavar="N",
                   help="use at most N prompts per dataset, after shuffling (default all)")
    p.add_argument("--batch-size", type=positive_int, default=1, metavar="B",
                   help="prompts decoded together (default 1 = per-prompt seeds seed+i as in the reference)")
    p.add_argument("--seed", type=seed_int, default=0, help="base seed (batch starting at prompt i uses seed + i)")
    p.add_argument("--no-shuffle", action="store_true", help="keep file order instead of the reference shuffle")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="parameter dtype (default: the checkpoint's dtype)")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``dspark eval``."""
    p = argparse.ArgumentParser(prog=PROG, description="Evaluate drafters: tau, verify rate, per-position "
                                "acceptance, tokens/s and speed-up over autoregressive decoding.")
    p.add_argument("--draft", action="append", required=True, metavar="NAME=DIR",
                   help="a drafter checkpoint, optionally named (repeatable)")
    p.add_argument("--datasets", nargs="+", required=True, metavar="FILE|corpus:DOMAIN",
                   help="prompt sets: JSONL files or corpus:DOMAIN[:SPLIT]")
    p.add_argument("--block-sizes", default=None, metavar="K[,K...]",
                   help="drafts per round to evaluate (default: each checkpoint's block size)")
    p.add_argument("--no-autoregressive", action="store_true", help="skip the autoregressive baseline")
    p.add_argument("--save-rounds", action="store_true", help="also write the recorded rounds (OUT/rounds/*.npz)")
    add_common_options(p)
    return p


def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy values to Python and non-finite floats to None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def fmt_num(x: Any, digits: int = 2) -> str:
    """`x` with `digits` decimals; an en dash for None / non-finite."""
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def format_results_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown tables: speed/acceptance per row, per-position rates, and confidence calibration."""
    out = ["| dataset | drafter | K | τ | verify rate | drafts/round | spec tok/s | AR tok/s | speed-up |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ar = r.get("autoregressive") or {}
        out.append(f"| {r['dataset']} | {r['drafter']} | {r['block_size']} | {fmt_num(r['acceptance_length'])} | "
                   f"{fmt_num(r['verify_rate'], 3)} | {fmt_num(r['draft_tokens_per_proposal'])} | "
                   f"{fmt_num(r['speculative']['tokens_per_s'], 1)} | {fmt_num(ar.get('tokens_per_s'), 1)} | "
                   f"{fmt_num(r.get('speedup'))}x |")
    out += ["", "Per-position acceptance (unconditional accept@k / conditional accept@k):", "",
            "| dataset | drafter | K | unconditional | conditional |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['dataset']} | {r['drafter']} | {r['block_size']} | "
                   f"{' '.join(fmt_num(x) for x in r['accept_rate'])} | "
                   f"{' '.join(fmt_num(x) for x in r['conditional_accept_rate'])} |")
    cal = [r for r in rows if r.get("calibration")]
    if cal:
        out += ["", "Confidence calibration (survival predictions, count-weighted over positions):", "",
                "| dataset | drafter | K | ECE raw | ECE STS | AUC | Brier raw | pred mean | target mean |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in cal:
            raw, sts = r["calibration"]["raw"], r["calibration"].get("calibrated") or {}
            vals = [fmt_num(raw["ece_mean"], 4), fmt_num(sts.get("ece_mean"), 4), fmt_num(raw["auc_mean"], 3),
                    fmt_num(raw["brier_mean"], 4), fmt_num(raw["pred_mean"], 3), fmt_num(raw["target_mean"], 3)]
            out.append(f"| {r['dataset']} | {r['drafter']} | {r['block_size']} | " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


def eval_config_from_args(args: argparse.Namespace, block_sizes: tuple[int, ...] | None = None):
    """`infer.evaluate.EvalConfig` from the common options."""
    from infer.evaluate import REFERENCE_SHUFFLE_SEED, EvalConfig

    try:
        return EvalConfig(block_sizes=block_sizes, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                          max_prompts=args.max_prompts, batch_size=args.batch_size, seed=args.seed,
                          shuffle_seed=None if args.no_shuffle else REFERENCE_SHUFFLE_SEED, corpus_dir=args.corpus,
                          corpus_prompt_tokens=args.corpus_prompt_tokens,
                          autoregressive=not getattr(args, "no_autoregressive", False))
    except ValueError as e:
        raise CliError(str(e)) from None


def precheck_datasets(specs: Sequence[str], option: str, corpus_dir: str | None) -> None:
    """Validate dataset specs and prompt files before any model is loaded (fast, clear errors)."""
    from infer.evaluate import parse_dataset_spec, read_prompt_file

    for spec in specs:
        info = parse_dataset_spec(spec)
        if info["kind"] == "file":
            read_prompt_file(info["path"])
        elif corpus_dir is None:
            raise CliError(f"{option} {spec}: corpus datasets need --corpus DIR")
        else:
            check_dir(corpus_dir, "--corpus")


def _run(args: argparse.Namespace) -> int:
    check_dir(args.target, "--target")
    check_output_dir(args.out, "--out")
    drafts_arg = [parse_draft_arg(d) for d in args.draft]
    names = [n for n, _ in drafts_arg]
    if len(set(names)) != len(names):
        raise CliError(f"duplicate drafter names in --draft: {names}")
    for _, path in drafts_arg:
        check_dir(path, "--draft")
    sizes = parse_int_list(args.block_sizes) if args.block_sizes else None
    config = eval_config_from_args(args, sizes)
    precheck_datasets(args.datasets, "--datasets", args.corpus)

    import jax

    from infer.api import load_target_bundle
    from infer.evaluate import check_block_sizes, evaluate, load_dataset
    from infer.speculative_api import load_draft_bundle

    target = load_target_bundle(args.target, dtype=args.dtype)
    drafts = {name: load_draft_bundle(path, target, dtype=args.dtype) for name, path in drafts_arg}
    try:
        check_block_sizes(sizes, drafts)
    except ValueError as e:
        raise CliError(f"--block-sizes: {e}") from None
    datasets = [load_dataset(spec, target, config) for spec in args.datasets]
    if len({d.name for d in datasets}) != len(datasets):
        raise CliError(f"datasets have clashing names: {[d.name for d in datasets]}")
    t0 = time.perf_counter()
    result = evaluate(target, drafts, datasets, config, log=log)
    os.makedirs(args.out, exist_ok=True)
    doc = {"target": args.target, "drafts": dict(drafts_arg),
           "datasets": {d.name: {"source": d.source, "num_prompts": len(d.prompts)} for d in datasets},
           "config": {k: v for k, v in vars(config).items()}, "backend": jax.default_backend(),
           "elapsed_s": time.perf_counter() - t0, "rows": result.rows}
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(to_jsonable(doc), f, indent=2)
        f.write("\n")
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"# dspark eval\n\ntarget `{args.target}`, temperature {config.temperature}, "
                f"max_new_tokens {config.max_new_tokens}, batch size {config.batch_size}\n\n")
        f.write(format_results_markdown(result.rows))
    if args.save_rounds:
        os.makedirs(os.path.join(args.out, "rounds"), exist_ok=True)
        for (ds, dname, k), data in result.rounds.items():
            data.save(os.path.join(args.out, "rounds", f"{ds}__{dname}__K{k}.npz"))
    print(format_results_markdown(result.rows), end="")
    return 0


def eval_main(argv: Sequence[str] | None = None) -> int:
    """Run ``dspark eval`` with `argv` (arguments after ``eval``); return the exit status."""
    return run_command(PROG, build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(eval_main())
