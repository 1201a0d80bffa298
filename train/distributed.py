"""Multi-process (multi-host) plumbing of the training commands: start-up, data exchange, paths.

JAX runs one Python process per host; after `jax.distributed.initialize` every process sees all
devices of the job in `jax.devices()` and runs the same program. What the trainers need on top:

  * `add_distributed_flags` / `initialize_from_args`: ``--coordinator-address HOST:PORT
    --num-processes N --process-id I`` passed to `jax.distributed.initialize`; ``--distributed
    auto`` calls it without arguments (Cloud TPU pods and SLURM, where JAX finds the coordinator
    and the process ids itself). Without either flag nothing is initialised (one process).
  * `is_primary`: process 0 writes logs, metrics, configs and exports; the others only compute.
  * `local_rows`: which rows of a global batch this process's devices hold under a sharding
    (for `jax.make_array_from_process_local_data`); processes holding replicas of the same
    shard get the same rows, so any (data, fsdp, model) layout works, data x fsdp < processes included.
  * `allgather_concat`: the concatenation, in process order, of one 1-D array per process
    (each process tokenizes its share of the corpus; all of them need the whole packed stream).
  * `gather_to_host`: a pytree of (possibly sharded across hosts) arrays as host numpy arrays on
    every process (a replicating jit, collective: every process must call it).
  * `raise_if_any_failed`: an error on one process (e.g. a malformed line in its share of the
    corpus) becomes an error on every process instead of a hang in the next collective.
  * `barrier`: wait until every process reaches the same point.
  * `out_path` / `is_remote`: output locations as `etils.epath` paths, so ``gs://bucket/run`` stays a
    URL (never `os.path.abspath`-ed into a local directory); `local_staging` + `publish_files`:
    writers that only know local files write into a staging directory whose files are then moved
    (local) or copied (URL) into place, `config.json` last, stale weight files removed only after.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

import numpy as np

from dspark_jax.checkpoint import atomic

__all__ = ["add_distributed_flags", "distributed_error", "initialize_from_args", "is_primary", "local_rows",
           "allgather_concat", "raise_if_any_failed", "gather_to_host", "barrier", "is_remote", "out_path",
           "local_staging", "publish_files"]

_URL_SCHEMES = ("gs://", "s3://", "http://", "https://", "hdfs://", "memory://")


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    """``--coordinator-address``, ``--num-processes``, ``--process-id``, ``--distributed auto``."""
    g = p.add_argument_group("multi-process (one process per host; see docs/multi_host.md)")
    g.add_argument("--coordinator-address", metavar="HOST:PORT",
                   help="address of process 0's coordinator service (jax.distributed.initialize)")
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes of the job")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")
    g.add_argument("--distributed", choices=("auto",),
                   help="'auto': jax.distributed.initialize() without arguments (Cloud TPU pods, SLURM)")


def distributed_error(args: argparse.Namespace) -> str | None:
    """The first problem with the multi-process flags, or None (checked before any work)."""
    given = [args.coordinator_address is not None, args.num_processes is not None, args.process_id is not None]
    if any(given) and args.distributed == "auto":
        return "--distributed auto discovers the processes itself; drop --coordinator-address/--num-processes/--process-id"
    if any(given) and not all(given):
        return "--coordinator-address, --num-processes and --process-id must be given together"
    if all(given):
        host, _, port = args.coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            return f"--coordinator-address must be HOST:PORT, got {args.coordinator_address!r}"
        if args.num_processes < 1:
            return f"--num-processes must be >= 1, got {args.num_processes}"
        if not 0 <= args.process_id < args.num_processes:
            return f"--process-id must be in [0, {args.num_processes}), got {args.process_id}"
    return None


def initialize_from_args(args: argparse.Namespace) -> None:
    """Call `jax.distributed.initialize` as the flags ask (no flag, or already initialised: nothing done)."""
    import jax

    if jax.distributed.is_initialized():
        return
    if args.distributed == "auto":
        jax.distributed.initialize()
    elif args.coordinator_address is not None:
        jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                   num_processes=args.num_processes, process_id=args.process_id)


def is_primary() -> bool:
    """True on process 0 (the one that writes files)."""
    import jax

    return jax.process_index() == 0


def local_rows(sharding: Any, global_shape: tuple[int, ...]) -> tuple[int, int]:
    """[start, stop) of the leading-dim rows this process's devices hold under `sharding`.

    Rows of a batch sharding over (data, fsdp) are contiguous per process for meshes built by
    `dspark_jax.sharding.make_mesh` (devices grouped by host); anything else raises ValueError.
    """
    spans = set()
    for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        rows = index[0] if index else slice(None)
        start, stop, _ = rows.indices(global_shape[0])
        spans.add((start, stop))
    lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
    covered = np.zeros(hi - lo, bool)
    for s, e in spans:
        covered[s - lo:e - lo] = True
    if not covered.all():
        raise ValueError(f"this process's batch rows are not contiguous ({sorted(spans)}); build the mesh with "
                         f"make_mesh over jax.devices() (devices grouped by host)")
    return lo, hi


def allgather_concat(part: np.ndarray) -> np.ndarray:
    """Concatenate every process's 1-D `part` in process order (identity with one process)."""
    import jax

    part = np.ascontiguousarray(part)
    if jax.process_count() == 1:
        return part
    from jax.experimental import multihost_utils

    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([part.shape[0]], np.int64))).reshape(-1)
    padded = np.zeros((int(sizes.max()),), part.dtype)
    padded[:part.shape[0]] = part
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return np.concatenate([every[i, :int(n)] for i, n in enumerate(sizes)])


def raise_if_any_failed(error: BaseException | None) -> None:
    """Collective error agreement: if any process passes an error, every process raises.

    The failing process re-raises its own `error`; the others raise RuntimeError naming it, so no
    process is left waiting in a later collective. No-op with one process.
    """
    import jax

    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.asarray([error is not None], np.int32))).reshape(-1)
    if error is not None:
        raise error
    if flags.any():
        raise RuntimeError(f"process {int(np.argmax(flags))} failed (see its error message)")


def gather_to_host(tree: Any) -> Any:
    """Host numpy copies of a pytree of global arrays, fully assembled on every process (collective)."""
    import jax

    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def barrier(name: str) -> None:
    """Block until every process called `barrier(name)` (no-op with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_remote(path: str | os.PathLike) -> bool:
    """True for object-store URLs (``gs://``, ``s3://``, ...), which must not go through `os.path`."""
    return os.fspath(path).startswith(_URL_SCHEMES)


def out_path(path: str | os.PathLike):
    """An `etils.epath.Path` for an output location: URLs kept as they are, local paths made absolute."""
    from etils import epath

    p = os.fspath(path)
    return epath.Path(p if is_remote(p) else os.path.abspath(p))


@contextlib.contextmanager
def local_staging(dest: str | os.PathLike) -> Iterator[str]:
    """A fresh local directory to write an export into (beside `dest` when local), removed afterwards."""
    d = os.fspath(dest)
    parent = None if is_remote(d) else os.path.dirname(os.path.abspath(d))
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-staging-", dir=parent)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_files(staging: str, dest: str | os.PathLike, *, stale: Callable[[str], bool] = lambda name: False
                  ) -> None:
    """Publish the files of `staging` into `dest`, ``config.json`` last.

    Local `dest`: `dspark_jax.checkpoint.atomic.publish_files` (journaled moves; afterwards files
    for which `stale(name)` holds that the new export did not replace, e.g. weight shards of an
    earlier, differently sharded export, are removed). URL `dest`: the files are copied one at a
    time through epath, then the stale ones removed. A crash leaves the old or the new weights in
    place, never none.
    """
    if not is_remote(dest):
        os.makedirs(os.fspath(dest), exist_ok=True)
        atomic.publish_files(staging, os.fspath(dest), stale=stale)
        return
    target = out_path(dest)
    target.mkdir(parents=True, exist_ok=True)
    names = sorted(os.listdir(staging), key=lambda n: n == "config.json")
    for name in names:
        with open(os.path.join(staging, name), "rb") as f, (target / name).open("wb") as g:
            shutil.copyfileobj(f, g, 1 << 24)
    for old in list(target.iterdir()):
        if old.name not in names and stale(old.name):
            old.unlink()
