"""Fused sequential Markov sampler (DSpark spec §2.5): K draft steps of bias, warping, sampling, confidence.

For every row b and slot k = 0..K-1 (prev = anchor at k = 0, else the token drawn at k-1):

  e_k   = W1[prev]                                             [r]
  f_k   = e_k (vanilla) | sigmoid([h_k ; e_k] @ Wg + bg) * e_k (gated)
  Z_k   = U_k + f_k @ W2                                       [V] float32
  x_k   = argmax Z_k (greedy rows, T = 0) | Gumbel-argmax of Z_k / T  (= a draw from softmax(Z_k / T))
  p_k   = softmax(Z_k / T) (one-hot of x_k for greedy rows)     the draft distribution the verifier needs
  c_k   = [h_k ; e_k] @ Wc + bc  (or h_k @ Wc + bc)             confidence logit

Gumbel noise is counter-based (`hash_uniform` of a per-row uint32 seed, stream 2 + k, index v),
so the kernel and `reference_markov_sampler` draw the same tokens for the same seeds. Warping is
temperature only: rows with top-k/top-p use the XLA path (the dispatcher checks the static
sampling mode). The RNN head (state carried across slots) is not fused.

Layout: rows in groups of BB; the lookups W1[prev] are one-hot matmuls over vocabulary tiles
(portable: no scalar extraction), Z_k is computed tile by tile (U tile + f_k @ W2 tile), twice
per slot (statistics + Gumbel-argmax, then the normalised probabilities).
* TPU: grid (B/BB, K) with K sequential ("arbitrary"); the previous token lives in VMEM scratch;
  W1/W2 are single-buffered VMEM-resident blocks.
* GPU: grid (B/BB,); the K slots are a loop inside the program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import (NEG_INF, check_platform, compiler_params, gumbel, lane_size, next_pow2, pad_axis,
                                    round_up, row_size)

__all__ = ["markov_sampler", "reference_markov_sampler", "HEAD_TYPES"]

Array = jax.Array
HEAD_TYPES = ("vanilla", "gated")
_BIG = 2 ** 30
_HI = jax.lax.Precision.HIGHEST


def _mm(a, b):
    return jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision=_HI, preferred_element_type=jnp.float32)


def reference_markov_sampler(base_logits: Array, h: Array, anchor: Array, temperature: Array, seeds: Array,
                             w1: Array, w2: Array, *, head_type: str = "vanilla", gate_w: Array | None = None,
                             gate_b: Array | None = None, conf_w: Array | None = None, conf_b: Array | None = None,
                             conf_with_markov: bool = True) -> tuple[Array, Array, Array]:
    """Pure-jnp sequential sampler (the XLA path and the kernel's oracle).

    base_logits U [B, K, V] float32; h [B, K, d]; anchor [B] int32; temperature [B] (0 = greedy);
    seeds [B] uint32; w1 [V, r]; w2 [r, V]; gated: gate_w [d + r, r], gate_b [r] (input [h ; e]);
    confidence (optional): conf_w [d (+ r), 1], conf_b [1]. Returns (tokens [B, K] int32,
    probs [B, K, V] float32, confidence logits [B, K] float32 (zeros without conf_w)).
    """
    if head_type not in HEAD_TYPES:
        raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {head_type!r}")
    b, k, vocab = base_logits.shape
    greedy = temperature <= 0
    inv_t = 1.0 / jnp.where(greedy, 1.0, temperature)[:, None]
    iota = jnp.arange(vocab, dtype=jnp.int32)
    prev = anchor.astype(jnp.int32)
    toks, probs, confs = [], [], []
    for i in range(k):
        e = jnp.take(w1, prev, axis=0).astype(jnp.float32)  # [B, r]
        hk = h[:, i].astype(jnp.float32)
        feats = e
        if head_type == "gated":
            feats = jax.nn.sigmoid(_mm(jnp.concatenate([hk, e], axis=-1), gate_w) + gate_b.astype(jnp.float32)) * e
        z = base_logits[:, i].astype(jnp.float32) + _mm(feats, w2)  # [B, V]
        zt = z * inv_t
        key = zt + gumbel(seeds[:, None], iota[None, :], 2 + i)
        best = jnp.max(key, axis=-1, keepdims=True)
        sampled = jnp.min(jnp.where(key == best, iota, _BIG), axis=-1)
        top = jnp.max(z, axis=-1, keepdims=True)
        arg = jnp.min(jnp.where(z == top, iota, _BIG), axis=-1)
        tok = jnp.where(greedy, arg, sampled).astype(jnp.int32)
        p = jax.nn.softmax(zt, axis=-1)
        probs.append(jnp.where(greedy[:, None], (iota[None, :] == tok[:, None]).astype(jnp.float32), p))
        if conf_w is not None:
            cin = jnp.concatenate([hk, e], axis=-1) if conf_with_markov else hk
            confs.append(_mm(cin, conf_w)[:, 0] + conf_b.astype(jnp.float32)[0])
        else:
            confs.append(jnp.zeros((b,), jnp.float32))
        toks.append(tok)
        prev = tok
    return jnp.stack(toks, 1), jnp.stack(probs, 1), jnp.stack(confs, 1)


def _slot(k, prev, temp, seed, hk, load_u, store_p, w1_ref, w2_ref, gwh_ref, gwe_ref, gb_ref, cwh_ref, cwe_ref,
          cb_ref, *, vocab, tile, n_tiles, gated, with_probs):
    """One slot for a row group. prev [BB, 1] int32; temp [BB, 1]; seed [BB, 1] uint32; hk [BB, dp] f32.
    Returns (token [BB, 1] int32, confidence [BB, 1] f32)."""
    bb = prev.shape[0]
    rp = w1_ref.shape[1]
    greedy = temp <= 0
    inv_t = 1.0 / jnp.where(greedy, 1.0, temp)

    def viota(j):
        return j * tile + jax.lax.broadcasted_iota(jnp.int32, (bb, tile), 1)

    def embed(j, e):  # e += onehot(prev)[:, tile j] @ W1[tile j]
        start = pl.multiple_of(j * tile, tile)
        onehot = (viota(j) == prev).astype(jnp.float32)
        return e + _mm(onehot, w1_ref[pl.ds(start, tile), :])

    e = jax.lax.fori_loop(0, n_tiles, embed, jnp.zeros((bb, rp), jnp.float32))
    feats = e
    if gated:
        feats = jax.nn.sigmoid(_mm(hk, gwh_ref[...]) + _mm(e, gwe_ref[...]) + gb_ref[...].astype(jnp.float32)) * e
    conf = (jnp.sum(hk * cwh_ref[...].astype(jnp.float32), axis=1, keepdims=True)
            + jnp.sum(e * cwe_ref[...].astype(jnp.float32), axis=1, keepdims=True) + cb_ref[...].astype(jnp.float32))

    def z_tile(j):
        start = pl.multiple_of(j * tile, tile)
        return load_u(start).astype(jnp.float32) + _mm(feats, w2_ref[:, pl.ds(start, tile)])

    def stats(j, c):
        m, l, gbest, gidx, abest, aidx = c
        v = viota(j)
        real = v < vocab
        z = jnp.where(real, z_tile(j), NEG_INF)
        zt = z * inv_t
        m_new = jnp.maximum(m, jnp.max(zt, axis=1, keepdims=True))
        l = l * jnp.exp(jnp.where(m == NEG_INF, NEG_INF, m - m_new)) + jnp.sum(
            jnp.where(real, jnp.exp(zt - m_new), 0.0), axis=1, keepdims=True)
        out = [m_new, l]
        for best, idx, key in ((gbest, gidx, zt + gumbel(seed, v, 2 + k)), (abest, aidx, z)):
            key = jnp.where(real, key, NEG_INF)
            tb = jnp.max(key, axis=1, keepdims=True)
            ti = jnp.min(jnp.where(key == tb, v, _BIG), axis=1, keepdims=True)
            better = tb > best
            out += [jnp.where(better, tb, best), jnp.where(better, ti, idx)]
        return tuple(out)

    col = lambda val, dt=jnp.float32: jnp.full((bb, 1), val, dt)
    m, l, _, gidx, _, aidx = jax.lax.fori_loop(
        0, n_tiles, stats, (col(NEG_INF), col(0.0), col(NEG_INF), col(_BIG, jnp.int32), col(NEG_INF),
                            col(_BIG, jnp.int32)))
    tok = jnp.where(greedy, aidx, gidx)
    if with_probs:
        def write(j, carry):
            v = viota(j)
            p = jnp.where(v < vocab, jnp.exp(z_tile(j) * inv_t - m) / l, 0.0)
            store_p(pl.multiple_of(j * tile, tile), jnp.where(greedy, (v == tok).astype(jnp.float32), p))
            return carry

        jax.lax.fori_loop(0, n_tiles, write, 0)
    return tok, conf


def _tpu_kernel(anchor_ref, temp_ref, seed_ref, h_ref, u_ref, w1_ref, w2_ref, gwh_ref, gwe_ref, gb_ref, cwh_ref,
                cwe_ref, cb_ref, tok_ref, p_ref, conf_ref, prev_sc, **kw):
    k = pl.program_id(1)

    @pl.when(k == 0)
    def _start():
        prev_sc[...] = anchor_ref[...]

    def store(start, val):
        p_ref[:, pl.ds(start, kw["tile"])] = val

    tok, conf = _slot(k, prev_sc[...], temp_ref[...], seed_ref[...].astype(jnp.uint32), h_ref[...].astype(jnp.float32),
                      lambda start: u_ref[:, pl.ds(start, kw["tile"])], store, w1_ref, w2_ref, gwh_ref, gwe_ref,
                      gb_ref, cwh_ref, cwe_ref, cb_ref, **kw)
    prev_sc[...] = tok
    tok_ref[...] = jnp.broadcast_to(tok, tok_ref.shape)
    conf_ref[...] = jnp.broadcast_to(conf, conf_ref.shape)


def _gpu_kernel(anchor_ref, temp_ref, seed_ref, h_ref, u_ref, w1_ref, w2_ref, gwh_ref, gwe_ref, gb_ref, cwh_ref,
                cwe_ref, cb_ref, tok_ref, p_ref, conf_ref, *, num_slots, **kw):
    prev = anchor_ref[...]
    temp, seed = temp_ref[...], seed_ref[...].astype(jnp.uint32)
    tile = kw["tile"]
    for k in range(num_slots):
        def load(start, k=k):
            return u_ref[k, :, pl.ds(start, tile)]

        def store(start, val, k=k):
            p_ref[k, :, pl.ds(start, tile)] = val

        tok, conf = _slot(k, prev, temp, seed, h_ref[k].astype(jnp.float32), load, store, w1_ref, w2_ref,
                          gwh_ref, gwe_ref, gb_ref, cwh_ref, cwe_ref, cb_ref, **kw)
        tok_ref[k] = jnp.broadcast_to(tok, tok_ref.shape[1:])
        conf_ref[k] = jnp.broadcast_to(conf, conf_ref.shape[1:])
        prev = tok


@functools.partial(jax.jit, static_argnames=("head_type", "conf_with_markov", "with_probs", "platform", "interpret",
                                             "tile"))
def markov_sampler(base_logits: Array, h: Array, anchor: Array, temperature: Array, seeds: Array, w1: Array,
                   w2: Array, *, head_type: str = "vanilla", gate_w: Array | None = None, gate_b: Array | None = None,
                   conf_w: Array | None = None, conf_b: Array | None = None, conf_with_markov: bool = True,
                   with_probs: bool = True, platform: str = "tpu", interpret: bool = False,
                   tile: int | None = None) -> tuple[Array, Array | None, Array]:
    """Pallas sequential sampler; same contract and outputs as `reference_markov_sampler`
    (probs is None when with_probs=False: greedy verification needs only the tokens)."""
    check_platform(platform)
    if head_type not in HEAD_TYPES:
        raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {head_type!r}")
    b, k, vocab = base_logits.shape
    d = h.shape[-1]
    r = w1.shape[1]
    f32 = jnp.float32
    bb = row_size(min(b, 8), platform)
    bp = round_up(b, bb)
    dp, rp = lane_size(d, platform), lane_size(r, platform)
    tile = tile or (min(2048, round_up(vocab, 128)) if platform == "tpu" else min(256, next_pow2(vocab, 16)))
    vp = round_up(vocab, tile)
    lanes = 128 if platform == "tpu" else 16

    # slot-major layouts [K, Bp, *]: a slot's rows form the (sublane, lane) tile
    u = pad_axis(pad_axis(base_logits.astype(f32), 2, vp), 0, bp).transpose(1, 0, 2)  # [K, Bp, Vp]
    hh = pad_axis(pad_axis(h, 2, dp), 0, bp).transpose(1, 0, 2)  # [K, Bp, dp]
    col = lambda x, dt: pad_axis(x.astype(dt).reshape(-1, 1), 0, bp)
    anchor_c, temp_c = col(anchor, jnp.int32), col(temperature, f32)
    seed_c = col(jax.lax.bitcast_convert_type(seeds.astype(jnp.uint32), jnp.int32), jnp.int32)
    w1p = pad_axis(pad_axis(w1, 1, rp), 0, vp)
    w2p = pad_axis(pad_axis(w2, 0, rp), 1, vp)
    if head_type == "gated":
        gwh = pad_axis(pad_axis(gate_w[:d], 0, dp), 1, rp)
        gwe = pad_axis(pad_axis(gate_w[d:], 0, rp), 1, rp)
        gb = pad_axis(gate_b.reshape(1, r), 1, rp)
    else:
        gwh, gwe, gb = jnp.zeros((8, lanes), f32), jnp.zeros((8, lanes), f32), jnp.zeros((1, lanes), f32)
    if conf_w is not None:
        cwh = pad_axis(conf_w[:d, 0].reshape(1, d), 1, dp)
        cwe = pad_axis(conf_w[d:, 0].reshape(1, -1), 1, rp) if conf_with_markov else jnp.zeros((1, rp), f32)
        cb = conf_b.reshape(1, 1)
    else:
        cwh, cwe, cb = jnp.zeros((1, dp), f32), jnp.zeros((1, rp), f32), jnp.zeros((1, 1), f32)
    weights = (w1p, w2p, gwh, gwe, gb, cwh, cwe, cb)
    kw = dict(vocab=vocab, tile=tile, n_tiles=vp // tile, gated=head_type == "gated", with_probs=with_probs)
    pw = vp if with_probs else lanes  # without probs the output is a dummy
    out_shape = [jax.ShapeDtypeStruct((k, bp, lanes), jnp.int32), jax.ShapeDtypeStruct((k, bp, pw), f32),
                 jax.ShapeDtypeStruct((k, bp, lanes), f32)]

    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        whole = lambda x: pl.BlockSpec(x.shape, lambda i, s: (0,) * x.ndim, pipeline_mode=pl.Buffered(1))
        rows = lambda w: pl.BlockSpec((bb, w), lambda i, s: (i, 0))
        slot = lambda w: pl.BlockSpec((None, bb, w), lambda i, s: (s, i, 0))
        vmem = sum(x.size * x.dtype.itemsize for x in weights) + 6 * bb * vp * 4 + (8 << 20)
        cp = None if interpret else compiler_params(platform, ("parallel", "arbitrary"), vmem_bytes=vmem)
        tok, probs, conf = pl.pallas_call(
            functools.partial(_tpu_kernel, **kw), grid=(bp // bb, k), out_shape=out_shape,
            in_specs=[rows(1), rows(1), rows(1), slot(dp), slot(vp)] + [whole(x) for x in weights],
            out_specs=[slot(lanes), slot(pw), slot(lanes)],
            scratch_shapes=[pltpu.VMEM((bb, 1), jnp.int32)], compiler_params=cp, interpret=interpret,
        )(anchor_c, temp_c, seed_c, hh, u, *weights)
    else:
        whole = lambda x: pl.BlockSpec(x.shape, lambda i: (0,) * x.ndim)
        rows = lambda w: pl.BlockSpec((bb, w), lambda i: (i, 0))
        group = lambda w: pl.BlockSpec((k, bb, w), lambda i: (0, i, 0))
        cp = None if interpret else compiler_params(platform, ("parallel",))
        tok, probs, conf = pl.pallas_call(
            functools.partial(_gpu_kernel, num_slots=k, **kw), grid=(bp // bb,), out_shape=out_shape,
            in_specs=[rows(1), rows(1), rows(1), group(dp), group(vp)] + [whole(x) for x in weights],
            out_specs=[group(lanes), group(pw), group(lanes)], compiler_params=cp, interpret=interpret,
        )(anchor_c, temp_c, seed_c, hh, u, *weights)
    probs = probs[:, :b, :vocab].transpose(1, 0, 2) if with_probs else None
    return tok[:, :b, 0].T, probs, conf[:, :b, 0].T
