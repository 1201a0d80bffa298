"""``dspark train-draft``: train a DSpark (or DFlash) drafter against a frozen target.

    dspark train-draft --target runs/target --corpus CORPUS --out runs/draft
    dspark train-draft ... --preset dflash --block-size 4 --head gated --steps 200
    dspark train-draft ... --resume                              # continue from the latest checkpoint
    dspark train-draft ... --feature-cache runs/feats --write-feature-cache   # cache features, then train
    dspark train-draft ... --feature-cache runs/feats            # reuse that cache (same target / data)
    dspark generate --target runs/target --draft runs/draft/draft --prompt "def fib(n):"

Config precedence: defaults <- `--preset` <- `--config FILE` (JSON) <- flags. Every
`DraftTrainConfig` field is also a flag (`--num-anchors 64`, `--compute-dtype bfloat16`,
`--target-layer-ids 0,2`); `--head` = `--markov-head-type`, `--lr` = `--learning-rate`.
Expected failures print ``dspark train-draft: error: <message>`` (one line) and return 2.
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

from train.draft_config import PRESETS, DraftConfigFileError, DraftTrainConfig

__all__ = ["build_parser", "config_from_args", "train_draft_main"]

PROG = "dspark train-draft"
EXIT_ERROR = 2
_ALIASES = {"learning_rate": ["--lr"], "markov_head_type": ["--head"]}


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_int_list(text: str) -> tuple[int, ...] | None:
    if text.strip().lower() in ("none", "null", "auto"):
        return None
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers or 'auto', got {text!r}") from None


def _parse_optional_int(text: str) -> int | None:
    if text.strip().lower() in ("none", "null", "auto"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _field_parser(name: str) -> Any:
    hint = typing.get_type_hints(DraftTrainConfig)[name]
    if hint in (bool, int, float, str):
        return _parse_bool if hint is bool else hint
    if name == "target_layer_ids":
        return _parse_int_list
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # int | None
        return _parse_optional_int
    return lambda text: tuple(p.strip() for p in text.split(",") if p.strip())  # tuple[str, ...]


def _parse_mesh(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(p) for p in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected DATA,FSDP,MODEL positive integers (e.g. 4,1,2), got {text!r}")
    return sizes  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``dspark train-draft``."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, metavar="DIR", help="target model directory (HF layout + tokenizer)")
    p.add_argument("--corpus", required=True, metavar="DIR", help="corpus directory (`dspark build-corpus`)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory: checkpoints, metrics, exported draft")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the target directory)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="dspark", help="dspark (default) or dflash")
    p.add_argument("--config", metavar="FILE", help="JSON file with DraftTrainConfig fields")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--stop-at", type=int, metavar="STEP", help="stop this invocation after STEP (checkpointed)")
    p.add_argument("--mesh", type=_parse_mesh, metavar="DATA,FSDP,MODEL", help="device mesh, e.g. 4,1,2")
    p.add_argument("--feature-cache", metavar="DIR", help="offline target-feature cache (DeepSpec format v2)")
    p.add_argument("--write-feature-cache", action="store_true",
                   help="compute the features once into --feature-cache, then train from it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-export", action="store_true", help="skip the final DeepSpec export")
    p.add_argument("--print-config", action="store_true", help="print the merged config as JSON and exit")
    g = p.add_argument_group("training config (override --preset / --config)")
    for f in dataclasses.fields(DraftTrainConfig):
        flags = ["--" + f.name.replace("_", "-")] + _ALIASES.get(f.name, [])
        g.add_argument(*flags, dest=f"cfg_{f.name}", type=_field_parser(f.name), default=None, metavar="V",
                       help=f"default {f.default!r}")
    return p


def config_from_args(args: argparse.Namespace) -> DraftTrainConfig:
    """Defaults <- preset <- `--config` JSON <- explicit flags; DraftConfigFileError on bad values."""
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    if args.mesh is not None:
        overrides.update(mesh_data=args.mesh[0], mesh_fsdp=args.mesh[1], mesh_model=args.mesh[2])
    base = PRESETS[args.preset]
    if args.config:
        return DraftTrainConfig.from_json_file(args.config, base=base, **overrides)
    return DraftTrainConfig.from_dict({**base, **overrides}, source="command line")


def _error(message: str) -> int:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_ERROR


def train_draft_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dspark train-draft``; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        config = config_from_args(args)
    except DraftConfigFileError as e:
        return _error(str(e))
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return 0
    for flag, path in (("--target", args.target), ("--corpus", args.corpus), ("--tokenizer", args.tokenizer)):
        if path is not None and not os.path.isdir(path):
            return _error(f"{flag} directory not found: {path}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return _error(f"--out exists and is not a directory: {args.out}")
    if args.write_feature_cache and not args.feature_cache:
        return _error("--write-feature-cache needs --feature-cache DIR")
    if args.stop_at is not None and args.stop_at < 1:
        return _error(f"--stop-at must be >= 1, got {args.stop_at}")

    from dspark_jax.checkpoint.hf_layout import CheckpointError as ModelCheckpointError
    from dspark_jax.config import ConfigError
    from train.checkpointing import CheckpointError, ConfigMismatchError
    from train.data import DataError
    from train.draft_features import FeatureCacheError
    from train.draft_trainer import DraftSetupError, train_draft

    try:
        result = train_draft(config, target_dir=args.target, corpus_dir=args.corpus, out_dir=args.out,
                             tokenizer_dir=args.tokenizer, resume=args.resume, stop_at_step=args.stop_at,
                             progress=not args.no_progress, export=not args.no_export,
                             feature_cache=args.feature_cache, write_feature_cache=args.write_feature_cache)
    except (DraftSetupError, DataError, ConfigMismatchError, CheckpointError, ModelCheckpointError, ConfigError,
            FeatureCacheError, DraftConfigFileError) as e:
        return _error(str(e))
    print(json.dumps({"out": result.out_dir, "draft": result.export_dir, "step": result.final_step,
                      "steps": result.config.steps, "first_loss": result.first_loss, "loss": result.final_loss,
                      "eval": {d: {k: m[k] for k in ("loss", "tau_probabilistic") if k in m}
                               for d, m in result.eval_metrics.items()}}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(train_draft_main())
