"""Collective traffic of one speculative round in the sharded loop, read from the compiled HLO.

A Qwen3-4B-shaped target (hidden 2560, MLP 9728, 32 query / 8 KV heads, head_dim 128, vocab
151,936, tied embeddings, bfloat16) with a 1-layer DSpark draft (K = 7), batch 32, on a mesh
data 2 x model 4. Weights are abstract (`jax.ShapeDtypeStruct` with shardings): nothing is
allocated, only compiled. Each configuration compiles the whole `generate` loop for 8 simulated
CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8) and parses the compiled module
(`dspark_jax.collectives`): collectives of one iteration of the round loop (prefill excluded),
bytes = result bytes per device.

Why CPU-compiled and not "lowered for TPU": `jit(f).trace(...).lower(lowering_platforms=('tpu',))`
works from this machine, but it yields StableHLO *before* SPMD partitioning (shardings are
annotations; collectives are inserted by the TPU compiler, which is not available here). The
XLA SPMD partitioner is the same pass on CPU and TPU; per-backend layout passes differ, so the
numbers are a faithful count of what partitioning inserts, not a TPU profile.

Layers: the loop is compiled at 2 and 4 target layers; per-round bytes are linear in the layer
count (per-layer part + fixed part), and the JSON extrapolates to Qwen3-4B's 36 layers.

    python benchmarks/bench_collectives.py --label before
    python benchmarks/bench_collectives.py --label after --kv-heads 8,2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def lower_loop(cfg, dcfg, params, dparams, b, p_len, cache_len, sampling, mesh, bsharding):
    """Lower the speculative `generate` loop (`infer.speculative.speculative_generate`) on abstract inputs.

    (The 'before' record was lowered through the pre-`[step-ready]` signature of the same loop.)
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dspark_jax.sampling import SamplingMode
    from dspark_jax.sharding import place_rows
    from infer.batching import row_params, stop_array
    from infer.speculative import speculative_generate
    from infer.state import SpecLoop

    tokens = jax.ShapeDtypeStruct((b, p_len), jnp.int32, sharding=bsharding)
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*bsharding.spec[:1])))
    max_new = cache_len - p_len - 16
    rows, configs = row_params(b, sampling=sampling, seed=0, stop_ids=stop_array([]), max_new_tokens=max_new)
    loop = SpecLoop(target=cfg, draft=dcfg, block_size=dcfg.block_size, mode=SamplingMode.covering(configs),
                    max_new_tokens=max_new, cache_len=cache_len, share_lm_head=True)
    return speculative_generate.lower(params, dparams, None, tokens, lengths, place_rows(rows), loop=loop)


def child(args) -> dict:
    """Compile one configuration and return its round-loop collective census."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from dspark_jax.collectives import loop_collectives, summarize
    from dspark_jax.config import TargetConfig
    from dspark_jax.draft.config import DraftConfig
    from dspark_jax.draft.model import init_draft_params
    from dspark_jax.sampling import SamplingConfig
    from dspark_jax.sharding import batch_sharding, make_mesh, target_param_shardings

    vocab = args.vocab_size
    cfg = TargetConfig(vocab_size=vocab, hidden_size=2560, intermediate_size=9728, num_hidden_layers=args.layers,
                       num_attention_heads=32, num_key_value_heads=args.kv_heads, head_dim=128,
                       tie_word_embeddings=True, dtype="bfloat16", max_position_embeddings=40960)
    dcfg = DraftConfig.from_target(cfg, num_hidden_layers=1, block_size=7, mask_token_id=vocab - 1,
                                   target_layer_ids=tuple(range(min(args.layers - 1, 5))) or (0,),
                                   markov_rank=256)
    mesh = make_mesh(data=args.data, model=args.model)
    t_shard = target_param_shardings(cfg, mesh)
    import flax.linen as nn
    from dspark_jax.target.model import TargetModel
    tok = jnp.zeros((1, 1), jnp.int32)
    t_abs = nn.meta.unbox(jax.eval_shape(lambda: TargetModel(cfg).init(jax.random.PRNGKey(0), tok, tok))["params"])
    params = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), t_abs, t_shard)
    d_abs = jax.eval_shape(lambda: init_draft_params(dcfg, jax.random.PRNGKey(1)))
    dparams = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())), d_abs)
    b, p_len = args.batch, 64
    sampling = SamplingConfig() if args.mode == "greedy" else SamplingConfig(temperature=1.0, top_p=0.9)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = lower_loop(cfg, dcfg, params, dparams, b, p_len, args.cache_len, sampling, mesh,
                             batch_sharding(mesh, 2, b))
        hlo = lowered.compile().as_text()
    compile_s = time.perf_counter() - t0
    loop = loop_collectives(hlo)
    shard = vocab // args.model
    vocab_sized = [c for c in loop if c.has_dim((vocab, shard))]
    return {"layers": args.layers, "kv_heads": args.kv_heads, "mode": args.mode, "batch": b,
            "cache_len": args.cache_len, "mesh": [args.data, 1, args.model], "compile_s": round(compile_s, 1),
            "round": summarize(loop),
            "vocab_sized": {"count": len(vocab_sized), "bytes": sum(c.bytes for c in vocab_sized)},
            "all_to_all": sum(1 for c in loop if c.kind == "all-to-all"),
            "collective_permute": sum(1 for c in loop if c.kind == "collective-permute")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", default="after", help="'before' / 'after' (recorded in the JSON and the file name)")
    p.add_argument("--kv-heads", default="8,2", help="comma list of KV-head counts (query heads stay 32)")
    p.add_argument("--modes", default="greedy,sampled")
    p.add_argument("--layers", default="2,4", help="two layer counts for the linear extrapolation")
    p.add_argument("--target-layers", type=int, default=36)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cache-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=151936)
    p.add_argument("--data", type=int, default=2)
    p.add_argument("--model", type=int, default=4)
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="greedy", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.layers, args.kv_heads = int(args.layers), int(args.kv_heads)
        print("RESULT " + json.dumps(child(args)))
        return 0

    from common import machine_info, print_table, save_result

    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.data * args.model}")
    runs = []
    for kvh in [int(x) for x in args.kv_heads.split(",")]:
        for mode in args.modes.split(","):
            for layers in [int(x) for x in args.layers.split(",")]:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--kv-heads", str(kvh), "--mode", mode,
                       "--layers", str(layers), "--batch", str(args.batch), "--cache-len", str(args.cache_len),
                       "--vocab-size", str(args.vocab_size), "--data", str(args.data), "--model", str(args.model)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                runs.append(json.loads(proc.stdout.split("RESULT ", 1)[1]))
                print(f"kv_heads={kvh} {mode} layers={layers}: {runs[-1]['round']['count']} collectives, "
                      f"{runs[-1]['round']['bytes'] / 1e6:.2f} MB/round ({runs[-1]['compile_s']} s compile)", flush=True)
    rows = []
    lo_l, hi_l = [int(x) for x in args.layers.split(",")][:2]
    for kvh in [int(x) for x in args.kv_heads.split(",")]:
        for mode in args.modes.split(","):
            lo = next(r for r in runs if r["kv_heads"] == kvh and r["mode"] == mode and r["layers"] == lo_l)
            hi = next(r for r in runs if r["kv_heads"] == kvh and r["mode"] == mode and r["layers"] == hi_l)
            per_layer = (hi["round"]["bytes"] - lo["round"]["bytes"]) / (hi_l - lo_l)
            fixed = lo["round"]["bytes"] - per_layer * lo_l
            per_layer_n = (hi["round"]["count"] - lo["round"]["count"]) / (hi_l - lo_l)
            rows.append({"kv_heads": kvh, "mode": mode, "per_layer_MB": per_layer / 1e6, "fixed_MB": fixed / 1e6,
                         f"MB_at_{args.target_layers}L": (fixed + per_layer * args.target_layers) / 1e6,
                         f"count_at_{args.target_layers}L": round(lo["round"]["count"] - per_layer_n * lo_l
                                                                  + per_layer_n * args.target_layers),
                         "vocab_sized_MB": hi["vocab_sized"]["bytes"] / 1e6, "all_to_all": hi["all_to_all"],
                         "collective_permute": hi["collective_permute"]})
    print_table(rows, [("kv_heads", "KVH", "{}"), ("mode", "mode", "{}"), ("per_layer_MB", "MB/layer", "{:.3f}"),
                       ("fixed_MB", "MB fixed", "{:.2f}"), (f"MB_at_{args.target_layers}L",
                                                            f"MB/round@{args.target_layers}L", "{:.2f}"),
                       (f"count_at_{args.target_layers}L", f"ops@{args.target_layers}L", "{}"),
                       ("vocab_sized_MB", "vocab-sized MB", "{:.2f}"),
                       ("all_to_all", f"all-to-all@{hi_l}L", "{}"),
                       ("collective_permute", f"coll-permute@{hi_l}L", "{}")])
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"collectives_{args.label}.json")
    save_result(out, {"benchmark": "collectives", "label": args.label, "machine": machine_info(with_jax=False),
                      "compiled_for": f"cpu, {args.data * args.model} simulated devices (see docstring)",
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "summary": rows, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
