"""Training: target pretraining (`dspark train-target`) and the pieces the draft trainer reuses.

Shared, model-agnostic modules:
  * `train.optim`          AdamW + warmup/cosine schedule + clipping (`make_optimizer`), `cast_floating`
  * `train.parallel`       `TrainState`, `build_train_program` (sharded jitted init / step / eval with
                           gradient accumulation and bf16 compute on float32 master weights; the
                           target and the draft trainer both build their program with it)
  * `train.checkpointing`  `TrainCheckpointer` (orbax, commit-marker checked), `check_same_config`
  * `train.metrics`        `MetricsLogger` (resumable JSONL), `ProgressBar` (tqdm), `RateMeter`
  * `train.data`           tokenizer loading, packing, resumable `BatchIterator`, validation batches
  * `train.loop`           mesh from a config, resume checks, the step loop (`run_steps`)
  * `train.config_io`      `TrainConfigBase`: JSON / dict loading and shared checks of the train configs
  * `train.cli_common`     dataclass-driven config flags, run flags, error exits (`run_training_command`)
  * `train.distributed`    multi-process start-up flags, per-process batch rows, corpus-share exchange,
                           host gathering for exports, process-0 writes, `gs://`-safe output paths
Target-specific: `train.target_config` (`TargetTrainConfig`), `train.target_trainer`
(`train_target`), `train.cli_target` (`train_target_main`).

Nothing heavy is imported here, so `import train` is cheap.
"""
