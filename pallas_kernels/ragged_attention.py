"""Ragged decode/verify attention over the packed layout (cost follows live lengths).

Queries are T packed tokens of R request slots (``token_slot [T]``, ``token_pos [T]``; padding
tokens carry slot R and are ignored). Slot r's keys/values are its cache rows ``[S, KVH, D]``;
the in-flight tokens are written into the cache at their positions before attention (as the
target model's verify pass does), so key j is visible to token t of slot r iff
``j < kv_len[r]`` and ``j <= token_pos[t]`` (cached prefix for everyone, causal within the
chunk). ``kv_len[r]`` = cached length + in-flight chunk length. Fixed-batch decoding (B rows x
(K+1) tokens) is the special case of equal chunks.

Kernel layout: the wrapper gathers each slot's queries into ``[R, KVH, Qc*G, D]`` (Qc = static
max chunk length, G = H // KVH query heads sharing one KV head; O(T*H*D) work), runs one online
softmax (float32 statistics) per (slot, KV head) over KV blocks, and scatters the result back.
* TPU (Mosaic): grid (R, S/BK) with ``kv_len`` scalar-prefetched; one DMA brings a ``[BK, KVH, D]``
  tile (all KV heads); the K/V index map clamps a dead block to the slot's last live block, so
  dead blocks issue no DMA, and ``pl.when`` skips their compute.
* GPU (Triton): grid (R, KVH); a loop over ceil(kv_len / BK) blocks inside the program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import (NEG_INF, check_platform, compiler_params, lane_size, next_pow2, pad_axis,
                                    row_size, scalar_spec)

__all__ = ["ragged_attention", "reference_ragged_attention", "slot_chunks"]

Array = jax.Array


def slot_chunks(token_slot: Array, num_slots: int) -> tuple[Array, Array]:
    """(chunk_start [R], chunk_len [R]) of each slot's contiguous run in the packed tokens."""
    t = token_slot.shape[0]
    idx = jnp.arange(t, dtype=jnp.int32)
    valid = (token_slot >= 0) & (token_slot < num_slots)
    seg = jnp.where(valid, token_slot, num_slots)
    start = jax.ops.segment_min(jnp.where(valid, idx, t), seg, num_segments=num_slots + 1)[:num_slots]
    count = jax.ops.segment_sum(valid.astype(jnp.int32), seg, num_segments=num_slots + 1)[:num_slots]
    return jnp.minimum(start, t).astype(jnp.int32), count.astype(jnp.int32)


def _gather_slots(token_slot, token_pos, num_slots: int, max_chunk: int):
    """Per-slot query row indices [R, Qc] (T where absent) and their positions [R, Qc] (-1 where absent)."""
    t = token_slot.shape[0]
    start, count = slot_chunks(token_slot, num_slots)
    i = jnp.arange(max_chunk, dtype=jnp.int32)[None, :]
    present = i < count[:, None]
    rows = jnp.where(present, start[:, None] + i, t)  # [R, Qc]
    pos = jnp.where(present, jnp.take(token_pos, jnp.minimum(rows, t - 1)), -1)
    return rows, pos.astype(jnp.int32)


def reference_ragged_attention(q: Array, k_cache: Array, v_cache: Array, token_slot: Array, token_pos: Array,
                               kv_len: Array, *, max_chunk: int | None = None, scale: float | None = None) -> Array:
    """Pure-jnp ragged attention (the XLA path): dense masked attention over each slot's whole cache.

    q [T, H, D]; k_cache, v_cache [R, S, KVH, D]; token_slot, token_pos [T] int32; kv_len [R] int32.
    Returns [T, H, D] in q.dtype (zeros for padding tokens and tokens that see no key).
    """
    t, h, d = q.shape
    r, s, kvh, _ = k_cache.shape
    qc = t if max_chunk is None else max_chunk
    scale = d ** -0.5 if scale is None else scale
    rows, pos = _gather_slots(token_slot, token_pos, r, qc)
    qs = jnp.take(pad_axis(q, 0, t + 1), rows, axis=0).reshape(r, qc, kvh, h // kvh, d)  # [R, Qc, KVH, G, D]
    scores = jnp.einsum("rqkgd,rskd->rkgqs", qs, k_cache, preferred_element_type=jnp.float32) * scale
    j = jnp.arange(s, dtype=jnp.int32)
    mask = (j[None, None, :] < kv_len[:, None, None]) & (j[None, None, :] <= pos[:, :, None])  # [R, Qc, S]
    m = mask[:, None, None]
    scores = jnp.where(m, scores, NEG_INF)
    mx = jnp.max(scores, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    w = jnp.where(m, jnp.exp(scores - mx), 0.0)
    den = jnp.sum(w, axis=-1, keepdims=True)
    w = w / jnp.where(den > 0, den, 1.0)
    out = jnp.einsum("rkgqs,rskd->rqkgd", w.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    out = out.reshape(r * qc, h, d)
    res = jnp.zeros((t + 1, h, d), jnp.float32).at[rows.reshape(-1)].set(out, mode="drop")
    return res[:t].astype(q.dtype)


def _online_block(q, k, v, qpos, kstart, kv_len, scale, m, l, acc):
    """One KV block of online softmax. q [QG, D]; k, v [BK, D]; qpos [QG, 1]; f32 stats m, l [QG, 1]."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    kidx = kstart + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    visible = (kidx < kv_len) & (kidx <= qpos)
    s = jnp.where(visible, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
    p = jnp.where(visible, jnp.exp(s - m_safe), 0.0)
    alpha = jnp.exp(jnp.where(m == NEG_INF, NEG_INF, m - m_safe))
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                            preferred_element_type=jnp.float32)
    return m_new, l, acc


def _finish(l, acc):
    return acc / jnp.where(l > 0, l, 1.0)


def _tpu_kernel(kv_len_ref, q_ref, qpos_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *, block_kv, scale):
    r, j = pl.program_id(0), pl.program_id(1)
    n = kv_len_ref[r]
    kv_heads = q_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j * block_kv < n)
    def _compute():
        qpos = qpos_ref[...]
        for hi in range(kv_heads):  # all KV heads of a block arrive in one DMA ([BK, KVH, D] tile)
            m, l, acc = _online_block(q_ref[hi], k_ref[:, hi, :], v_ref[:, hi, :], qpos, j * block_kv, n, scale,
                                      m_sc[hi], l_sc[hi], acc_sc[hi])
            m_sc[hi], l_sc[hi], acc_sc[hi] = m, l, acc

    @pl.when(j == pl.num_programs(1) - 1)
    def _done():
        for hi in range(kv_heads):
            o_ref[hi] = _finish(l_sc[hi], acc_sc[hi]).astype(o_ref.dtype)


def _gpu_kernel(kv_len_ref, q_ref, qpos_ref, k_ref, v_ref, o_ref, *, block_kv, scale):
    r = pl.program_id(0)
    n = kv_len_ref[r]
    q, qpos = q_ref[...], qpos_ref[...]
    qg, d = q.shape

    def body(j, carry):
        start = pl.multiple_of(j * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        return _online_block(q, k, v, qpos, start, n, scale, *carry)

    init = (jnp.full((qg, 1), NEG_INF, jnp.float32), jnp.zeros((qg, 1), jnp.float32), jnp.zeros((qg, d), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, jax.lax.div(n + block_kv - 1, block_kv), body, init)
    o_ref[...] = _finish(l, acc).astype(o_ref.dtype)


def _kv_block(s: int, platform: str) -> int:
    """KV block length: the largest power of two <= 512 (TPU) / 64 (GPU) that divides S (else padded)."""
    cap = 512 if platform == "tpu" else 64
    lo = 8 if platform == "tpu" else 16
    b = cap
    while b > lo and s % b:
        b //= 2
    return b


@functools.partial(jax.jit, static_argnames=("max_chunk", "scale", "platform", "interpret", "block_kv"))
def ragged_attention(q: Array, k_cache: Array, v_cache: Array, token_slot: Array, token_pos: Array, kv_len: Array,
                     *, max_chunk: int | None = None, scale: float | None = None, platform: str = "tpu",
                     interpret: bool = False, block_kv: int | None = None) -> Array:
    """Pallas ragged attention; same contract as `reference_ragged_attention`.

    max_chunk: static bound on any slot's token count (default T; K+1 for verify buckets).
    Odd shapes are padded internally (head dim, rows, cache length).
    """
    check_platform(platform)
    t, h, d = q.shape
    r, s, kvh, _ = k_cache.shape
    g = h // kvh
    qc = t if max_chunk is None else max_chunk
    scale = d ** -0.5 if scale is None else scale
    rows, pos = _gather_slots(token_slot, token_pos, r, qc)
    qs = jnp.take(pad_axis(q, 0, t + 1), rows, axis=0).reshape(r, qc, kvh, g, d)
    qs = qs.transpose(0, 2, 1, 3, 4).reshape(r, kvh, qc * g, d)  # row = (query i, head g)
    qpos = jnp.repeat(pos, g, axis=1)[..., None]  # [R, Qc*G, 1]

    dp = lane_size(d, platform)
    qg = row_size(qc * g, platform)
    bk = block_kv or _kv_block(s, platform)
    sp = -(-s // bk) * bk
    qs = pad_axis(pad_axis(qs, 3, dp), 2, qg)
    qpos = pad_axis(qpos, 1, qg, -1)
    kc = pad_axis(pad_axis(k_cache, 3, dp), 1, sp)
    vc = pad_axis(pad_axis(v_cache, 3, dp), 1, sp)
    kv_len = jnp.minimum(kv_len.astype(jnp.int32), s)
    out_shape = jax.ShapeDtypeStruct((r, kvh, qg, dp), q.dtype)
    cp = None if interpret else compiler_params(platform, ("parallel", "arbitrary"))

    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        def kv_map(ri, ji, lens):  # dead blocks repeat the last live block: no new DMA
            return ri, jnp.minimum(ji, jax.lax.div(jnp.maximum(lens[ri] - 1, 0), bk)), 0, 0

        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(r, sp // bk),
            in_specs=[pl.BlockSpec((None, kvh, qg, dp), lambda ri, ji, lens: (ri, 0, 0, 0)),
                      pl.BlockSpec((None, qg, 1), lambda ri, ji, lens: (ri, 0, 0)),
                      pl.BlockSpec((None, bk, kvh, dp), kv_map),
                      pl.BlockSpec((None, bk, kvh, dp), kv_map)],
            out_specs=pl.BlockSpec((None, kvh, qg, dp), lambda ri, ji, lens: (ri, 0, 0, 0)),
            scratch_shapes=[pltpu.VMEM((kvh, qg, 1), jnp.float32), pltpu.VMEM((kvh, qg, 1), jnp.float32),
                            pltpu.VMEM((kvh, qg, dp), jnp.float32)])
        out = pl.pallas_call(functools.partial(_tpu_kernel, block_kv=bk, scale=scale), grid_spec=grid_spec,
                             out_shape=out_shape, compiler_params=cp, interpret=interpret)(kv_len, qs, qpos, kc, vc)
    else:
        rp = next_pow2(r)
        out = pl.pallas_call(
            functools.partial(_gpu_kernel, block_kv=bk, scale=scale), grid=(r, kvh), out_shape=out_shape,
            in_specs=[scalar_spec(platform, (rp,)),
                      pl.BlockSpec((None, None, qg, dp), lambda ri, hi: (ri, hi, 0, 0)),
                      pl.BlockSpec((None, qg, 1), lambda ri, hi: (ri, 0, 0)),
                      pl.BlockSpec((None, sp, None, dp), lambda ri, hi: (ri, 0, hi, 0)),
                      pl.BlockSpec((None, sp, None, dp), lambda ri, hi: (ri, 0, hi, 0))],
            out_specs=pl.BlockSpec((None, None, qg, dp), lambda ri, hi: (ri, hi, 0, 0)),
            compiler_params=cp, interpret=interpret)(pad_axis(kv_len, 0, rp), qs, qpos, kc, vc)

    out = out[:, :, :qc * g, :d].reshape(r, kvh, qc, g, d).transpose(0, 2, 1, 3, 4).reshape(r * qc, h, d)
    res = jnp.zeros((t + 1, h, d), q.dtype).at[rows.reshape(-1)].set(out, mode="drop")
    return res[:t]
