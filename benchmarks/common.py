"""Shared helpers for benchmark scripts: machine/commit info and atomic JSON results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from typing import Any

__all__ = ["git_commit", "machine_info", "save_result"]


def git_commit() -> str | None:
    """HEAD commit of the repository (with '-dirty' when the tree has local changes), or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=root, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                        text=True, stderr=subprocess.DEVNULL).strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, accelerator and library versions — recorded with every result."""
    import jax

    info: dict[str, Any] = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "commit": git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for mod in ("flax", "torch", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


def save_result(path: str, payload: dict[str, Any]) -> None:
    """Write `payload` as JSON atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)
    print(f"saved {path}")
