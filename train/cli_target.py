"""``dspark train-target``: pretrain a small Qwen3-style target model on a built corpus.

    dspark train-target --corpus CORPUS --tokenizer TOK --out runs/target
    dspark train-target --corpus CORPUS --tokenizer TOK --out runs/target --config target.json --steps 500
    dspark train-target ... --resume                  # continue from the latest checkpoint in --out
    dspark train-target ... --mesh 2,2,2              # data x fsdp x model over 8 devices
    dspark train-target ... --mesh 1,16,4 --distributed auto --out gs://bucket/run   # TPU pod, every host
    dspark train-target ... --coordinator-address 10.0.0.2:8476 --num-processes 2 --process-id 0
    dspark generate --target runs/target --prompt "def fib(n):"

Every `TargetTrainConfig` field is also a flag (`--hidden-size 128`, `--compute-dtype bfloat16`,
`--domains code,prose`, `--tie-word-embeddings true`); flags override `--config FILE` (JSON),
which overrides the defaults. `--print-config` shows the merged config and exits. Expected
failures print ``dspark train-target: error: <message>`` to stderr and return 2.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Sequence

from train.cli_common import (EXIT_ERROR, add_config_flags, add_output_flags, add_run_flags, config_from_flags,
                              report_error, run_training_command)
from train.target_config import ConfigFileError, TargetTrainConfig

__all__ = ["build_parser", "train_target_main", "config_from_args", "EXIT_ERROR"]

PROG = "dspark train-target"
_ALIASES = {"learning_rate": ["--lr"]}
_error = functools.partial(report_error, PROG)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``dspark train-target``."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, metavar="DIR", help="corpus directory (`dspark build-corpus`)")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory (`dspark train-tokenizer`)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory: checkpoints, metrics, final HF model")
    p.add_argument("--config", metavar="FILE", help="JSON file with TargetTrainConfig fields")
    add_run_flags(p, mesh_expected="three positive integers DATA,FSDP,MODEL (e.g. 2,2,2)", mesh_example="1,1,8")
    add_output_flags(p, export_what="Hugging Face")
    add_config_flags(p.add_argument_group("training config (override --config)"), TargetTrainConfig,
                     aliases=_ALIASES)
    return p


def config_from_args(args: argparse.Namespace) -> TargetTrainConfig:
    """Defaults <- `--config` JSON <- explicit flags; ConfigFileError on bad values."""
    return config_from_flags(TargetTrainConfig, args)


def _train(config: TargetTrainConfig, args: argparse.Namespace) -> Any:
    from train.target_trainer import train_target

    return train_target(config, corpus_dir=args.corpus, tokenizer_dir=args.tokenizer, out_dir=args.out,
                        resume=args.resume, stop_at_step=args.stop_at, progress=not args.no_progress,
                        export=not args.no_export)


def _train_errors() -> tuple[type[Exception], ...]:
    from dspark_jax.checkpoint.hf_layout import CheckpointError as HFCheckpointError
    from dspark_jax.config import ConfigError
    from train.checkpointing import CheckpointError, ConfigMismatchError
    from train.data import DataError
    from train.loop import NonFiniteError
    from train.target_trainer import TrainSetupError

    return (DataError, TrainSetupError, ConfigMismatchError, CheckpointError, HFCheckpointError, ConfigError,
            ConfigFileError, NonFiniteError)


def train_target_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dspark train-target``; returns the exit status (0 ok, 2 bad input)."""
    return run_training_command(
        argv, parser=build_parser(), config_from_args=config_from_args, config_error=ConfigFileError,
        error=_error, dirs=lambda args: (("--corpus", args.corpus), ("--tokenizer", args.tokenizer)),
        train=_train, train_errors=_train_errors,
        summary=lambda result: {"out": result.out_dir, "step": result.final_step, "steps": result.config.steps,
                                "loss": result.final_loss, "eval": result.eval_losses, "exported": result.exported})


if __name__ == "__main__":
    sys.exit(train_target_main())
