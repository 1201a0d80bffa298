"""Run scaffolding shared by the target and draft trainers: mesh, resume checks, the step loop.

  * `config_mesh`    the (data, fsdp, model) mesh a config asks for (error if too few devices);
  * `check_resume`   refuse to overwrite checkpoints without `resume`, and refuse a resume from
                     checkpoints written with another config or data (`check_same_config`);
  * `end_step`       where this invocation stops (`stop_at_step`, clamped to the run);
  * `run_steps`      the step loop: throughput (compilation excluded), log / eval / checkpoint at
                     their intervals and at the end, then close bar, logger and checkpointer.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax

from dspark_jax.sharding import make_mesh
from train.checkpointing import TrainCheckpointer, check_same_config
from train.metrics import MetricsLogger, ProgressBar, RateMeter

__all__ = ["config_mesh", "report_quarantined", "check_resume", "end_step", "run_steps"]


def config_mesh(config: Any, error: type[Exception]):
    """Mesh of `config.mesh_data x mesh_fsdp x mesh_model` over the first devices; `error` if too few."""
    devices = jax.devices()
    if config.num_devices > len(devices):
        raise error(f"mesh data={config.mesh_data} x fsdp={config.mesh_fsdp} x model={config.mesh_model} "
                    f"needs {config.num_devices} devices but only {len(devices)} are available")
    return make_mesh(data=config.mesh_data, fsdp=config.mesh_fsdp, model=config.mesh_model,
                     devices=devices[:config.num_devices])


def report_quarantined(ckpt: TrainCheckpointer, name: str, bar: ProgressBar) -> None:
    """Say (`bar.write`) which uncommitted step directories the checkpointer moved aside."""
    for path in ckpt.quarantined:
        bar.write(f"{name}: ignoring uncommitted checkpoint (interrupted write), moved to {path}")


def check_resume(ckpt: TrainCheckpointer, *, resume: bool, out_dir: str, config: Any,
                 fingerprint: Mapping[str, Any], ignore: frozenset[str], data_what: str,
                 error: type[Exception]) -> int | None:
    """The latest committed step (None: none), after checking that this run may continue from it.

    Without `resume`, existing checkpoints raise `error`; with it, the checkpoint's config must
    equal `config` outside `ignore`, and its fingerprint `fingerprint` (`data_what` names what the
    fingerprint covers), else `ConfigMismatchError`.
    """
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        raise error(f"{out_dir} already holds checkpoints (latest step {latest}); pass --resume to "
                    f"continue that run or choose a new --out directory")
    if latest is not None:
        meta = ckpt.read_meta(latest)
        where = os.path.join(ckpt.directory, str(latest))
        check_same_config(meta["config"], config.to_dict(), where=where, ignore=ignore)
        check_same_config(meta["fingerprint"], fingerprint, where=f"{where} ({data_what})")
    return latest


def end_step(start: int, stop_at_step: int | None, steps: int) -> int:
    """Last step of this invocation: `steps`, or `stop_at_step` clamped to [start, steps]."""
    return steps if stop_at_step is None else max(start, min(int(stop_at_step), steps))


def run_steps(state: Any, *, config: Any, start: int, end: int, step: Callable[[Any], tuple[Any, Any]],
              on_log: Callable[[int, Any, RateMeter], None], on_eval: Callable[[int, Any], None],
              meta: Callable[[int], dict], ckpt: TrainCheckpointer, bar: ProgressBar,
              logger: MetricsLogger) -> Any:
    """Run steps `start..end-1` of `config.steps`; returns the final state.

    `step(state) -> (state, metrics)` runs one optimizer step on the next batch. After step s
    (1-based): `on_log(s, metrics, rate)` every `log_every` steps and at the last step of the run
    (`rate.rate()` = tokens/s since the last log; the first, compiling step is not counted),
    `on_eval(s, state)` every `eval_every` steps and at the last step, a checkpoint with `meta(s)`
    every `ckpt_every` steps and at `end`. The bar, the logger and `ckpt` are closed on the way out.
    """
    rate = RateMeter()
    try:
        for i in range(start, end):
            state, metrics = step(state)
            s = i + 1
            rate.add(config.tokens_per_step)
            if i == start:  # exclude compilation from the throughput
                jax.block_until_ready(metrics)
                rate.reset()
            if s % config.log_every == 0 or s == config.steps:
                on_log(s, metrics, rate)
            if s % config.eval_every == 0 or s == config.steps:
                on_eval(s, state)
            if s % config.ckpt_every == 0 or s == end:
                ckpt.save(s, state, meta(s))
            bar.update(1)
    finally:
        bar.close()
        logger.close()
        ckpt.close()
    return state
