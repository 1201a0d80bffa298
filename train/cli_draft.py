"""``dspark train-draft``: train a DSpark (or DFlash) drafter against a frozen target.

    dspark train-draft --target runs/target --corpus CORPUS --out runs/draft
    dspark train-draft ... --preset dflash --block-size 4 --head gated --steps 200
    dspark train-draft ... --resume                              # continue from the latest checkpoint
    dspark train-draft ... --mesh 16,1,4 --distributed auto     # one process per host (docs/multi_host.md)
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
import functools
import sys
from typing import Any, Sequence

from train.cli_common import (EXIT_ERROR, add_config_flags, add_output_flags, add_run_flags, config_from_flags,
                              parse_int_list, report_error, run_training_command)
from train.draft_config import PRESETS, DraftConfigFileError, DraftTrainConfig

__all__ = ["build_parser", "config_from_args", "train_draft_main", "EXIT_ERROR"]

PROG = "dspark train-draft"
_ALIASES = {"learning_rate": ["--lr"], "markov_head_type": ["--head"]}
_error = functools.partial(report_error, PROG, one_line=True)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``dspark train-draft``."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, metavar="DIR", help="target model directory (HF layout + tokenizer)")
    p.add_argument("--corpus", required=True, metavar="DIR", help="corpus directory (`dspark build-corpus`)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory: checkpoints, metrics, exported draft")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the target directory)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="dspark", help="dspark (default), dflash or eagle3")
    p.add_argument("--config", metavar="FILE", help="JSON file with DraftTrainConfig fields")
    add_run_flags(p, mesh_expected="DATA,FSDP,MODEL positive integers (e.g. 4,1,2)", mesh_example="4,1,2")
    p.add_argument("--feature-cache", metavar="DIR", help="offline target-feature cache (DeepSpec format v2)")
    p.add_argument("--write-feature-cache", action="store_true",
                   help="compute the features once into --feature-cache, then train from it")
    add_output_flags(p, export_what="DeepSpec")
    add_config_flags(p.add_argument_group("training config (override --preset / --config)"), DraftTrainConfig,
                     aliases=_ALIASES, parsers={"target_layer_ids": parse_int_list})
    return p


def config_from_args(args: argparse.Namespace) -> DraftTrainConfig:
    """Defaults <- preset <- `--config` JSON <- explicit flags; DraftConfigFileError on bad values."""
    return config_from_flags(DraftTrainConfig, args, base=PRESETS[args.preset])


def _train(config: DraftTrainConfig, args: argparse.Namespace) -> Any:
    from train.draft_trainer import train_draft
    from train.eagle3_trainer import train_eagle3

    trainer = train_eagle3 if args.preset == "eagle3" else train_draft  # Eagle-3: its own TTT trainer
    return trainer(config, target_dir=args.target, corpus_dir=args.corpus, out_dir=args.out,
                       tokenizer_dir=args.tokenizer, resume=args.resume, stop_at_step=args.stop_at,
                       progress=not args.no_progress, export=not args.no_export,
                       feature_cache=args.feature_cache, write_feature_cache=args.write_feature_cache)


def _train_errors() -> tuple[type[Exception], ...]:
    from dspark_jax.checkpoint.hf_layout import CheckpointError as ModelCheckpointError
    from dspark_jax.config import ConfigError
    from train.checkpointing import CheckpointError, ConfigMismatchError
    from train.data import DataError
    from train.loop import NonFiniteError
    from train.draft_features import FeatureCacheError
    from train.draft_trainer import DraftSetupError

    return (DraftSetupError, DataError, ConfigMismatchError, CheckpointError, ModelCheckpointError, ConfigError,
            FeatureCacheError, DraftConfigFileError, NonFiniteError)


def _summary(result: Any) -> dict:
    return {"out": result.out_dir, "draft": result.export_dir, "step": result.final_step,
            "steps": result.config.steps, "first_loss": result.first_loss, "loss": result.final_loss,
            "eval": {d: {k: m[k] for k in ("loss", "tau_probabilistic") if k in m}
                     for d, m in result.eval_metrics.items()}}


def train_draft_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dspark train-draft``; returns the exit status (0 ok, 2 bad input)."""
    return run_training_command(
        argv, parser=build_parser(), config_from_args=config_from_args, config_error=DraftConfigFileError,
        error=_error,
        dirs=lambda args: (("--target", args.target), ("--corpus", args.corpus), ("--tokenizer", args.tokenizer)),
        extra_checks=lambda args: ((args.write_feature_cache and not args.feature_cache,
                                    "--write-feature-cache needs --feature-cache DIR"),),
        train=_train, train_errors=_train_errors, summary=_summary)


if __name__ == "__main__":
    sys.exit(train_draft_main())
