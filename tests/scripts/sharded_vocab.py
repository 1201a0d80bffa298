"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8: vocab-parallel sampling on a 2 x 4 mesh.

Logits [4, 3, V] sharded (batch over data, vocabulary over model) give the same warped
distributions, argmax, samples and rejection pieces as the single-device `dspark_jax.sampling`
code, and the compiled programs move no vocabulary-sized operand. Prints 'OK <max error>'.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dspark_jax import vocab_parallel as vp
from dspark_jax.collectives import collective_census
from dspark_jax.sampling import SamplingConfig, greedy_argmax, sample_from_probs, warp_probs
from dspark_jax.sharding import make_mesh

assert len(jax.devices()) == 8, jax.devices()
V = 1024
rng = np.random.RandomState(0)
logits = jnp.asarray(np.round(rng.randn(4, 3, V) * 2, 1), jnp.float32)  # rounded: many ties
mesh = make_mesh(data=2, model=4)
sharded = jax.device_put(logits, NamedSharding(mesh, P("data", None, "model")))
cases = [(1.0, 0, 0.9), (0.7, 5, 1.0), (1.3, 10, 0.6), (1.0, 3, 0.5), (0.5, 0, 0.3), (1.0, 0, 1.0)]
worst = 0.0


def check_hlo(fn, *args):
    hlo = fn.lower(*args).compile().as_text()
    bad = [c for c in collective_census(hlo) if c.has_dim((V, V // 4))]
    assert not bad, bad


# one compiled program per static mode (top_k_bound, use_top_p): the values are traced, as in the loop
wfn = jax.jit(lambda z, t, k, p, bound, use_top_p: vp.warp_probs(z, t, k, p, top_k_bound=bound, use_top_p=use_top_p),
              static_argnums=(4, 5))
sfn = jax.jit(lambda key, pr: vp.inverse_cdf(pr, jax.random.uniform(key, pr.shape[:-1])))
hlo_checked = False
with jax.set_mesh(mesh):
    for t, k, p in cases:
        sc = SamplingConfig(temperature=t, top_k=k, top_p=p)
        ref = warp_probs(logits, sc.params(), sc.mode)
        args = (sharded, jnp.full((4,), t), jnp.full((4,), k), jnp.full((4,), p), sc.mode.top_k_bound,
                sc.mode.use_top_p)
        got = wfn(*args)
        assert "model" in str(got.sharding.spec), got.sharding
        err = float(jnp.max(jnp.abs(got - ref)))
        worst = max(worst, err)
        assert err < 1e-6 and bool(jnp.all((got > 0) == (ref > 0))), (t, k, p, err)
        key = jax.random.PRNGKey(int(t * 10 + k))
        assert bool(jnp.all(sfn(key, got) == sample_from_probs(key, ref, sc.mode))), (t, k, p)
        if k and p < 1 and not hlo_checked:  # HLO checks (a compile each) on the mode running every warping stage
            check_hlo(wfn, *args)
            check_hlo(sfn, key, got)
            hlo_checked = True
    # mixed per-row settings: greedy row 0, top-k row 1, top-p row 2, plain row 3 == each alone
    temps, ks, ps = jnp.asarray([0.0, 0.8, 1.2, 1.0]), jnp.asarray([0, 7, 0, 0]), jnp.asarray([1.0, 1.0, 0.7, 1.0])
    mixed = jax.jit(lambda z: vp.warp_probs(z, temps, ks, ps, top_k_bound=64, use_top_p=True))(sharded)
    for r, (t, k, p) in enumerate(zip([0.0, 0.8, 1.2, 1.0], [0, 7, 0, 0], [1.0, 1.0, 0.7, 1.0])):
        sc = SamplingConfig(temperature=t, top_k=k, top_p=p)
        ref = warp_probs(logits[r], sc.params(), sc.mode)
        assert float(jnp.max(jnp.abs(mixed[r] - ref))) < 1e-6, r
    am = jax.jit(vp.argmax)
    assert bool(jnp.all(am(sharded) == greedy_argmax(logits)))
    check_hlo(am, sharded)
    lse = jax.jit(vp.logsumexp)(sharded)
    assert float(jnp.max(jnp.abs(lse - jax.nn.logsumexp(logits, -1)))) < 1e-5
    # rejection pieces
    p_t = jax.nn.softmax(logits, -1)
    p_d = jax.nn.softmax(jnp.roll(logits, 1, axis=-1), -1)
    s_pt, s_pd = (jax.device_put(x, sharded.sharding) for x in (p_t, p_d))
    toks = jnp.asarray(rng.randint(0, V, (4, 3)), jnp.int32)
    tp = jax.jit(vp.token_probs)
    assert float(jnp.max(jnp.abs(tp(s_pt, toks) - jnp.take_along_axis(p_t, toks[..., None], -1)[..., 0]))) < 1e-7
    check_hlo(tp, s_pt, toks)
    res = jax.jit(vp.residual)
    r_ref = jnp.maximum(p_t - p_d, 0)
    r_ref = r_ref / jnp.sum(r_ref, -1, keepdims=True)
    assert float(jnp.max(jnp.abs(res(s_pt, s_pd) - r_ref))) < 1e-6
    check_hlo(res, s_pt, s_pd)
print(f"OK {worst:.2e}")
sys.exit(0)
