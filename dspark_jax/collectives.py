"""Census of the collectives in a compiled (SPMD-partitioned) HLO module.

`collective_census(hlo_text)` parses `jax.jit(f).lower(...).compile().as_text()` and returns every
collective instruction (all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute and
their async `-start` forms) with its result shape and bytes, plus the same totals restricted to
the body of the main `while` loop (one round of a decode loop). Used by the sharded-loop HLO test
and `benchmarks/bench_collectives.py`.

Bytes are the result bytes per device (for an all-gather: the gathered array; for an all-reduce:
the reduced array), a standard proxy for the traffic an op causes. Inside `conditional`s (e.g.
the live-length attention buckets) only the most expensive branch counts, since one runs.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

__all__ = ["Collective", "collective_census", "loop_collectives", "summarize"]

_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute", "collective-broadcast")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[sufc]\d+|bf16)\[([\d,]*)\]")
_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_CALLS = re.compile(r"\b(?:calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction: kind ('all-gather', ...), result shapes [(dtype, dims)], bytes."""

    kind: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    bytes: int
    computation: str

    def has_dim(self, sizes: Iterable[int]) -> bool:
        """Whether any result dimension equals one of `sizes` (e.g. the vocabulary or its shard)."""
        wanted = set(sizes)
        return any(d in wanted for _, dims in self.shapes for d in dims)


def _shapes(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((dt, tuple(int(x) for x in dims.split(",") if x)) for dt, dims in _SHAPE.findall(text))


def _nbytes(shapes) -> int:
    total = 0
    for dt, dims in shapes:
        n = 1
        for d in dims:
            n *= d
        total += n * _DTYPE_BYTES.get(dt, 4)
    return total


def _parse(hlo_text: str):
    """computation name -> (collectives, plain callees, [branch lists], while bodies); and the entry name."""
    comps: dict[str, tuple[list[Collective], list[str], list[list[str]], list[str]]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _COMP_HEADER.match(line)
        if header and "=" not in line.split("(")[0]:
            current = header.group(2)
            comps[current] = ([], [], [], [])
            if header.group(1):
                entry = current
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        _, result, op, rest = m.groups()
        colls, callees, branches, whiles = comps[current]
        base = op[:-len("-start")] if op.endswith("-start") else op
        if base in _KINDS:
            shapes = _shapes(result)
            if op.endswith("-start") and base != "all-reduce" and len(shapes) > 1:
                shapes = shapes[len(shapes) // 2:]  # async tuple (operands, results): keep the results
            colls.append(Collective(base, shapes, _nbytes(shapes), current))
        br = _BRANCHES.search(rest)
        if br:
            branches.append([b.strip().lstrip("%") for b in br.group(1).split(",") if b.strip()])
        for callee in _CALLS.findall(rest):
            (whiles if op == "while" and f"body={callee}" in rest.replace("%", "") else callees).append(callee)
        if op == "while":  # the condition runs every iteration too: count it with the body
            cond = re.search(r"condition=%?([\w.\-]+)", rest)
            body = re.search(r"body=%?([\w.\-]+)", rest)
            if cond and body:
                whiles[:] = [w for w in whiles if w != cond.group(1)]
                if cond.group(1) in callees:
                    callees.remove(cond.group(1))
    return comps, entry


def _collect(comps, name: str, into: list[Collective], seen: tuple[str, ...] = ()) -> None:
    """Collectives run by one execution of computation `name` (max-cost branch of conditionals,
    nested while bodies counted once)."""
    if name not in comps or name in seen:
        return
    colls, callees, branches, whiles = comps[name]
    into.extend(colls)
    for c in callees + whiles:
        _collect(comps, c, into, seen + (name,))
    for group in branches:
        best: list[Collective] = []
        for b in group:
            got: list[Collective] = []
            _collect(comps, b, got, seen + (name,))
            if sum(c.bytes for c in got) > sum(c.bytes for c in best) or not best:
                best = got
        into.extend(best)


def collective_census(hlo_text: str) -> list[Collective]:
    """Every collective executed once by the entry computation (loop bodies counted once)."""
    comps, entry = _parse(hlo_text)
    out: list[Collective] = []
    if entry is not None:
        _collect(comps, entry, out)
    return out


def loop_collectives(hlo_text: str) -> list[Collective]:
    """Collectives of one iteration of the most expensive `while` loop reachable from the entry
    (for a decode loop: one round, without the prefill)."""
    comps, entry = _parse(hlo_text)
    bodies: list[str] = []

    def find(name, seen=()):
        if name not in comps or name in seen:
            return
        _, callees, branches, whiles = comps[name]
        bodies.extend(whiles)
        for c in callees + whiles + [b for g in branches for b in g]:
            find(c, seen + (name,))

    if entry is not None:
        find(entry)
    best: list[Collective] = []
    for body in dict.fromkeys(bodies):
        got: list[Collective] = []
        _collect(comps, body, got)
        if sum(c.bytes for c in got) > sum(c.bytes for c in best):
            best = got
    return best


def summarize(collectives: list[Collective]) -> dict:
    """{'count', 'bytes', 'by_kind': {kind: {'count', 'bytes'}}, 'largest': [kind, shapes, bytes]}."""
    by_kind: dict[str, dict[str, int]] = {}
    for c in collectives:
        k = by_kind.setdefault(c.kind, {"count": 0, "bytes": 0})
        k["count"] += 1
        k["bytes"] += c.bytes
    largest = max(collectives, key=lambda c: c.bytes, default=None)
    return {"count": len(collectives), "bytes": sum(c.bytes for c in collectives), "by_kind": by_kind,
            "largest": None if largest is None else [largest.kind, [list(s[1]) for s in largest.shapes],
                                                      largest.bytes]}
