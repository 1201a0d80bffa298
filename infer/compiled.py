"""Ahead-of-time compilation cache shared by the generation entry points.

`run_compiled` lowers and compiles a jitted function once per (function, static arguments,
argument shapes/dtypes/shardings), then runs it and reports compile time and run time
separately — so benchmarks and `metrics` never mix the two.

The cache is bounded: it keeps the `DEFAULT_CACHE_SIZE` (32) most recently used executables and
evicts the least recently used one beyond that (every distinct `max_new_tokens` or prompt bucket is
a program of its own, so an unbounded cache grows with every new request shape). Change the bound
with `set_cache_size(n)` or the environment variable ``DSPARK_COMPILE_CACHE_SIZE``.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from typing import Any, Callable

import jax

__all__ = ["run_compiled", "clear_compiled", "set_cache_size", "cache_size", "DEFAULT_CACHE_SIZE"]

DEFAULT_CACHE_SIZE = 32
_COMPILED: OrderedDict[tuple, Any] = OrderedDict()


def _env_limit() -> int:
    text = os.environ.get("DSPARK_COMPILE_CACHE_SIZE", str(DEFAULT_CACHE_SIZE))
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"DSPARK_COMPILE_CACHE_SIZE must be an integer >= 1, got {text!r}")
    return int(text)


_limit = [_env_limit()]


def set_cache_size(n: int) -> None:
    """Keep at most `n` (>= 1) compiled executables; evicts the least recently used ones now if needed."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"compile cache size must be an integer >= 1, got {n!r}")
    _limit[0] = n
    while len(_COMPILED) > n:
        _COMPILED.popitem(last=False)


def cache_size() -> tuple[int, int]:
    """(executables cached now, the bound)."""
    return len(_COMPILED), _limit[0]


def _signature(args: tuple) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return treedef, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x))), getattr(x, "sharding", None))
                          for x in leaves)


def run_compiled(fn: Callable, args: tuple, static: dict[str, Any]) -> tuple[Any, float, float]:
    """Run `fn(*args, **static)` from a cached compiled executable.

    Returns (outputs after block_until_ready, compile seconds (0 when cached), run seconds).
    """
    key = (fn, tuple(sorted((k, repr(v)) for k, v in static.items())), _signature(args))
    t0 = time.perf_counter()
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = fn.lower(*args, **static).compile()
        _COMPILED[key] = compiled
        while len(_COMPILED) > _limit[0]:
            _COMPILED.popitem(last=False)  # least recently used
    else:
        _COMPILED.move_to_end(key)
    compile_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, compile_s, time.perf_counter() - t1


def clear_compiled() -> None:
    """Drop every cached executable (e.g. after monkeypatching code under test)."""
    _COMPILED.clear()
