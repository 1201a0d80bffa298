"""Draft training attention (DSpark spec §1.6) as a flash-style Pallas kernel with a custom VJP.

Packed training layout: per batch row, S context rows (keys/values ``ctx_k``, ``ctx_v`` at
``ctx_positions``) and N blocks of K query tokens. Block n sees the context rows with position
< ``anchor_positions[n]`` plus all K keys of its own block (bidirectional); a dummy block
(``block_keep[n]`` False) sees nothing and returns zeros with zero gradients (finite). One softmax
over (visible context ; own block), float32 statistics. The ``[N*K, S + N*K]`` mask is never
built: the kernel derives it from positions tile by tile.

Kernels (all grid axes parallel; loops inside the programs, so one body serves TPU and GPU):
* forward, grid (B, KVH, N): online softmax over context tiles then the own block; writes the
  output and the row log-sum-exp;
* backward dq (+ own-block dk/dv), grid (B, KVH, N): recomputes the probabilities from the lse;
* backward context dk/dv, grid (B, KVH, S tiles): loops over the N blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import NEG_INF, check_platform, compiler_params, lane_size, next_pow2, pad_axis, round_up, row_size

__all__ = ["draft_train_attention", "reference_draft_train_attention"]

Array = jax.Array
_NONE = -(2 ** 31)  # block limit of a dummy block (no position is below it)
_FAR = 2 ** 31 - 1  # position of padded context rows (never visible)


def reference_draft_train_attention(q: Array, ctx_k: Array, ctx_v: Array, blk_k: Array, blk_v: Array,
                                    ctx_positions: Array, anchor_positions: Array, block_keep: Array,
                                    scale: float) -> Array:
    """Pure-jnp draft training attention (= `dspark_jax.draft.model.block_attention` with the §1.6 mask).

    q [B, N, K, H, D]; ctx_k, ctx_v [B, S, KVH, D]; blk_k, blk_v [B, N, K, KVH, D];
    ctx_positions [B, S]; anchor_positions [B, N]; block_keep [B, N] bool. Returns [B, N, K, H, D].
    """
    b, n, k, h, d = q.shape
    kvh = ctx_k.shape[2]
    qg = q.reshape(b, n, k, kvh, h // kvh, d)
    s_ctx = jnp.einsum("bnqhgd,bshd->bnhgqs", qg, ctx_k, preferred_element_type=jnp.float32) * scale
    s_blk = jnp.einsum("bnqhgd,bnphd->bnhgqp", qg, blk_k, preferred_element_type=jnp.float32) * scale
    keep = block_keep.astype(bool)[:, :, None, None, None, None]
    m_ctx = (ctx_positions[:, None, :] < anchor_positions[:, :, None])[:, :, None, None, None, :] & keep
    s_ctx = jnp.where(m_ctx, s_ctx, NEG_INF)
    s_blk = jnp.where(keep, s_blk, NEG_INF)
    mx = jnp.maximum(jnp.max(s_ctx, axis=-1, keepdims=True), jnp.max(s_blk, axis=-1, keepdims=True))
    mx = jax.lax.stop_gradient(jnp.where(jnp.isfinite(mx), mx, 0.0))
    e_ctx = jnp.where(m_ctx, jnp.exp(s_ctx - mx), 0.0)
    e_blk = jnp.where(keep, jnp.exp(s_blk - mx), 0.0)
    den = jnp.sum(e_ctx, axis=-1, keepdims=True) + jnp.sum(e_blk, axis=-1, keepdims=True)
    den = jnp.where(den > 0, den, 1.0)
    out = (jnp.einsum("bnhgqs,bshd->bnqhgd", (e_ctx / den).astype(ctx_v.dtype), ctx_v, preferred_element_type=jnp.float32)
           + jnp.einsum("bnhgqp,bnphd->bnqhgd", (e_blk / den).astype(blk_v.dtype), blk_v,
                        preferred_element_type=jnp.float32))
    return out.reshape(b, n, k, h, d).astype(q.dtype)


def _dot(a, b, contract_a=1, contract_b=0):
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def _scores(q, k, scale):
    return _dot(q, k, 1, 1) * scale  # [rows, keys]


def _ctx_visible(pos_tile, limit):
    return pos_tile < limit  # [1, TS] vs [1, 1]


def _blk_visible(limit, n_rows, kp, k):
    col = jax.lax.broadcasted_iota(jnp.int32, (n_rows, kp), 1)
    return (col < k) & (limit != _NONE)


def _fwd_kernel(q_ref, ck_ref, cv_ref, bk_ref, bv_ref, pos_ref, lim_ref, o_ref, lse_ref, *, scale, ts, n_ts, k):
    q = q_ref[...]
    rows, dp = q.shape
    limit = lim_ref[...]  # [1, 1]

    def update(s, vis, v, carry):
        m, l, acc = carry
        s = jnp.where(vis, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        p = jnp.where(vis, jnp.exp(s - safe), 0.0)
        alpha = jnp.exp(jnp.where(m == NEG_INF, NEG_INF, m - safe))
        return m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True), alpha * acc + _dot(p.astype(v.dtype), v)

    def ctx_tile(j, carry):
        start = pl.multiple_of(j * ts, ts)
        vis = _ctx_visible(pos_ref[:, pl.ds(start, ts)], limit)
        return update(_scores(q, ck_ref[pl.ds(start, ts), :], scale), vis, cv_ref[pl.ds(start, ts), :], carry)

    init = (jnp.full((rows, 1), NEG_INF, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, dp), jnp.float32))
    carry = jax.lax.fori_loop(0, n_ts, ctx_tile, init)
    bk, bv = bk_ref[...], bv_ref[...]
    m, l, acc = update(_scores(q, bk, scale), _blk_visible(limit, rows, bk.shape[0], k), bv, carry)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), NEG_INF)


def _probs(s, vis, lse):
    return jnp.where(vis & (lse != NEG_INF), jnp.exp(s - jnp.where(lse == NEG_INF, 0.0, lse)), 0.0)


def _bwd_q_kernel(q_ref, ck_ref, cv_ref, bk_ref, bv_ref, pos_ref, lim_ref, do_ref, lse_ref, delta_ref,
                  dq_ref, dbk_ref, dbv_ref, *, scale, ts, n_ts, k):
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    limit = lim_ref[...]

    def grads(kk, vv, vis):
        p = _probs(_scores(q, kk, scale), vis, lse)  # [rows, keys]
        ds = p * (_dot(do, vv, 1, 1) - delta)
        return p, ds

    def ctx_tile(j, dq):
        start = pl.multiple_of(j * ts, ts)
        kk = ck_ref[pl.ds(start, ts), :]
        _, ds = grads(kk, cv_ref[pl.ds(start, ts), :], _ctx_visible(pos_ref[:, pl.ds(start, ts)], limit))
        return dq + _dot(ds.astype(kk.dtype), kk) * scale

    dq = jax.lax.fori_loop(0, n_ts, ctx_tile, jnp.zeros(q.shape, jnp.float32))
    bk, bv = bk_ref[...], bv_ref[...]
    p, ds = grads(bk, bv, _blk_visible(limit, q.shape[0], bk.shape[0], k))
    dq_ref[...] = (dq + _dot(ds.astype(bk.dtype), bk) * scale).astype(dq_ref.dtype)
    dbk_ref[...] = (_dot(ds.astype(q.dtype), q, 0, 0) * scale).astype(dbk_ref.dtype)
    dbv_ref[...] = _dot(p.astype(do.dtype), do, 0, 0).astype(dbv_ref.dtype)


def _bwd_kv_kernel(q_ref, ck_ref, cv_ref, pos_ref, lim_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                   scale, n_blocks):
    kk, vv, pos = ck_ref[...], cv_ref[...], pos_ref[...]

    def block(i, carry):
        dk, dv = carry
        q, do = q_ref[i], do_ref[i]
        p = _probs(_scores(q, kk, scale), _ctx_visible(pos, lim_ref[i]), lse_ref[i])
        ds = p * (_dot(do, vv, 1, 1) - delta_ref[i])
        return dk + _dot(ds.astype(q.dtype), q, 0, 0) * scale, dv + _dot(p.astype(do.dtype), do, 0, 0)

    zeros = jnp.zeros(kk.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, n_blocks, block, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _layout(q, ctx_k, ctx_v, blk_k, blk_v, ctx_positions, anchor_positions, block_keep, platform):
    """Head-major padded kernel layouts (see `_unlayout_*` for the inverse)."""
    b, n, k, h, d = q.shape
    s, kvh = ctx_k.shape[1], ctx_k.shape[2]
    g = h // kvh
    dp, rows, kp = lane_size(d, platform), row_size(k * g, platform), row_size(k, platform)
    ts = min(512 if platform == "tpu" else 64, round_up(s, 8) if platform == "tpu" else next_pow2(s, 16))
    sp = round_up(s, ts)
    qh = q.reshape(b, n, k, kvh, g, d).transpose(0, 3, 1, 2, 4, 5).reshape(b, kvh, n, k * g, d)
    qh = pad_axis(pad_axis(qh, 4, dp), 3, rows)  # [B, KVH, N, rows, Dp]
    ck = pad_axis(pad_axis(ctx_k.transpose(0, 2, 1, 3), 3, dp), 2, sp)  # [B, KVH, Sp, Dp]
    cv = pad_axis(pad_axis(ctx_v.transpose(0, 2, 1, 3), 3, dp), 2, sp)
    bk = pad_axis(pad_axis(blk_k.transpose(0, 3, 1, 2, 4), 4, dp), 3, kp)  # [B, KVH, N, Kp, Dp]
    bv = pad_axis(pad_axis(blk_v.transpose(0, 3, 1, 2, 4), 4, dp), 3, kp)
    pos = pad_axis(ctx_positions.astype(jnp.int32), 1, sp, _FAR)[:, None, :]  # [B, 1, Sp]
    lim = jnp.where(block_keep.astype(bool), anchor_positions.astype(jnp.int32), _NONE)[:, :, None, None]
    dims = dict(b=b, n=n, k=k, h=h, d=d, s=s, kvh=kvh, g=g, dp=dp, rows=rows, kp=kp, ts=ts, sp=sp)
    return (qh, ck, cv, bk, bv, pos, lim), dims


def _specs(dm):
    """BlockSpecs of the (B, KVH, N)-gridded kernels."""
    per_block = lambda r, c: pl.BlockSpec((None, None, None, r, c), lambda bi, hi, ni: (bi, hi, ni, 0, 0))
    ctx = pl.BlockSpec((None, None, dm["sp"], dm["dp"]), lambda bi, hi, ni: (bi, hi, 0, 0))
    pos = pl.BlockSpec((None, 1, dm["sp"]), lambda bi, hi, ni: (bi, 0, 0))
    lim = pl.BlockSpec((None, None, 1, 1), lambda bi, hi, ni: (bi, ni, 0, 0))
    return per_block, ctx, pos, lim


def _forward(args, dm, scale, platform, interpret):
    qh, ck, cv, bk, bv, pos, lim = args
    per_block, ctx, pos_s, lim_s = _specs(dm)
    b, kvh, n, rows, dp = qh.shape
    cp = None if interpret else compiler_params(platform, ("parallel",) * 3)
    kern = functools.partial(_fwd_kernel, scale=scale, ts=dm["ts"], n_ts=dm["sp"] // dm["ts"], k=dm["k"])
    return pl.pallas_call(
        kern, grid=(b, kvh, n),
        in_specs=[per_block(rows, dp), ctx, ctx, per_block(dm["kp"], dp), per_block(dm["kp"], dp), pos_s, lim_s],
        out_specs=[per_block(rows, dp), per_block(rows, 1)],
        out_shape=[jax.ShapeDtypeStruct(qh.shape, qh.dtype), jax.ShapeDtypeStruct((b, kvh, n, rows, 1), jnp.float32)],
        compiler_params=cp, interpret=interpret)(qh, ck, cv, bk, bv, pos, lim)


def _backward(args, dm, scale, platform, interpret, o, lse, do):
    qh, ck, cv, bk, bv, pos, lim = args
    per_block, ctx, pos_s, lim_s = _specs(dm)
    b, kvh, n, rows, dp = qh.shape
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)  # [B, KVH, N, rows, 1]
    cp = None if interpret else compiler_params(platform, ("parallel",) * 3)
    kern = functools.partial(_bwd_q_kernel, scale=scale, ts=dm["ts"], n_ts=dm["sp"] // dm["ts"], k=dm["k"])
    dq, dbk, dbv = pl.pallas_call(
        kern, grid=(b, kvh, n),
        in_specs=[per_block(rows, dp), ctx, ctx, per_block(dm["kp"], dp), per_block(dm["kp"], dp), pos_s, lim_s,
                  per_block(rows, dp), per_block(rows, 1), per_block(rows, 1)],
        out_specs=[per_block(rows, dp), per_block(dm["kp"], dp), per_block(dm["kp"], dp)],
        out_shape=[jax.ShapeDtypeStruct(qh.shape, qh.dtype), jax.ShapeDtypeStruct(bk.shape, bk.dtype),
                   jax.ShapeDtypeStruct(bv.shape, bv.dtype)],
        compiler_params=cp, interpret=interpret)(qh, ck, cv, bk, bv, pos, lim, do, lse, delta)
    ts = dm["ts"]
    all_blocks = lambda r, c: pl.BlockSpec((None, None, n, r, c), lambda bi, hi, si: (bi, hi, 0, 0, 0))
    tile = pl.BlockSpec((None, None, ts, dp), lambda bi, hi, si: (bi, hi, si, 0))
    lim_all = pl.BlockSpec((None, n, 1, 1), lambda bi, hi, si: (bi, 0, 0, 0))
    pos_t = pl.BlockSpec((None, 1, ts), lambda bi, hi, si: (bi, 0, si))
    dck, dcv = pl.pallas_call(
        functools.partial(_bwd_kv_kernel, scale=scale, n_blocks=n), grid=(b, kvh, dm["sp"] // ts),
        in_specs=[all_blocks(rows, dp), tile, tile, pos_t, lim_all, all_blocks(rows, dp), all_blocks(rows, 1),
                  all_blocks(rows, 1)],
        out_specs=[tile, tile],
        out_shape=[jax.ShapeDtypeStruct(ck.shape, ck.dtype), jax.ShapeDtypeStruct(cv.shape, cv.dtype)],
        compiler_params=cp, interpret=interpret)(qh, ck, cv, pos, lim, do, lse, delta)
    return dq, dck, dcv, dbk, dbv


def _unlayout_q(x, dm):
    b, n, k, kvh, g, d = dm["b"], dm["n"], dm["k"], dm["kvh"], dm["g"], dm["d"]
    x = x[..., :k * g, :d].reshape(b, kvh, n, k, g, d)
    return x.transpose(0, 2, 3, 1, 4, 5).reshape(b, n, k, kvh * g, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _attention(q, ctx_k, ctx_v, blk_k, blk_v, ctx_positions, anchor_positions, block_keep, scale, platform, interpret):
    out, _ = _attention_fwd(q, ctx_k, ctx_v, blk_k, blk_v, ctx_positions, anchor_positions, block_keep, scale,
                            platform, interpret)
    return out


def _attention_fwd(q, ctx_k, ctx_v, blk_k, blk_v, ctx_positions, anchor_positions, block_keep, scale, platform,
                   interpret):
    args, dm = _layout(q, ctx_k, ctx_v, blk_k, blk_v, ctx_positions, anchor_positions, block_keep, platform)
    o, lse = _forward(args, dm, scale, platform, interpret)
    res = (q, ctx_k, ctx_v, blk_k, blk_v, ctx_positions, anchor_positions, block_keep, o, lse)
    return _unlayout_q(o, dm), res


def _attention_bwd(scale, platform, interpret, res, g):
    q, ctx_k, ctx_v, blk_k, blk_v, ctx_positions, anchor_positions, block_keep, o, lse = res
    args, dm = _layout(q, ctx_k, ctx_v, blk_k, blk_v, ctx_positions, anchor_positions, block_keep, platform)
    b, n, k, kvh, g_, d = dm["b"], dm["n"], dm["k"], dm["kvh"], dm["g"], dm["d"]
    do = g.reshape(b, n, k, kvh, g_, d).transpose(0, 3, 1, 2, 4, 5).reshape(b, kvh, n, k * g_, d)
    do = pad_axis(pad_axis(do.astype(q.dtype), 4, dm["dp"]), 3, dm["rows"])
    dq, dck, dcv, dbk, dbv = _backward(args, dm, scale, platform, interpret, o, lse, do)
    s = dm["s"]
    unctx = lambda x: x[:, :, :s, :d].transpose(0, 2, 1, 3)
    unblk = lambda x: x[:, :, :, :k, :d].transpose(0, 2, 3, 1, 4)
    zero_int = lambda x: None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)
    return (_unlayout_q(dq, dm), unctx(dck).astype(ctx_k.dtype), unctx(dcv).astype(ctx_v.dtype),
            unblk(dbk).astype(blk_k.dtype), unblk(dbv).astype(blk_v.dtype), zero_int(ctx_positions),
            zero_int(anchor_positions), zero_int(block_keep))


_attention.defvjp(_attention_fwd, _attention_bwd)


def draft_train_attention(q: Array, ctx_k: Array, ctx_v: Array, blk_k: Array, blk_v: Array, ctx_positions: Array,
                          anchor_positions: Array, block_keep: Array, scale: float, *, platform: str = "tpu",
                          interpret: bool = False) -> Array:
    """Pallas draft training attention with a custom VJP; contract of `reference_draft_train_attention`.

    Differentiable in q, ctx_k, ctx_v, blk_k, blk_v (positions and block_keep are integer/bool).
    """
    check_platform(platform)
    return _attention(q, ctx_k, ctx_v, blk_k, blk_v, ctx_positions, anchor_positions, block_keep, float(scale),
                      platform, bool(interpret))
