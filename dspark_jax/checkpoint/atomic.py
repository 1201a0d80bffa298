"""Crash-safe publication of checkpoint directories, on local disk or remote storage (`etils.epath`).

A model is always written beside the old one and swapped in at the end, so a crash at any point
leaves a complete model at the destination — the old one or the new one, never a mixture and never
nothing:

* `swap_in_dir(tmp, out)` (whole directories, used by `save_target` / `save_draft`): on Linux one
  ``renameat2(RENAME_EXCHANGE)`` swaps the finished directory and the old one atomically. Where the
  file system cannot exchange, the old directory is renamed aside (``.NAME.old-*``), the new one
  renamed in, the old one deleted; `recover_dir` (run by every save and by the loaders when `out` is
  missing) moves an aside copy back if a crash fell between the two renames.
* `publish_files(staging, out_dir)` (a model's files inside a directory that holds other things,
  e.g. a training run): the finished staging directory is marked complete, then its files are moved
  in (``config.json`` last) and superseded weight files removed; `recover_files` finishes an
  interrupted move from the marked staging directory (and drops an unmarked, half-written one).

Remote paths (``gs://...`` or any `etils.epath.Path` that is not local) are written to a local
temporary directory, uploaded beside the destination and renamed in (object stores copy on rename,
so there the swap is ordered, not atomic); `local_copy` downloads a remote model directory for the
readers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Callable, Iterator

__all__ = ["STAGING_DIR", "is_remote", "path_exists", "swap_in_dir", "recover_dir", "publish_files", "recover_files",
           "publish_dir", "local_copy", "staging_dir_for"]

STAGING_DIR = ".export-staging"  # publish_files' staging directory inside a run directory
_COMPLETE = ".complete"  # marker: the staging directory holds a finished model
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def is_remote(path: Any) -> bool:
    """Whether `path` (str, os.PathLike or `etils.epath.Path`) names remote storage (``scheme://``)."""
    return "://" in os.fspath(path)


def _epath(path: Any):
    from etils import epath  # remote paths only: keeps local checkpoint I/O free of the dependency

    return epath.Path(path)


def path_exists(path: Any) -> bool:
    """`os.path.exists` for local paths and remote (`etils.epath`) ones."""
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


# ------------------------------------------------------------------------------------------ directories
def _exchange(a: str, b: str) -> bool:
    """Atomically exchange the paths `a` and `b` (Linux renameat2); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), b)


def _rename(src: str, dst: str) -> None:
    os.rename(src, dst)


def _asides(out: str) -> list[str]:
    parent, name = os.path.split(os.path.abspath(out))
    if not os.path.isdir(parent):
        return []
    prefix = f".{name}.old-"
    return sorted((os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(prefix)),
                  key=os.path.getmtime)


def recover_dir(out: str | os.PathLike) -> None:
    """Repair an interrupted `swap_in_dir` at `out`: restore the old directory if `out` is missing,
    delete leftover old copies if `out` is complete."""
    out = os.path.abspath(os.fspath(out))
    asides = _asides(out)
    if not asides:
        return
    if not os.path.exists(out):
        _rename(asides.pop(), out)  # the newest aside copy is the model that was at `out`
    for path in asides:
        shutil.rmtree(path, ignore_errors=True)


def swap_in_dir(tmp: str, out: str) -> None:
    """Atomically put the finished directory `tmp` at `out`, replacing an existing `out` (same file system).

    The old directory stays complete at `out` until the single exchange; it is deleted afterwards.
    """
    tmp, out = os.path.abspath(tmp), os.path.abspath(out)
    recover_dir(out)
    if not os.path.exists(out):
        _rename(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
        return
    aside = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.old-{uuid.uuid4().hex[:8]}")
    _rename(out, aside)
    _rename(tmp, out)  # a crash before this line is undone by recover_dir
    shutil.rmtree(aside, ignore_errors=True)


def staging_dir_for(out: str | os.PathLike) -> str:
    """A fresh local directory to write a model for `out` into: beside `out` (same file system, so the
    final swap is a rename) or, for a remote `out`, in the system temp directory."""
    if is_remote(out):
        return tempfile.mkdtemp(prefix="dspark-export-")
    out = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    recover_dir(out)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0o700 would make the published model private
    return tmp


def publish_dir(tmp: str, out: str | os.PathLike) -> None:
    """Publish the finished local directory `tmp` at `out` (local: `swap_in_dir`; remote: upload beside
    `out`, then rename the old one aside, the new one in, and delete the old one)."""
    if not is_remote(out):
        swap_in_dir(tmp, os.fspath(out))
        return
    dest = _epath(out)
    upload = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    upload.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(tmp)):
        with open(os.path.join(tmp, name), "rb") as src, (upload / name).open("wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
    aside = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    if dest.exists():
        dest.rename(aside)
    upload.rename(dest)
    if aside.exists():
        aside.rmtree()
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[str]:
    """Yield a local directory holding the model at `path`: `path` itself when local, else a temporary
    download of its files (removed afterwards)."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    src = _epath(path)
    if not src.is_dir():
        raise FileNotFoundError(f"model directory {os.fspath(path)!r} does not exist")
    with tempfile.TemporaryDirectory(prefix="dspark-download-") as tmp:
        for item in src.iterdir():
            if item.is_file():
                with item.open("rb") as fin, open(os.path.join(tmp, item.name), "wb") as fout:
                    shutil.copyfileobj(fin, fout, 16 << 20)
        yield tmp


# ------------------------------------------------------------------------------------------ files
def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_files(staging: str, out_dir: str, *, stale: Callable[[str], bool] | None = None) -> None:
    """Move the finished model files in `staging` into `out_dir` (which may hold other things).

    Marks `staging` complete, then moves its files in with ``config.json`` last and deletes files
    of an earlier model that the new one does not have: those for which `stale(name)` holds
    (default: ``model*`` weight files). A crash before the marker leaves the old
    model untouched; a crash after it is completed by `recover_files` (run by the loaders).
    Local directories only (remote runs publish whole directories with `publish_dir`).
    """
    if is_remote(out_dir) or is_remote(staging):
        raise ValueError(f"publish_files works on local directories; publish {out_dir!r} with publish_dir")
    names = sorted(os.listdir(staging))
    for name in names:
        _fsync_file(os.path.join(staging, name))
    marker = os.path.join(staging, _COMPLETE)
    with open(marker + ".tmp", "w", encoding="utf-8") as f:
        json.dump(names, f)  # the complete file list: recovery must know files already moved out
        f.flush()
        os.fsync(f.fileno())
    os.replace(marker + ".tmp", marker)  # the commit point
    _roll_forward(staging, out_dir, stale)


def _is_old_weight_file(name: str) -> bool:
    return name.startswith("model") and name.endswith(_WEIGHT_SUFFIXES)


def _roll_forward(staging: str, out_dir: str, stale: Callable[[str], bool] | None = None) -> None:
    stale = stale or _is_old_weight_file
    with open(os.path.join(staging, _COMPLETE), encoding="utf-8") as f:
        new_files = set(json.load(f))
    pending = sorted((n for n in os.listdir(staging) if not n.startswith(_COMPLETE)), key=lambda n: (n == "config.json", n))
    for name in pending:
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    for name in os.listdir(out_dir):  # weights of the earlier model (e.g. single file -> shards)
        if stale(name) and name not in new_files and os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    shutil.rmtree(staging, ignore_errors=True)


def recover_files(out_dir: str, staging: str | None = None, *, discard_incomplete: bool = False) -> None:
    """Finish an interrupted `publish_files` into `out_dir` (staging default ``out_dir/.export-staging``).

    A staging directory marked complete is rolled forward; an unmarked (half-written) one leaves the old
    model intact and is deleted only with `discard_incomplete` (by the writer, before a new export).
    """
    staging = staging or os.path.join(out_dir, STAGING_DIR)
    if not os.path.isdir(staging):
        return
    if os.path.isfile(os.path.join(staging, _COMPLETE)):
        _roll_forward(staging, out_dir)
    elif discard_incomplete:
        shutil.rmtree(staging, ignore_errors=True)
