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

Unreadable checkpoints: `restore_newest_good` / `read_newest_good_meta` try the committed steps
newest first; a step that fails to read (truncated or deleted array files, broken JSON) is moved
aside to `<step>.corrupt-<time>` with a one-line note naming it, and the next older step is used.

Paths go through `etils.epath` (as orbax does), so `gs://bucket/run/checkpoints` works. With
several processes, only process 0 renames directories; the others wait for it (`barrier`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping

import orbax.checkpoint as ocp

from train.distributed import barrier, is_primary, out_path

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
        self._path = out_path(directory)
        self.directory = os.fspath(self._path)
        self.quarantined: list[str] = []
        if is_primary():
            self._path.mkdir(parents=True, exist_ok=True)
            self.quarantined = self._quarantine_uncommitted()
        barrier("train-checkpointer-open")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._mngr = ocp.CheckpointManager(self._path, options=options, item_names=("state", "meta"))

    def _move_aside(self, path, tag: str) -> str:
        dest = path.parent / f"{path.name}.{tag}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        path.rename(dest)
        return os.fspath(dest)

    def _quarantine_uncommitted(self) -> list[str]:
        """Move step dirs that lack the commit marker out of orbax's sight; return their new paths."""
        return [self._move_aside(path, "uncommitted") for path in sorted(self._path.iterdir())
                if _is_step_name(path.name) and path.is_dir() and not (path / COMMIT_MARKER).exists()]

    def valid_steps(self) -> list[int]:
        """Committed steps, ascending."""
        return sorted(s for s in self._mngr.all_steps() if (self._path / str(s) / COMMIT_MARKER).exists())

    def set_aside_corrupt(self, step: int) -> str:
        """Move the unreadable committed `step` to `<step>.corrupt-<time>`; returns its new path."""
        self._mngr.wait_until_finished()
        dest = self._move_aside(self._path / str(int(step)), "corrupt") if is_primary() else ""
        barrier(f"train-checkpointer-corrupt-{int(step)}")
        self._mngr.reload()
        return dest

    def _newest_good(self, read: Callable[[int], Any], note: Callable[[str], None], below: int | None) -> Any:
        """`read(step)` of the newest readable committed step (<= `below`), corrupt ones set aside."""
        errors = []
        for step in reversed(self.valid_steps()):
            if below is not None and step > below:
                continue
            try:
                out = read(step)
            except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many types for broken files
                reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                dest = self.set_aside_corrupt(step)
                errors.append(f"step {step}: {reason}")
                note(f"checkpoint step {step} in {self.directory} is unreadable ({reason}); moved it to {dest}; "
                     f"trying the next older checkpoint")
                continue
            return out
        if errors:
            raise CheckpointError(f"no readable checkpoint in {self.directory} ({'; '.join(errors)}); start a new run "
                                  f"with another --out directory or without --resume after removing it")
        return None

    def read_newest_good_meta(self, note: Callable[[str], None]) -> tuple[int, dict] | None:
        """(step, meta) of the newest committed step whose meta reads; None without checkpoints."""
        return self._newest_good(lambda s: (s, self.read_meta(s)), note, None)

    def restore_newest_good(self, abstract_state: Any, note: Callable[[str], None], *,
                            below: int | None = None) -> tuple[int, Any, dict]:
        """(step, state, meta) of the newest fully readable committed step <= `below` (see `restore`)."""
        out = self._newest_good(lambda s: (s, *self.restore(s, abstract_state)), note, below)
        if out is None:
            raise CheckpointError(f"no committed checkpoint in {self.directory}")
        return out

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
