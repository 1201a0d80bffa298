"""Training-loop bookkeeping shared by the target and draft trainers.

* `MetricsLogger`: an append-only JSONL log (one object per line, flushed per line). On resume it
  first drops the records of steps after the restored checkpoint (written by the interrupted
  run after its last save), so the log of a resumed run equals the log of an uninterrupted one.
  Object stores (``gs://``) cannot append: there the whole file is rewritten at every record.
* `ProgressBar`: a tqdm bar over optimizer steps (ETA from tqdm) with a compact postfix; can be
  disabled (tests, non-interactive runs) while messages still reach stderr.
* `RateMeter`: tokens per second over wall-clock intervals, excluding compilation when asked.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import numpy as np

__all__ = ["MetricsLogger", "ProgressBar", "RateMeter", "read_jsonl", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """numpy / jax scalars and arrays -> Python numbers / lists; NaN and inf stay floats."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        arr = np.asarray(value)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    return value


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL file, local or URL ([] when it does not exist)."""
    from train.distributed import out_path

    p = out_path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


class MetricsLogger:
    """JSONL metrics writer. `resume_step=None` starts a fresh file; an int keeps records with step <= it."""

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None, enabled: bool = True):
        from train.distributed import is_remote, out_path

        self.path = os.fspath(path)
        self.enabled = enabled
        self._f = None
        self._lines: list[str] | None = None  # the whole file, for object stores (no append)
        if not enabled:
            return
        target = out_path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None:
            kept = [r for r in read_jsonl(target) if int(r.get("step", 0)) <= resume_step]
        lines = [json.dumps(r, sort_keys=True) + "\n" for r in kept]
        if is_remote(self.path):
            self._target, self._lines = target, lines
            target.write_text("".join(lines), encoding="utf-8")
            return
        tmp = f"{target}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, target)
        self._f = open(target, "a", encoding="utf-8")

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one record (values converted with `to_jsonable`) and flush."""
        line = json.dumps(to_jsonable(record), sort_keys=True) + "\n"
        if self._lines is not None:
            self._lines.append(line)
            self._target.write_text("".join(self._lines), encoding="utf-8")
        elif self._f is not None:
            self._f.write(line)
            self._f.flush()

    def close(self) -> None:
        """Close the file."""
        if self._f is not None:
            self._f.close()
            self._f = None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isfinite(value) and (abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3)):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


class ProgressBar:
    """tqdm bar over steps `initial..total` on stderr; `enabled=False` prints nothing but `write` messages."""

    def __init__(self, *, total: int, initial: int = 0, desc: str = "train", enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr,
                             dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by `n` steps; non-empty `postfix` replaces the displayed values."""
        if self._bar is None:
            return
        if postfix:
            self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
        self._bar.update(n)

    def write(self, message: str) -> None:
        """Print a line to stderr without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class RateMeter:
    """Items per second between `rate()` calls; `reset()` restarts the clock (e.g. after compilation)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Start a new interval now."""
        self._t0 = time.perf_counter()
        self._count = 0

    def add(self, n: float) -> None:
        """Count `n` items in the current interval."""
        self._count += n

    def rate(self) -> float:
        """Items per second over the current interval, then start a new one."""
        now = time.perf_counter()
        dt = now - self._t0
        r = self._count / dt if dt > 0 and self._count else 0.0
        self._t0, self._count = now, 0
        return r
