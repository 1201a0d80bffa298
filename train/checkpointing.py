"""Orbax checkpoint manager wrapper shared by the target and draft trainers.

One checkpoint = one step directory `<dir>/<step>/` with two items:
  * `state`: any pytree of arrays (params, optimizer state, step, RNG), restored against an
    abstract tree of `jax.ShapeDtypeStruct`s that carry the desired shardings (so a checkpoint
    written on one device restores onto a pod mesh and vice versa);
  * `meta`: a JSON object (resolved config, data-iterator state, data fingerprint, ...).

Atomicity: orbax writes into `<step>.orbax-checkpoint-tmp-*`, writes `commit_success.txt`
and renames it to `<step>` once complete. On top of orbax's checks, `TrainCheckpointer` only
treats a step directory as valid if it contains the commit marker; step directories without
it (an interrupted or foreign write) are moved aside to `<step>.uncommitted-<time>` when the
manager opens, so they are never restored and never block a later save of that step.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

import orbax.checkpoint as ocp

__all__ = ["COMMIT_MARKER", "CheckpointError", "ConfigMismatchError", "TrainCheckpointer",
           "config_differences", "check_same_config"]

COMMIT_MARKER = "commit_success.txt"  # written by orbax just before the final rename


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required (message names the directory)."""


class ConfigMismatchError(ValueError):
    """A resume against checkpoints written with a different config; the message lists the fields."""


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                       ignore: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """`field: saved -> current` lines for every differing top-level key not in `ignore` (sorted)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, tuple):
            a = list(a)
        if isinstance(b, tuple):
            b = list(b)
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def check_same_config(saved: Mapping[str, Any], current: Mapping[str, Any], *, where: str,
                      ignore: frozenset[str] | set[str] = frozenset()) -> None:
    """Raise ConfigMismatchError naming every differing field (see `config_differences`)."""
    diffs = config_differences(saved, current, ignore=ignore)
    if diffs:
        raise ConfigMismatchError(f"cannot resume from {where}: it was written with a different config "
                                  f"({'; '.join(diffs)}); use the same config or a new output directory")


def _is_step_name(name: str) -> bool:
    return name.isdigit() and (name == "0" or not name.startswith("0"))


class TrainCheckpointer:
    """Save / restore (state pytree, JSON meta) pairs by step under `directory`.

    `max_to_keep` bounds the number of kept steps (oldest deleted first). Saves are asynchronous
    by default (`async_save`): arrays are copied off the devices before `save` returns and
    written in the background; `wait()` / `close()` block until the last save is committed.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        os.makedirs(self.directory, exist_ok=True)
        self.quarantined = self._quarantine_uncommitted()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def _quarantine_uncommitted(self) -> list[str]:
        """Move step dirs that lack the commit marker out of orbax's sight; return their new paths."""
        moved = []
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if _is_step_name(name) and os.path.isdir(path) and not os.path.isfile(os.path.join(path, COMMIT_MARKER)):
                dest = f"{path}.uncommitted-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
                os.rename(path, dest)
                moved.append(dest)
        return moved

    def valid_steps(self) -> list[int]:
        """Committed steps, ascending."""
        return sorted(s for s in self._mngr.all_steps()
                      if os.path.isfile(os.path.join(self.directory, str(s), COMMIT_MARKER)))

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.valid_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Checkpoint `state` (pytree of arrays) and `meta` (JSON object) as `step` (replaces nothing)."""
        self._mngr.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=True)

    def read_meta(self, step: int) -> dict:
        """The JSON meta of a committed `step` (no arrays are read)."""
        self._require(step)
        return dict(self._mngr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, meta) of a committed `step`; `abstract_state` = ShapeDtypeStruct tree with shardings."""
        self._require(step)
        out = self._mngr.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])

    def _require(self, step: int) -> None:
        if int(step) not in self.valid_steps():
            raise CheckpointError(f"no committed checkpoint for step {step} in {self.directory} "
                                  f"(committed: {self.valid_steps()})")

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release orbax resources."""
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
