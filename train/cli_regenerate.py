"""``dspark regenerate``: let the target rewrite the training responses (spec §4.1 step 2).

    dspark regenerate --target runs/target --corpus runs/corpus --out runs/regen
    dspark regenerate ... --prompts-per-domain 256 --prompt-tokens 32 --new-tokens 96 --batch-size 16
    dspark regenerate ... --temperature 0 --seed 1                  # greedy continuations
    dspark train-draft --target runs/target --corpus runs/regen --out runs/draft

Each output document is a seeded `--prompt-tokens` window of a source document followed by the
target's `--new-tokens` continuation (DeepSpec's Qwen3 sampling by default: temperature 0.7,
top-p 0.8, top-k 20), written in the `dspark build-corpus` layout (see `train.regenerate`).
The same flags and target give byte-identical files. Prints a one-line JSON summary; expected
failures print ``dspark regenerate: error: <message>`` (one line) and return 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from typing import Sequence

from dspark_cli.errors import check_dir, expected_errors, log
from train.cli_common import EXIT_ERROR, report_error
from train.distributed import add_distributed_flags, distributed_error, initialize_from_args
from train.regenerate import RegenerateConfig, RegenerateError, regenerate_corpus

__all__ = ["build_parser", "regenerate_main", "EXIT_ERROR"]

PROG = "dspark regenerate"
_error = functools.partial(report_error, PROG, one_line=True)
_KNOBS = [f for f in dataclasses.fields(RegenerateConfig) if f.name not in ("corpus_dir", "out_dir")]
_HELP = {"prompts_per_domain": "training prompts per domain (validation/test: max(1, N // 32) each)",
         "prompt_tokens": "prompt window length (tokens)", "new_tokens": "tokens the target generates per prompt",
         "batch_size": "prompts decoded together", "temperature": "sampling temperature (0 = greedy)",
         "top_p": "nucleus mass (1 = off)", "top_k": "top-k (0 = off)", "seed": "seed of windows and sampling"}


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``dspark regenerate``."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, metavar="DIR", help="target model directory (HF layout + tokenizer)")
    p.add_argument("--corpus", required=True, metavar="DIR", help="source corpus directory (`dspark build-corpus`)")
    p.add_argument("--out", required=True, metavar="DIR", help="output corpus directory")
    g = p.add_argument_group("regeneration config")
    for f in _KNOBS:
        g.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default, metavar="V",
                       help=f"{_HELP[f.name]} (default {f.default!r})")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    add_distributed_flags(p)
    return p


def _run(args: argparse.Namespace) -> dict:
    check_dir(args.target, "--target")
    check_dir(args.corpus, "--corpus")
    config = RegenerateConfig(corpus_dir=args.corpus, out_dir=args.out, **{f.name: getattr(args, f.name) for f in _KNOBS})
    problem = distributed_error(args)
    if problem is not None:
        raise RegenerateError(problem)
    try:
        initialize_from_args(args)
    except (RuntimeError, ValueError) as e:
        raise RegenerateError(f"jax.distributed.initialize failed: {str(e).strip()[:300]}") from None
    from infer.api import load_target_bundle  # late import: JAX only past the input checks

    target = load_target_bundle(args.target)
    t0 = time.perf_counter()
    manifest = regenerate_corpus(config, target, progress=None if args.no_progress else log)
    return {"out": args.out, "generated_tokens": manifest["regeneration"]["generated_tokens"],
            "wall_s": round(time.perf_counter() - t0, 2)}


def regenerate_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dspark regenerate``; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        summary = _run(args)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is an expected error type
        if isinstance(e, (RegenerateError, *expected_errors())):
            return _error(str(e))
        raise
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(regenerate_main())
