"""Run scaffolding shared by the target and draft trainers: mesh, resume checks, the step loop.

  * `config_mesh`    the (data, fsdp, model) mesh a config asks for (error if too few devices);
  * `check_resume`   refuse to overwrite checkpoints without `resume`, and refuse a resume from
                     checkpoints written with another config or data (`check_same_config`);
  * `open_checkpoints` the checkpointer of a run directory after `check_resume`, train_config.json written;
  * `end_step`       where this invocation stops (`stop_at_step`, clamped to the run);
  * `restore_or_init` the state to start from: the newest readable checkpoint (unreadable ones set
                     aside with a note) or a fresh init;
  * `run_steps`      the step loop: throughput (compilation excluded), a finite check of loss and
                     gradient norm after every step (`NonFiniteError`: nothing of that step is
                     checkpointed, so the last checkpoint stays the last good state), log / eval /
                     checkpoint at their intervals and at the end, then close bar, logger and checkpointer;
  * `target_fingerprint` what a draft run's checkpoints must match on resume (target, corpus, tokenizer);
  * `export_draft`   check and write a trained draft (any config `save_draft` takes) + train_summary.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from dspark_jax.checkpoint.deepspec import save_draft
from dspark_jax.sharding import make_mesh
from train.checkpointing import TrainCheckpointer, check_same_config
from train.distributed import barrier, gather_to_host, is_remote, local_staging, out_path, publish_files
from train.metrics import MetricsLogger, ProgressBar, RateMeter

__all__ = ["NonFiniteError", "check_finite", "config_mesh", "report_quarantined", "check_resume", "open_checkpoints",
           "restore_or_init", "stderr_note", "open_run_log", "end_step", "run_steps", "target_fingerprint",
           "export_draft"]


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient (the message names the step and the last checkpoint)."""


def check_finite(host_params: Any, what: str) -> None:
    """NonFiniteError naming the first parameter of `host_params` (numpy tree) holding NaN or inf."""
    flat = jax.tree_util.tree_flatten_with_path(host_params)[0]
    for path, leaf in flat:
        if not np.all(np.isfinite(np.asarray(leaf, np.float32))):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            raise NonFiniteError(f"{what}: parameter {name} holds NaN or inf; not exported")


def config_mesh(config: Any, error: type[Exception]):
    """Mesh of `config.mesh_data x mesh_fsdp x mesh_model` over the first devices; `error` if too few.

    With several processes the mesh must use every device of the job (each process must own a part).
    """
    devices = jax.devices()
    if config.num_devices > len(devices):
        raise error(f"mesh data={config.mesh_data} x fsdp={config.mesh_fsdp} x model={config.mesh_model} "
                    f"needs {config.num_devices} devices but only {len(devices)} are available")
    if jax.process_count() > 1 and config.num_devices != len(devices):
        raise error(f"mesh data={config.mesh_data} x fsdp={config.mesh_fsdp} x model={config.mesh_model} "
                    f"= {config.num_devices} devices, but a {jax.process_count()}-process run has {len(devices)}; "
                    f"the mesh must cover every device of the job")
    return make_mesh(data=config.mesh_data, fsdp=config.mesh_fsdp, model=config.mesh_model,
                     devices=devices[:config.num_devices])


def report_quarantined(ckpt: TrainCheckpointer, name: str, bar: ProgressBar) -> None:
    """Say (`bar.write`) which uncommitted step directories the checkpointer moved aside."""
    for path in ckpt.quarantined:
        bar.write(f"{name}: ignoring uncommitted checkpoint (interrupted write), moved to {path}")


def check_resume(ckpt: TrainCheckpointer, *, resume: bool, out_dir: str, config: Any,
                 fingerprint: Mapping[str, Any], ignore: frozenset[str], data_what: str,
                 error: type[Exception], note: Callable[[str], None] | None = None) -> int | None:
    """The newest committed step with readable meta (None: none), after checking that this run may continue.

    Without `resume`, existing checkpoints raise `error`; with it, the checkpoint's config must
    equal `config` outside `ignore`, and its fingerprint `fingerprint` (`data_what` names what the
    fingerprint covers), else `ConfigMismatchError`. Unreadable steps are set aside with `note(message)`
    (default: `stderr_note`).
    """
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        raise error(f"{out_dir} already holds checkpoints (latest step {latest}); pass --resume to "
                    f"continue that run or choose a new --out directory")
    if latest is None:
        return None
    found = ckpt.read_newest_good_meta(note or stderr_note)
    if found is None:
        return None
    latest, meta = found
    where = os.path.join(ckpt.directory, str(latest))
    check_same_config(meta["config"], config.to_dict(), where=where, ignore=ignore)
    check_same_config(meta["fingerprint"], fingerprint, where=f"{where} ({data_what})")
    return latest


def open_checkpoints(out_dir: str, config: Any, *, resume: bool, fingerprint: Mapping[str, Any],
                     ignore: frozenset[str], data_what: str, error: type[Exception],
                     name: str) -> tuple[TrainCheckpointer, int | None, Callable[[str], None]]:
    """(checkpointer of `out_dir/checkpoints`, newest resumable step or None, note) of a run.

    Runs `check_resume` (arguments as there), reports set-aside checkpoint directories and writes
    `out_dir/train_config.json` (process 0); the checkpointer is closed if any of that fails.
    `note(message)` prints "`name`: message" on process 0 (nothing elsewhere).
    """
    ckpt = TrainCheckpointer(os.path.join(out_dir, "checkpoints"), max_to_keep=config.keep_checkpoints)
    primary = jax.process_index() == 0
    bar = ProgressBar(total=config.steps, enabled=False)
    note = (lambda m: bar.write(f"{name}: {m}")) if primary else (lambda m: None)
    try:
        latest = check_resume(ckpt, resume=resume, out_dir=out_dir, config=config, fingerprint=fingerprint,
                              ignore=ignore, data_what=data_what, error=error, note=note)
        report_quarantined(ckpt, name, bar)
        if primary:
            config.write_json(os.path.join(out_dir, "train_config.json"))
    except BaseException:
        ckpt.close()
        raise
    return ckpt, latest, note


def restore_or_init(ckpt: TrainCheckpointer, latest: int | None, program: Any, init: Callable[[], Any],
                    note: Callable[[str], None] | None = None) -> tuple[Any, dict | None]:
    """(state, meta): the newest readable checkpoint at or below `latest` (None: `init()`, meta None)."""
    if latest is None:
        return init(), None
    _, state, meta = ckpt.restore_newest_good(program.abstract_state, note or stderr_note, below=latest)
    return state, meta


def stderr_note(message: str) -> None:
    """Print `message` to stderr on process 0 (the default `note` of the resume helpers)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def open_run_log(out_dir: str, state: Any, meta: dict | None, *, config: Any, stop_at_step: int | None,
                 desc: str, progress: bool) -> tuple[int, int, MetricsLogger, ProgressBar]:
    """(start, end, metrics logger, progress bar) of this invocation; only process 0 writes or shows them.

    `start` is the restored state's step; the log keeps the records up to it on resume (`meta` given).
    """
    primary = jax.process_index() == 0
    start = int(jax.device_get(state.step))
    end = end_step(start, stop_at_step, config.steps)
    logger = MetricsLogger(os.path.join(out_dir, "metrics.jsonl"), resume_step=start if meta is not None else None,
                           enabled=primary)
    bar = ProgressBar(total=config.steps, initial=start, desc=desc, enabled=progress and primary)
    return start, end, logger, bar


def end_step(start: int, stop_at_step: int | None, steps: int) -> int:
    """Last step of this invocation: `steps`, or `stop_at_step` clamped to [start, steps]."""
    return steps if stop_at_step is None else max(start, min(int(stop_at_step), steps))


def run_steps(state: Any, *, config: Any, start: int, end: int, step: Callable[[Any], tuple[Any, Any]],
              on_log: Callable[[int, Any, RateMeter], None], on_eval: Callable[[int, Any], None],
              meta: Callable[[int], dict], ckpt: TrainCheckpointer, bar: ProgressBar,
              logger: MetricsLogger) -> Any:
    """Run steps `start..end-1` of `config.steps`; returns the final state.

    `step(state) -> (state, metrics)` runs one optimizer step on the next batch. After step s
    (1-based): a `NonFiniteError` if `metrics["loss"]` or `metrics["grad_norm"]` is not finite
    (before anything of step s is logged or saved); `on_log(s, metrics, rate)` every `log_every`
    steps and at the last step of the run (`rate.rate()` = tokens/s since the last log; the first,
    compiling step is not counted), `on_eval(s, state)` every `eval_every` steps and at the last
    step, a checkpoint with `meta(s)` every `ckpt_every` steps and at `end`. The bar, the logger
    and `ckpt` are closed on the way out (pending checkpoint writes complete).
    """
    rate = RateMeter()
    try:
        for i in range(start, end):
            state, metrics = step(state)
            s = i + 1
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                ckpt.wait()
                good = ckpt.latest_step()
                kept = (f"the last good checkpoint is step {good} in {ckpt.directory}" if good is not None
                        else "no checkpoint was written")
                raise NonFiniteError(f"non-finite training at step {s} (loss {loss}, grad_norm {grad_norm}); "
                                     f"stopped without saving or exporting it; {kept}; lower --learning-rate "
                                     f"or check the data, then rerun (--resume continues from that checkpoint)")
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


def target_fingerprint(target_dir: str, manifest: Mapping[str, Any], tokenizer_sha256: str) -> dict[str, Any]:
    """What a draft run's checkpoints must match on resume: the target (config.json + weight file sizes),
    the corpus content hash of `manifest` (`check_corpus`) and the tokenizer's sha256."""
    h = hashlib.sha256(open(os.path.join(target_dir, "config.json"), "rb").read())
    for name in sorted(os.listdir(target_dir)):
        if name.endswith(".safetensors"):
            h.update(f"{name}:{os.path.getsize(os.path.join(target_dir, name))}".encode())
    return {"target": h.hexdigest(), "corpus_content_hash": manifest.get("content_hash"),
            "tokenizer_sha256": tokenizer_sha256}


def export_draft(params: Any, draft_config: Any, config: Any, export_dir: str, *, model: str,
                 info: Mapping[str, Any], say: Callable[[str], None]) -> None:
    """Export trained draft `params` (device tree) with `save_draft` (layout chosen by `draft_config`'s type)
    + train_summary.json to `export_dir`; every process calls it.

    The params are gathered to host and checked finite (`NonFiniteError`: nothing written) on
    process 0, which writes (local: atomic swap; URL: staged locally then copied) and `say`s so.
    The summary holds `model` (one-line description), the tap layers, steps, the train config, a
    usage line and `info` (must hold "target").
    """
    host_params = gather_to_host(params)
    if jax.process_index() == 0:
        check_finite(host_params, export_dir)
        summary = {"model": model, "target_layer_ids": list(draft_config.target_layer_ids), "steps": config.steps,
                   "train_config": config.to_dict(), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "usage": f"dspark generate --target {info['target']} --draft {export_dir}", **info}
        text = json.dumps(summary, indent=2, sort_keys=True, default=str)
        if not is_remote(export_dir):
            save_draft(host_params, draft_config, export_dir, dtype=config.export_dtype)
            out_path(export_dir).joinpath("train_summary.json").write_text(text, encoding="utf-8")
        else:
            with local_staging(export_dir) as tmp:
                save_draft(host_params, draft_config, os.path.join(tmp, "draft"), dtype=config.export_dtype)
                with open(os.path.join(tmp, "draft", "train_summary.json"), "w", encoding="utf-8") as f:
                    f.write(text)
                publish_files(os.path.join(tmp, "draft"), export_dir,
                              stale=lambda n: n.startswith("model") and n.endswith((".safetensors", ".json")))
        say(f"exported {config.export_dtype} draft to {export_dir}")
    barrier("train-draft-export")
