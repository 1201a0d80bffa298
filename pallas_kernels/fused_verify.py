"""Fused speculative verification: warping, accept/reject, residual and bonus sampling per request.

Per request r with ``num[r] <= K`` drafts x_0..x_{K-1}, target logits of the K+1 verified
positions ``[K+1, V]`` and the draft's warped float32 distributions ``p_d [K, V]``:

  z_i     = logits_i / T_r, kept where z_i >= cut_i (the top-k/top-p cut; -inf = none)
  p_t[i]  = softmax of z_i over the kept set
  accept  = u_i < min(1, p_t[i][x_i] / max(p_d[i][x_i], 1e-8)), i < num; a = accepted prefix length
  next    = Gumbel-argmax of log max(p_t[a] - p_d[a], 0)   if a < num (residual; p_t[a] if its mass <= 1e-8)
          = Gumbel-argmax of log p_t[num]                   if a == num (bonus)
  greedy requests (T_r == 0): accept while x_i == argmax logits_i; next = argmax logits_a.

Randomness is counter-based (`hash_uniform` of a per-request uint32 seed): u_i = U(seed, i,
stream 0), Gumbel noise g_v = G(seed, v, stream 1). The kernel and `reference_fused_verify`
draw exactly the same numbers, so they return the same tokens for the same seeds. Gumbel-argmax
over unnormalised log-weights samples exactly from the normalised distribution.

The top-k/top-p cut is a per-(request, position) scalar found by a `lax.top_k` (top-k) or sort
(top-p) pre-pass (`warp_cuts`, same definitions as `dspark_jax.sampling.warp_probs`); the kernel
does everything else in two sweeps over vocabulary tiles of the request's rows (statistics and
the draft-token gathers; then the residual/bonus Gumbel-argmax), writing only ``accepted [R]``
and ``next_token [R]``. One program per request: the request's ``[K+1, V]`` logits and
``[K, V]`` draft rows stay on chip (TPU: VMEM blocks; GPU: tile loads inside the program).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import (NEG_INF, check_platform, compiler_params, gumbel, hash_uniform, next_pow2,
                                    pad_axis, round_up, row_size)

__all__ = ["fused_verify", "reference_fused_verify", "warp_cuts", "request_seeds"]

Array = jax.Array
_BIG = 2 ** 30


def request_seeds(keys: Array) -> Array:
    """Per-request uint32 seeds [R] from per-request PRNG keys [R] (or [R, 2] raw keys)."""
    return jax.vmap(lambda k: jax.random.bits(k, (), jnp.uint32))(keys)


def warp_cuts(logits: Array, temperature: Array, top_k: Array, top_p: Array, *, top_k_bound: int = 0,
              use_top_p: bool = False) -> Array:
    """Per-row cut on the scaled logits z = logits / T: tokens with z >= cut are kept. [..., V] -> [...].

    temperature, top_k, top_p broadcast against logits.shape[:-1] (top_k 0 / top_p 1 = off for
    that row). top_k_bound: static upper bound on top_k (0 = top-k off everywhere); use_top_p:
    static switch. Definitions of `dspark_jax.sampling.warp_probs`: top-k keeps ties at the k-th
    value; top-p keeps the smallest prefix of the sorted kept set whose mass before each kept
    token is < p (at least one token), ties at the last kept value included.
    """
    temperature = jnp.asarray(temperature, jnp.float32)
    z = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[..., None]  # greedy rows: T = 1
    vocab = z.shape[-1]
    cut = jnp.full(z.shape[:-1], NEG_INF, jnp.float32)
    if top_k_bound > 0:
        bound = min(vocab, top_k_bound)
        top = jax.lax.top_k(z, bound)[0]  # [..., bound] descending
        k = jnp.clip(top_k.astype(jnp.int32), 1, bound)
        kth = jnp.take_along_axis(top, (k - 1)[..., None], axis=-1)[..., 0]
        cut = jnp.where(top_k > 0, kth, cut)
    if use_top_p:
        zk = jnp.where(z >= cut[..., None], z, NEG_INF)
        srt = -jnp.sort(-zk, axis=-1)
        p = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(p, axis=-1) - p
        n_keep = jnp.maximum(jnp.sum(before < top_p[..., None], axis=-1), 1)
        thr = jnp.take_along_axis(srt, (n_keep - 1)[..., None], axis=-1)[..., 0]
        cut = jnp.where(top_p < 1.0, jnp.maximum(cut, thr), cut)
    return cut


def reference_fused_verify(target_logits: Array, draft_tokens: Array, draft_probs: Array, num_proposed: Array,
                           temperature: Array, cuts: Array, seeds: Array) -> tuple[Array, Array]:
    """Pure-jnp fused verification (the XLA path and the kernel's oracle).

    target_logits [R, K+1, V]; draft_tokens [R, K] int32; draft_probs [R, K, V] float32 (ignored
    for greedy rows); num_proposed [R]; temperature [R] (0 = greedy); cuts [R, K+1] from
    `warp_cuts`; seeds [R] uint32. Returns (accepted [R] int32, next_token [R] int32).
    """
    r, k1, vocab = target_logits.shape
    k = k1 - 1
    logits = target_logits.astype(jnp.float32)
    greedy = temperature <= 0
    z = logits / jnp.where(greedy, 1.0, temperature)[:, None, None]
    keep = z >= cuts[..., None]
    m = jnp.max(jnp.where(keep, z, NEG_INF), axis=-1, keepdims=True)
    w = jnp.where(keep, jnp.exp(z - m), 0.0)
    p_t = w / jnp.sum(w, axis=-1, keepdims=True)  # [R, K+1, V]
    iota = jnp.arange(vocab, dtype=jnp.int32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    argmax = jnp.min(jnp.where(logits == top, iota, _BIG), axis=-1)  # [R, K+1]

    x = draft_tokens.astype(jnp.int32)
    pt_x = jnp.take_along_axis(p_t[:, :k], x[..., None], axis=-1)[..., 0]
    pd_x = jnp.take_along_axis(draft_probs.astype(jnp.float32), x[..., None], axis=-1)[..., 0]
    u = hash_uniform(seeds[:, None], jnp.arange(k, dtype=jnp.int32)[None, :], 0)
    ok = jnp.where(greedy[:, None], x == argmax[:, :k], u < jnp.minimum(1.0, pt_x / jnp.maximum(pd_x, 1e-8)))
    ok = ok & (jnp.arange(k)[None, :] < num_proposed[:, None])
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)

    pt_a = jnp.take_along_axis(p_t, accepted[:, None, None], axis=1)[:, 0]  # [R, V]
    pd_pad = jnp.concatenate([draft_probs.astype(jnp.float32), jnp.zeros((r, 1, vocab), jnp.float32)], axis=1)
    pd_a = jnp.take_along_axis(pd_pad, accepted[:, None, None], axis=1)[:, 0]
    res = jnp.maximum(pt_a - pd_a, 0.0)
    use_res = (accepted < num_proposed) & (jnp.sum(res, axis=-1) > 1e-8)
    dist = jnp.where(use_res[:, None], res, pt_a)
    g = gumbel(seeds[:, None], iota[None, :], 1)
    key = jnp.where(dist > 0, jnp.log(jnp.where(dist > 0, dist, 1.0)) + g, NEG_INF)
    best = jnp.max(key, axis=-1, keepdims=True)
    sampled = jnp.min(jnp.where(key == best, iota, _BIG), axis=-1)
    greedy_next = jnp.take_along_axis(argmax, accepted[:, None], axis=1)[:, 0]
    return accepted, jnp.where(greedy, greedy_next, sampled).astype(jnp.int32)


def _kernel(logit_ref, pd_ref, x_ref, cut_ref, int_ref, temp_ref, acc_out, next_out, *, vocab, k, tile, n_tiles):
    """One request. logit_ref [K1p, Vp]; pd_ref [K1p, Vp] (row K.. zero); x_ref, cut_ref [K1p, 1];
    int_ref [1, 2] int32: (num, the uint32 seed's bits); temp_ref [1, 1] f32."""
    k1p = x_ref.shape[0]
    ints = int_ref[...]  # [1, 2]
    lane = jax.lax.broadcasted_iota(jnp.int32, ints.shape, 1)
    pick = lambda i: jnp.sum(jnp.where(lane == i, ints, 0), axis=1, keepdims=True)  # [1, 1] (no slicing: Triton)
    num = pick(0)
    seed = pick(1).astype(jnp.uint32)
    temp = temp_ref[...]
    greedy = temp <= 0
    inv_t = 1.0 / jnp.where(greedy, 1.0, temp)
    x = x_ref[...]  # [K1p, 1] (-1 beyond K)
    cut = cut_ref[...]
    rows = jax.lax.broadcasted_iota(jnp.int32, (k1p, 1), 0)

    def tile_at(j):
        start = pl.multiple_of(j * tile, tile)
        lg = logit_ref[:, pl.ds(start, tile)].astype(jnp.float32)  # [K1p, tile]
        v = start + jax.lax.broadcasted_iota(jnp.int32, lg.shape, 1)
        return lg, pd_ref[:, pl.ds(start, tile)].astype(jnp.float32), v

    def stats(j, c):
        m, l, amax_v, amax_i, zx, kx, pdx = c
        lg, pd, v = tile_at(j)
        real = v < vocab
        z = lg * inv_t
        keep = (z >= cut) & real
        zm = jnp.where(keep, z, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(zm, axis=1, keepdims=True))
        safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        l = l * jnp.exp(jnp.where(m == NEG_INF, NEG_INF, m - safe)) + jnp.sum(
            jnp.where(keep, jnp.exp(z - safe), 0.0), axis=1, keepdims=True)
        lgm = jnp.where(real, lg, NEG_INF)
        tmax = jnp.max(lgm, axis=1, keepdims=True)
        tidx = jnp.min(jnp.where(lgm == tmax, v, _BIG), axis=1, keepdims=True)
        better = tmax > amax_v
        hit = v == x
        zx = zx + jnp.sum(jnp.where(hit, z, 0.0), axis=1, keepdims=True)
        kx = kx + jnp.sum(jnp.where(hit & keep, 1.0, 0.0), axis=1, keepdims=True)
        pdx = pdx + jnp.sum(jnp.where(hit, pd, 0.0), axis=1, keepdims=True)
        return (m_new, l, jnp.where(better, tmax, amax_v), jnp.where(better, tidx, amax_i), zx, kx, pdx)

    col = lambda val: jnp.full((k1p, 1), val, jnp.float32)
    m, l, _, amax_i, zx, kx, pdx = jax.lax.fori_loop(
        0, n_tiles, stats, (col(NEG_INF), col(0.0), col(NEG_INF), jnp.full((k1p, 1), _BIG, jnp.int32),
                            col(0.0), col(0.0), col(0.0)))
    pt_x = jnp.where(kx > 0, jnp.exp(zx - jnp.where(m == NEG_INF, 0.0, m)) / jnp.where(l > 0, l, 1.0), 0.0)
    u = hash_uniform(seed, rows, 0)  # [K1p, 1]
    ok = jnp.where(greedy, x == amax_i, u < jnp.minimum(1.0, pt_x / jnp.maximum(pdx, 1e-8)))
    ok = ok & (rows < num) & (rows < k)
    # accepted prefix length = index of the first failing row (rows >= num always fail)
    accepted = jnp.min(jnp.where(ok, _BIG, rows), axis=0, keepdims=True)  # [1, 1]
    sel = rows == accepted  # [K1p, 1] one-hot of row a
    m_a = jnp.sum(jnp.where(sel, m, 0.0), axis=0, keepdims=True)
    l_a = jnp.sum(jnp.where(sel, l, 0.0), axis=0, keepdims=True)
    cut_a = jnp.sum(jnp.where(sel, cut, 0.0), axis=0, keepdims=True)
    greedy_next = jnp.sum(jnp.where(sel, amax_i, 0), axis=0, keepdims=True)
    rejected = accepted < num

    def sample(j, c):
        bres, ires, bpt, ipt, mass = c
        lg, pd, _ = tile_at(j)
        v1 = j * tile + jax.lax.broadcasted_iota(jnp.int32, (1, tile), 1)
        real = v1 < vocab
        z_a = jnp.sum(jnp.where(sel, lg, 0.0), axis=0, keepdims=True) * inv_t  # [1, tile]
        pd_a = jnp.sum(jnp.where(sel, pd, 0.0), axis=0, keepdims=True)
        keep = (z_a >= cut_a) & real
        pt_a = jnp.where(keep, jnp.exp(z_a - m_a) / l_a, 0.0)
        res = jnp.maximum(pt_a - pd_a, 0.0)
        g = gumbel(seed, v1, 1)
        k_res = jnp.where(res > 0, jnp.log(jnp.where(res > 0, res, 1.0)) + g, NEG_INF)
        k_pt = jnp.where(pt_a > 0, jnp.log(jnp.where(pt_a > 0, pt_a, 1.0)) + g, NEG_INF)
        out = []
        for best, idx, key in ((bres, ires, k_res), (bpt, ipt, k_pt)):
            tb = jnp.max(key, axis=1, keepdims=True)
            ti = jnp.min(jnp.where(key == tb, v1, _BIG), axis=1, keepdims=True)
            better = tb > best
            out += [jnp.where(better, tb, best), jnp.where(better, ti, idx)]
        return (*out, mass + jnp.sum(res, axis=1, keepdims=True))

    one = lambda val, dt=jnp.float32: jnp.full((1, 1), val, dt)
    _, ires, _, ipt, mass = jax.lax.fori_loop(
        0, n_tiles, sample, (one(NEG_INF), one(_BIG, jnp.int32), one(NEG_INF), one(_BIG, jnp.int32), one(0.0)))
    sampled = jnp.where(rejected & (mass > 1e-8), ires, ipt)
    nxt = jnp.where(greedy, greedy_next, sampled)
    acc_out[...] = jnp.broadcast_to(accepted, acc_out.shape)
    next_out[...] = jnp.broadcast_to(nxt, next_out.shape)


@functools.partial(jax.jit, static_argnames=("platform", "interpret", "tile"))
def fused_verify(target_logits: Array, draft_tokens: Array, draft_probs: Array, num_proposed: Array,
                 temperature: Array, cuts: Array, seeds: Array, *, platform: str = "tpu", interpret: bool = False,
                 tile: int | None = None) -> tuple[Array, Array]:
    """Pallas fused verification; same contract and same outputs as `reference_fused_verify`."""
    check_platform(platform)
    r, k1, vocab = target_logits.shape
    k = k1 - 1
    k1p = row_size(k1, platform)
    tile = tile or (min(2048, round_up(vocab, 128)) if platform == "tpu" else min(512, next_pow2(vocab, 16)))
    vp = round_up(vocab, tile)
    logits = pad_axis(pad_axis(target_logits, 2, vp), 1, k1p)
    pd = pad_axis(pad_axis(draft_probs.astype(jnp.float32), 2, vp), 1, k1p)
    x = pad_axis(draft_tokens.astype(jnp.int32), 1, k1p, -1)[..., None]  # [R, K1p, 1]
    cut = pad_axis(cuts.astype(jnp.float32), 1, k1p, NEG_INF)[..., None]
    ints = jnp.stack([num_proposed.astype(jnp.int32), jax.lax.bitcast_convert_type(seeds.astype(jnp.uint32), jnp.int32)],
                     axis=-1)[:, None, :]  # [R, 1, 2]
    temp = temperature.astype(jnp.float32).reshape(r, 1, 1)
    lanes = 128 if platform == "tpu" else 16
    outs = [jax.ShapeDtypeStruct((r, 1, lanes), jnp.int32)] * 2
    row3 = lambda a, b: pl.BlockSpec((None, a, b), lambda i: (i, 0, 0))
    vmem = 2 * 2 * k1p * vp * 4 + (8 << 20)  # two double-buffered [K1p, Vp] f32 rows + slack
    cp = None if interpret else compiler_params(platform, ("parallel",), vmem_bytes=vmem)
    acc, nxt = pl.pallas_call(
        functools.partial(_kernel, vocab=vocab, k=k, tile=tile, n_tiles=vp // tile), grid=(r,), out_shape=outs,
        in_specs=[row3(k1p, vp), row3(k1p, vp), row3(k1p, 1), row3(k1p, 1), row3(1, 2), row3(1, 1)],
        out_specs=[row3(1, lanes), row3(1, lanes)], compiler_params=cp, interpret=interpret,
    )(logits, pd, x, cut, ints, temp)
    return acc[:, 0, 0], nxt[:, 0, 0]
