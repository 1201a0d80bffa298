"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8: the sharded speculative loop.

Target with 6 query heads and 2 KV heads (fewer KV heads than the model axis) on a data 2 x
model 4 mesh via `generate(..., mesh=...)`, greedy and sampled in float32, sampled in bfloat16:
  * outputs equal the 1-device run (greedy token for token; sampled with the same seed, the same
    tokens: the draws use the same uniforms, only float32 summation order differs);
  * the target forward (logits, taps) and autoregressive generate equal the 1-device run;
  * the compiled loop moves no vocabulary-sized operand through any collective, and has no
    all-to-all (KV heads are replicated, not split along head_dim).
Run with --xla_allow_excess_precision=false as well: by default XLA may skip bfloat16 roundings
between ops (keeping float32), and where it does so depends on the program (sharding constraints
and collectives break the patterns), so bfloat16 results would differ by partitioning alone.
Prints 'OK'.
"""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from dspark_jax.collectives import collective_census
from dspark_jax.config import TargetConfig
from dspark_jax.sampling import SamplingConfig
from dspark_jax.sharding import make_mesh
from dspark_jax.target.model import TargetModel
from infer import compiled
from infer.api import Target, generate
from infer.speculative_api import Draft
from tests.spec_helpers import oracle_draft

assert len(jax.devices()) == 8, jax.devices()
V = 320  # V / model = 80: no other dimension of the loop has that size
mesh = make_mesh(data=2, model=4)
prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]


def models(dtype: str):
    cfg = TargetConfig(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=512)
    tok = jnp.zeros((1, 1), jnp.int32)
    params = nn.meta.unbox(TargetModel(cfg).init(jax.random.PRNGKey(0), tok, tok)["params"])
    params = jax.tree_util.tree_map(lambda x: x * 8.0 if x.ndim > 1 else x, params)
    for i in range(2):
        for mod, name in (("self_attn", "o_proj"), ("mlp", "down_proj")):
            params[f"layers_{i}"][mod][name]["kernel"] = params[f"layers_{i}"][mod][name]["kernel"] * 0.05
    dcfg, dparams = oracle_draft(cfg, params, block_size=4, head="vanilla")
    if dtype != "float32":
        import dataclasses

        cast = lambda t: jax.tree_util.tree_map(lambda x: x.astype(dtype), t)  # noqa: E731
        cfg, params = dataclasses.replace(cfg, dtype=dtype), cast(params)
        dcfg, dparams = dataclasses.replace(dcfg, dtype=dtype), cast(dparams)
    return Target(config=cfg, params=params), Draft(config=dcfg, params=dparams)


def last_hlo() -> str:
    return list(compiled._COMPILED.values())[-1].as_text()


only = sys.argv[1:]  # e.g. "bfloat16" to run one dtype while debugging
for dtype in [d for d in ("float32", "bfloat16") if not only or d in only]:
    target, draft = models(dtype)
    if dtype == "float32":  # forward and the autoregressive loop
        import numpy as np

        from dspark_jax.sharding import batch_sharding, shard_params, target_param_shardings

        tokens = jnp.asarray(np.random.RandomState(0).randint(0, V, (4, 12)), jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(12), (4, 12))
        fwd = jax.jit(lambda p, t: TargetModel(target.config).apply({"params": p}, t, pos, tap_layers=(0,)))
        ref = fwd(target.params, tokens)
        sharded = shard_params(target.params, target_param_shardings(target.config, mesh))
        assert "model" in str(sharded["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec)
        with jax.set_mesh(mesh):
            out = fwd(sharded, jax.device_put(tokens, batch_sharding(mesh, 2, 4)))
        assert float(jnp.max(jnp.abs(out.logits - ref.logits))) < 1e-4
        assert float(jnp.max(jnp.abs(out.taps[0] - ref.taps[0]))) < 1e-4
        ar = generate(target, prompts, max_new_tokens=12)
        assert generate(target, prompts, max_new_tokens=12, mesh=mesh).token_ids == ar.token_ids
    # bfloat16 runs the sampled loop only: its forward passes (where bfloat16 rounding could depend on the
    # partitioning) are those of the greedy loop, and the greedy verify path is checked in float32
    samplings = [SamplingConfig(temperature=1.0, top_k=20, top_p=0.9)]
    for sampling in ([SamplingConfig()] if dtype == "float32" else []) + samplings:
        kw = dict(draft=draft, max_new_tokens=12, sampling=sampling, seed=3)
        ref = generate(target, prompts, **kw)
        out = generate(target, prompts, mesh=mesh, **kw)
        hlo = last_hlo()
        colls = collective_census(hlo)
        vocab_moves = [c for c in colls if c.has_dim((V, V // 4))]
        assert not vocab_moves, (dtype, sampling, vocab_moves)
        assert not [c for c in colls if c.kind == "all-to-all"], (dtype, sampling)
        assert out.token_ids == ref.token_ids, (dtype, sampling, out.token_ids, ref.token_ids)
        print(dtype, sampling.temperature, len(colls), "collectives", flush=True)
print("OK")
sys.exit(0)
