"""Ahead-of-time compilation cache shared by the generation entry points.

`run_compiled` lowers and compiles a jitted function once per (function, static arguments,
argument shapes/dtypes/shardings), then runs it and reports compile time and run time
separately — so benchmarks and `metrics` never mix the two.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax

__all__ = ["run_compiled", "clear_compiled"]

_COMPILED: dict[tuple, Any] = {}


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
    compile_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, compile_s, time.perf_counter() - t1


def clear_compiled() -> None:
    """Drop every cached executable (e.g. after monkeypatching code under test)."""
    _COMPILED.clear()
