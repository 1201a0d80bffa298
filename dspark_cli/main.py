"""``dspark``: one console script, many subcommands, each loaded lazily.

Adding a subcommand is one entry in `COMMANDS`::

    "train-draft": Command("train.cli_draft:train_draft_main", "train a DSpark drafter"),

The target is ``"module.path:function"``; the function takes the argument list after the
subcommand name (``argv: list[str]``) and returns an exit status (``int``). It is imported only
when that subcommand runs, so ``dspark --help`` does not import JAX. argparse's own behaviour is
kept: ``--help`` raises ``SystemExit(0)`` and usage errors ``SystemExit(2)``; a subcommand may
instead return those codes. The console script (``dspark = "dspark_cli.main:main"``) turns
the returned status into the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, NamedTuple, Sequence

__all__ = ["Command", "COMMANDS", "main", "resolve", "build_parser", "EXIT_USAGE"]

EXIT_USAGE = 2  # bad input / usage errors, like argparse


class Command(NamedTuple):
    """A subcommand: where its entry point lives (``"module:function"``) and one line of help."""

    target: str
    help: str


# name -> Command("module:function", one line of help). One line per subcommand, in pipeline order.
# fmt: off
COMMANDS: dict[str, Command] = {
    "build-corpus":    Command("dspark_cli.corpus_cmd:build_corpus_main", "build the offline two-domain (code/prose) text corpus"),
    "train-tokenizer": Command("dspark_cli.corpus_cmd:train_tokenizer_main", "train a BPE tokenizer on a built corpus"),
    "generate":        Command("dspark_cli.generate_cmd:main", "generate text with a target model (optionally speculative with --draft)"),
    "train-target":    Command("train.cli_target:train_target_main", "pretrain a small Qwen3-architecture target"),
    "regenerate":      Command("train.cli_regenerate:regenerate_main", "regenerate a corpus with the target (spec 4.1 step 2) for drafter training"),
    "train-draft":     Command("train.cli_draft:train_draft_main", "train a DSpark/DFlash drafter against a target (online target features)"),
    "eval":            Command("dspark_cli.eval_cmd:eval_main", "evaluate drafters: tau, acceptance rates, tokens/s and speed-up vs autoregressive"),
    "calibrate":       Command("dspark_cli.calibrate_cmd:calibrate_main", "fit confidence temperatures (STS) for a drafter and report calibration"),
    "info":            Command("dspark_cli.info_cmd:info_main", "JAX backend, devices, mesh suggestion, versions, active kernels"),
    "serve":           Command("dspark_cli.serve_cmd:main", "OpenAI-compatible HTTP server over the speculative engine (streaming, metrics)"),
    "bench-serve":     Command("dspark_cli.bench_serve_cmd:main", "Poisson load test of a running `dspark serve` (--url) or of the engine in process"),
}
# fmt: on


def resolve(name: str) -> Callable[[list[str]], int]:
    """Import and return the entry-point function of subcommand `name`."""
    module_name, _, func_name = COMMANDS[name].target.partition(":")
    return getattr(importlib.import_module(module_name), func_name)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (only for ``dspark --help`` / ``--version`` / unknown commands)."""
    width = max(len(n) for n in COMMANDS) + 2
    listing = "\n".join(f"  {n.ljust(width)}{c.help}" for n, c in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="dspark",
        usage="dspark [-h] [--version] <command> [args ...]",
        description="DSpark speculative decoding in JAX: data, training, calibration and generation.",
        epilog=f"commands:\n{listing}\n\nRun 'dspark <command> --help' for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("command", metavar="<command>", choices=sorted(COMMANDS),
                        help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dspark-jax")
    except Exception:  # not installed (running from a checkout)
        return "0+unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dspark``: dispatch ``argv`` (default ``sys.argv[1:]``) to a subcommand.

    Returns the subcommand's exit status. ``--help`` raises ``SystemExit(0)`` (argparse).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return int(resolve(argv[0])(argv[1:]) or 0)
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    parser.parse_args(argv)  # --help / --version exit 0; an unknown command exits 2 with a message
    return EXIT_USAGE  # unreachable: a known command was dispatched above


if __name__ == "__main__":
    sys.exit(main())
