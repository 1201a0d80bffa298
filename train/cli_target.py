"""``dspark train-target``: pretrain a small Qwen3-style target model on a built corpus.

    dspark train-target --corpus CORPUS --tokenizer TOK --out runs/target
    dspark train-target --corpus CORPUS --tokenizer TOK --out runs/target --config target.json --steps 500
    dspark train-target ... --resume                  # continue from the latest checkpoint in --out
    dspark train-target ... --mesh 2,2,2              # data x fsdp x model over 8 devices
    dspark generate --target runs/target --prompt "def fib(n):"

Every `TargetTrainConfig` field is also a flag (`--hidden-size 128`, `--compute-dtype bfloat16`,
`--domains code,prose`, `--tie-word-embeddings true`); flags override `--config FILE` (JSON),
which overrides the defaults. `--print-config` shows the merged config and exits. Expected
failures print ``dspark train-target: error: <message>`` to stderr and return 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from typing import Any, Sequence

from train.target_config import ConfigFileError, TargetTrainConfig

__all__ = ["build_parser", "train_target_main", "config_from_args"]

PROG = "dspark train-target"
EXIT_ERROR = 2
_ALIASES = {"learning_rate": ["--lr"]}


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _parse_optional_int(text: str) -> int | None:
    if text.strip().lower() in ("none", "null", "auto"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _field_parser(field: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(TargetTrainConfig)
    hint = hints[field.name]
    if hint is bool:
        return _parse_bool
    if hint is int or hint is float or hint is str:
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # int | None
        return _parse_optional_int
    return _parse_list  # tuple[str, ...]


def _parse_mesh(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(p) for p in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers DATA,FSDP,MODEL (e.g. 2,2,2), got {text!r}")
    return sizes  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``dspark train-target``."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, metavar="DIR", help="corpus directory (`dspark build-corpus`)")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory (`dspark train-tokenizer`)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory: checkpoints, metrics, final HF model")
    p.add_argument("--config", metavar="FILE", help="JSON file with TargetTrainConfig fields")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--stop-at", type=int, metavar="STEP", help="stop this invocation after STEP (checkpointed)")
    p.add_argument("--mesh", type=_parse_mesh, metavar="DATA,FSDP,MODEL", help="device mesh, e.g. 1,1,8")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-export", action="store_true", help="skip the final Hugging Face export")
    p.add_argument("--print-config", action="store_true", help="print the merged config as JSON and exit")
    g = p.add_argument_group("training config (override --config)")
    for f in dataclasses.fields(TargetTrainConfig):
        flags = ["--" + f.name.replace("_", "-")] + _ALIASES.get(f.name, [])
        g.add_argument(*flags, dest=f"cfg_{f.name}", type=_field_parser(f), default=None, metavar="V",
                       help=f"default {f.default!r}")
    return p


def config_from_args(args: argparse.Namespace) -> TargetTrainConfig:
    """Defaults <- `--config` JSON <- explicit flags; ConfigFileError on bad values."""
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    if args.mesh is not None:
        overrides.update(mesh_data=args.mesh[0], mesh_fsdp=args.mesh[1], mesh_model=args.mesh[2])
    if args.config:
        return TargetTrainConfig.from_json_file(args.config, **overrides)
    return TargetTrainConfig.from_dict(overrides, source="command line")


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def train_target_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dspark train-target``; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        config = config_from_args(args)
    except ConfigFileError as e:
        return _error(str(e))
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return 0
    for flag, path in (("--corpus", args.corpus), ("--tokenizer", args.tokenizer)):
        if not os.path.isdir(path):
            return _error(f"{flag} directory not found: {path}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return _error(f"--out exists and is not a directory: {args.out}")
    if args.stop_at is not None and args.stop_at < 1:
        return _error(f"--stop-at must be >= 1, got {args.stop_at}")

    from dspark_jax.checkpoint.hf_layout import CheckpointError as HFCheckpointError
    from dspark_jax.config import ConfigError
    from train.checkpointing import CheckpointError, ConfigMismatchError
    from train.data import DataError
    from train.target_trainer import TrainSetupError, train_target

    try:
        result = train_target(config, corpus_dir=args.corpus, tokenizer_dir=args.tokenizer, out_dir=args.out,
                              resume=args.resume, stop_at_step=args.stop_at, progress=not args.no_progress,
                              export=not args.no_export)
    except (DataError, TrainSetupError, ConfigMismatchError, CheckpointError, HFCheckpointError, ConfigError,
            ConfigFileError) as e:
        return _error(str(e))
    summary = {"out": result.out_dir, "step": result.final_step, "steps": result.config.steps,
               "loss": result.final_loss, "eval": result.eval_losses, "exported": result.exported}
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(train_target_main())
