"""Each Pallas kernel vs its XLA (pure-jnp) reference.

On a TPU/GPU: times both at real shapes (Qwen3-4B heads/vocab; batch 1-64, context 1k-32k,
K 3-15) and checks that they agree. On CPU the kernels only run in interpret mode, so it records
correctness at small shapes and no timings (interpret-mode time means nothing).

    python benchmarks/bench_kernels.py [--kernels a,b] [--quick] [--out benchmarks/results/kernels_<backend>.json]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine_info, median_ms, print_table, save_result  # noqa: E402
from dspark_jax.kernels import QWEN3_4B, REGISTRY  # noqa: E402
from pallas_kernels import fused_verify as fv  # noqa: E402

ACCEL = jax.default_backend() in ("tpu", "gpu")
PLATFORM = "tpu" if jax.default_backend() == "tpu" else "gpu"


def _err(a, b) -> float:
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in leaves)


def _rng_arrays(seed: int):
    key = [jax.random.PRNGKey(seed)]

    def normal(shape, dtype=jnp.float32, scale=1.0):
        key[0], sub = jax.random.split(key[0])
        return (jax.random.normal(sub, shape, jnp.float32) * scale).astype(dtype)
    return normal


# ----------------------------------------------------------------------------- cases

def attention_case(batch: int, ctx: int, k: int, small: bool):
    c = dict(heads=4, kv_heads=2, head_dim=16) if small else QWEN3_4B
    normal = _rng_arrays(0)
    k1 = k + 1
    live = np.random.default_rng(batch).integers(ctx // 4, ctx - k1, batch)  # live lengths below capacity
    slot = np.repeat(np.arange(batch), k1)
    pos = (live[:, None] + np.arange(k1)).reshape(-1)
    args = (normal((batch * k1, c["heads"], c["head_dim"]), jnp.bfloat16),
            normal((batch, ctx, c["kv_heads"], c["head_dim"]), jnp.bfloat16),
            normal((batch, ctx, c["kv_heads"], c["head_dim"]), jnp.bfloat16),
            jnp.asarray(slot, jnp.int32), jnp.asarray(pos, jnp.int32), jnp.asarray(live + k1, jnp.int32))
    return args, dict(max_chunk=k1), f"B={batch} ctx={ctx} K={k} live~{int(live.mean())}"


def verify_case(batch: int, ctx: int, k: int, small: bool):
    v = 500 if small else QWEN3_4B["vocab"]
    normal = _rng_arrays(1)
    logits = normal((batch, k + 1, v), jnp.bfloat16, 3.0)
    probs = jax.nn.softmax(logits[:, :k].astype(jnp.float32) + normal((batch, k, v)), -1)
    tokens = jax.random.categorical(jax.random.PRNGKey(2), jnp.log(probs)).astype(jnp.int32)
    temp = jnp.ones((batch,), jnp.float32)
    cuts = fv.warp_cuts(logits, temp[:, None], jnp.zeros((batch, 1), jnp.int32), jnp.ones((batch, 1)))
    args = (logits, tokens, probs, jnp.full((batch,), k, jnp.int32), temp, cuts,
            jnp.arange(batch, dtype=jnp.uint32))
    return args, {}, f"B={batch} K={k} V={v}"


def sampler_case(batch: int, ctx: int, k: int, small: bool):
    c = dict(vocab=300, hidden=16, rank=8) if small else QWEN3_4B
    v, d, r = c["vocab"], c["hidden"], c["rank"]
    normal = _rng_arrays(3)
    args = (normal((batch, k, v), jnp.float32, 3.0), normal((batch, k, d), jnp.bfloat16),
            jnp.arange(batch, dtype=jnp.int32), jnp.ones((batch,), jnp.float32), jnp.arange(batch, dtype=jnp.uint32),
            normal((v, r), jnp.bfloat16, 0.1), normal((r, v), jnp.bfloat16, 0.1))
    head = dict(head_type="gated", gate_w=normal((d + r, r), jnp.bfloat16, 0.05), gate_b=normal((r,), jnp.bfloat16),
                conf_w=normal((d + r, 1), jnp.bfloat16, 0.05), conf_b=normal((1,), jnp.bfloat16))
    return args, head, f"B={batch} K={k} V={v} gated"


def train_attention_case(batch: int, ctx: int, k: int, small: bool):
    c = dict(heads=4, kv_heads=2, head_dim=16) if small else QWEN3_4B
    n = 4 if small else 16
    normal = _rng_arrays(4)
    h, kvh, d = c["heads"], c["kv_heads"], c["head_dim"]
    args = (normal((batch, n, k, h, d), jnp.bfloat16), normal((batch, ctx, kvh, d), jnp.bfloat16),
            normal((batch, ctx, kvh, d), jnp.bfloat16), normal((batch, n, k, kvh, d), jnp.bfloat16),
            normal((batch, n, k, kvh, d), jnp.bfloat16),
            jnp.broadcast_to(jnp.arange(ctx, dtype=jnp.int32), (batch, ctx)),
            jnp.asarray(np.random.default_rng(5).integers(1, ctx, (batch, n)), jnp.int32), jnp.ones((batch, n), bool))
    return args, {"scale": d ** -0.5}, f"B={batch} N={n} K={k} S={ctx} fwd+bwd"


CASES = {"ragged_attention": attention_case, "fused_verify": verify_case, "markov_sampler": sampler_case,
         "draft_train_attention": train_attention_case}
REAL = {  # (batch, context, K)
    "ragged_attention": [(1, 1024, 7), (8, 4096, 7), (32, 8192, 7), (8, 32768, 7), (64, 16384, 3), (16, 8192, 15)],
    "fused_verify": [(1, 0, 7), (8, 0, 7), (32, 0, 7), (64, 0, 3), (16, 0, 15)],
    "markov_sampler": [(1, 0, 7), (8, 0, 7), (32, 0, 7), (64, 0, 3), (16, 0, 15)],
    "draft_train_attention": [(1, 1024, 7), (2, 4096, 7), (1, 8192, 15)],
}
SMALL = {"ragged_attention": [(2, 64, 3)], "fused_verify": [(3, 0, 3)], "markov_sampler": [(3, 0, 3)],
         "draft_train_attention": [(1, 24, 3)]}


def _callables(name: str, kwargs: dict, interpret: bool):
    spec = REGISTRY[name]
    kernel = lambda *a: spec.kernel(*a, platform=PLATFORM, interpret=interpret, **kwargs)
    ref = lambda *a: spec.reference(*a, **kwargs)
    if name == "draft_train_attention":  # forward + backward
        def grads(f):
            return lambda *a: jax.grad(lambda *x: jnp.sum(f(*x, *a[5:]).astype(jnp.float32)),
                                       argnums=(0, 1, 2, 3, 4))(*a[:5])
        scale = kwargs["scale"]
        kernel = grads(lambda *a: spec.kernel(*a, scale, platform=PLATFORM, interpret=interpret))
        ref = grads(lambda *a: spec.reference(*a, scale))
    return jax.jit(kernel), jax.jit(ref)


def run(names: list[str], quick: bool, reps: int) -> list[dict[str, Any]]:
    rows = []
    table = REAL if ACCEL else SMALL
    for name in names:
        for batch, ctx, k in table[name][:2] if quick else table[name]:
            args, kwargs, label = CASES[name](batch, ctx, k, small=not ACCEL)
            kernel, ref = _callables(name, kwargs, interpret=not ACCEL)
            out_k, out_r = kernel(*args), ref(*args)
            if name == "fused_verify":  # same seeds: the same tokens
                agree = float(np.mean(np.asarray(out_k[0] == out_r[0]) & np.asarray(out_k[1] == out_r[1])))
            elif name == "markov_sampler":
                agree = float(np.mean(np.asarray(out_k[0] == out_r[0])))
            else:
                agree = float("nan")
            err = _err(out_k[1:], out_r[1:]) if name == "markov_sampler" else (
                0.0 if name == "fused_verify" else _err(out_k, out_r))
            row = {"kernel": name, "case": label, "max_abs_err": err, "token_agreement": agree, "pallas_ms": None,
                   "xla_ms": None, "speedup": None}
            if ACCEL:
                row["pallas_ms"], row["xla_ms"] = median_ms(kernel, *args, reps=reps), median_ms(ref, *args, reps=reps)
                row["speedup"] = row["xla_ms"] / row["pallas_ms"]
            rows.append(row)
            print(f"{name:<22} {label:<40} err={err:.2e} tokens={agree:.3f} "
                  + (f"pallas {row['pallas_ms']:.3f} ms  xla {row['xla_ms']:.3f} ms" if ACCEL else "(interpret)"),
                  flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", default=",".join(CASES), help="comma list of kernel names")
    p.add_argument("--quick", action="store_true", help="first two shapes per kernel only")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_<backend>.json)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.kernels.split(",") if n.strip()]
    bad = [n for n in names if n not in CASES]
    if bad:
        print(f"error: unknown kernel(s) {bad}; known: {list(CASES)}", file=sys.stderr)
        return 2
    rows = run(names, args.quick, args.reps)
    cols = [("kernel", "kernel", "{}"), ("case", "case", "{}"), ("max_abs_err", "max |err|", "{:.2e}"),
            ("token_agreement", "same tokens", "{:.3f}")]
    if ACCEL:
        cols += [("pallas_ms", "pallas ms", "{:.3f}"), ("xla_ms", "xla ms", "{:.3f}"), ("speedup", "speed-up", "{:.2f}x")]
    print_table(rows, cols)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"kernels_{jax.default_backend()}.json")
    save_result(out, {"benchmark": "kernels", "mode": "timed" if ACCEL else "interpret (correctness only)",
                      "machine": machine_info(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
