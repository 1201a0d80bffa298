"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8: sharded (mesh 2x4) == 1 device.

Checks target forward logits/taps, autoregressive generate and speculative generate (target
sharded over `model`, batch over `data`, draft replicated). Prints 'OK <max logit error>'.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.sharding import batch_sharding, make_mesh, replicated_shardings, shard_params, target_param_shardings
from dspark_jax.target.model import TargetModel
from infer.api import Target, generate
from infer.speculative_api import Draft
from tests.spec_helpers import oracle_draft, random_target

assert len(jax.devices()) == 8, jax.devices()
cfg, params = random_target(vocab=64, hidden=64, context_scale=0.05)
dcfg, dparams = oracle_draft(cfg, params, block_size=4, head="vanilla")
prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]
tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (4, 12)), jnp.int32)
pos = jnp.broadcast_to(jnp.arange(12), (4, 12))
model = TargetModel(cfg)
fwd = jax.jit(lambda p, t: model.apply({"params": p}, t, pos, tap_layers=(0,)))
ref = fwd(params, tokens)
ar_ref = generate(Target(config=cfg, params=params), prompts, max_new_tokens=12).token_ids
sp_ref = generate(Target(config=cfg, params=params), prompts, draft=Draft(config=dcfg, params=dparams),
                  max_new_tokens=12, sampling=None).token_ids

mesh = make_mesh(data=2, model=4)
sharded = shard_params(params, target_param_shardings(cfg, mesh))
q = sharded["layers_0"]["self_attn"]["q_proj"]["kernel"]
assert "model" in str(q.sharding.spec), q.sharding
with jax.set_mesh(mesh):
    out = fwd(sharded, jax.device_put(tokens, batch_sharding(mesh, 2, 4)))
    err = float(jnp.max(jnp.abs(out.logits - ref.logits)))
    tap_err = float(jnp.max(jnp.abs(out.taps[0] - ref.taps[0])))
    assert err < 1e-4 and tap_err < 1e-4, (err, tap_err)
    ar = generate(Target(config=cfg, params=sharded), prompts, max_new_tokens=12).token_ids
    assert ar == ar_ref, (ar, ar_ref)
    dp_rep = shard_params(dparams, replicated_shardings(dparams, mesh))
    sp = generate(Target(config=cfg, params=sharded), prompts, draft=Draft(config=dcfg, params=dp_rep),
                  max_new_tokens=12).token_ids
    assert sp == sp_ref == ar_ref, (sp, sp_ref)
print(f"OK {err:.2e} {tap_err:.2e}")
sys.exit(0)
