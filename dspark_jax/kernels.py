"""Backend switch between the Pallas kernels (`pallas_kernels/`) and their XLA (pure-jnp) references.

Model and loop code call the operations here (`attention`, `verify`, `sample_drafts`,
`train_attention`) with ``backend="auto" | "xla" | "pallas"`` and never name a kernel:

* ``"xla"``: the pure-jnp reference (any platform);
* ``"pallas"``: the Pallas kernel for the platform the program is lowered for, chosen with
  `jax.lax.platform_dependent`: Mosaic on TPU, Triton on CUDA/ROCm, and the Pallas interpreter
  (``interpret=True``) anywhere else (CPU) — so a program traced on a CPU host still lowers to
  the real kernels for ``lowering_platforms=("tpu",)`` or ``("cuda",)``;
* ``"auto"``: Pallas when the default JAX backend is a TPU or GPU, XLA on CPU.

`REGISTRY` lists every kernel with its reference and a Qwen3-4B-shaped lowering case;
`kernel_status()` reports which are active (and, on request, whether each lowers for TPU and
CUDA from this host) for ``dspark info``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pallas_kernels import draft_train_attention as _train_attn
from pallas_kernels import fused_verify as _verify
from pallas_kernels import markov_sampler as _sampler
from pallas_kernels import ragged_attention as _attn

__all__ = ["BACKENDS", "KernelSpec", "REGISTRY", "resolve_backend", "dispatch", "attention", "cached_attention", "verify",
           "verify_cuts", "request_seeds", "slot_rows", "verify_packed", "propose_fused", "verify_fused", "sample_drafts", "sampler_supports", "train_attention", "kernel_status",
           "lowers", "KernelBackendError"]

Array = jax.Array
BACKENDS = ("auto", "xla", "pallas")
ACCELERATORS = ("tpu", "gpu")


class KernelBackendError(ValueError):
    """An unknown backend name or kernel name."""


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel: the Pallas entry point (takes platform=/interpret=), its jnp reference, and a
    Qwen3-4B-shaped lowering case ``lower_case() -> (fn(kernel_fn) -> traced fn, args)``."""

    name: str
    kernel: Callable[..., Any]
    reference: Callable[..., Any]
    description: str
    lower_case: Callable[[], tuple[Callable, tuple]]


def resolve_backend(backend: str) -> str:
    """'auto' | 'xla' | 'pallas' -> 'xla' or 'pallas' ('auto' = Pallas on TPU/GPU, XLA on CPU)."""
    if backend not in BACKENDS:
        raise KernelBackendError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "pallas" if jax.default_backend() in ACCELERATORS else "xla"
    return backend


def _pallas(kernel: Callable, args: tuple, kwargs: dict) -> Any:
    """Run `kernel` for whichever platform the enclosing program is lowered for."""
    def branch(platform: str, interpret: bool):
        return lambda *a: kernel(*a, platform=platform, interpret=interpret, **kwargs)

    return jax.lax.platform_dependent(*args, tpu=branch("tpu", False), cuda=branch("gpu", False),
                                      rocm=branch("gpu", False), default=branch("gpu", True))


def dispatch(name: str, *args, backend: str = "auto", **kwargs) -> Any:
    """Call kernel `name` (a `REGISTRY` key) or its reference, per `backend`."""
    if name not in REGISTRY:
        raise KernelBackendError(f"unknown kernel {name!r}; known: {sorted(REGISTRY)}")
    spec = REGISTRY[name]
    if resolve_backend(backend) == "xla":
        return spec.reference(*args, **kwargs)
    return _pallas(spec.kernel, args, kwargs)


# ----------------------------------------------------------------------------- operations


def attention(q: Array, k_cache: Array, v_cache: Array, token_slot: Array, token_pos: Array, kv_len: Array, *,
              max_chunk: int | None = None, scale: float | None = None, backend: str = "auto") -> Array:
    """Packed ragged decode/verify attention (see `pallas_kernels.ragged_attention`). q [T, H, D] -> [T, H, D]."""
    return dispatch("ragged_attention", q, k_cache, v_cache, token_slot, token_pos, kv_len, backend=backend,
                    max_chunk=max_chunk, scale=scale)


def cached_attention(q: Array, k_cache: Array, v_cache: Array, positions: Array, *, scale: float | None = None,
                     backend: str = "auto") -> Array:
    """Fixed-batch decode/verify/prefill attention as the packed layout with equal chunks.

    q [B, T, H, D] at contiguous increasing positions [B, T], already appended to the caches
    [B, S, KVH, D] at index == position; a query sees cache keys at index <= its position (the
    target model's rule), and only the live prefix of each row is read. Returns [B, T, H, D].
    """
    b, t, h, d = q.shape
    slot = jnp.repeat(jnp.arange(b, dtype=jnp.int32), t)
    out = attention(q.reshape(b * t, h, d), k_cache, v_cache, slot, positions.reshape(-1).astype(jnp.int32),
                    positions[:, -1].astype(jnp.int32) + 1, max_chunk=t, scale=scale, backend=backend)
    return out.reshape(b, t, h, d)


def verify_cuts(logits: Array, temperature: Array, top_k: Array, top_p: Array, *, top_k_bound: int = 0,
                use_top_p: bool = False) -> Array:
    """Per-position top-k/top-p cut on logits / T ([..., V] -> [...]) for `verify`."""
    return _verify.warp_cuts(logits, temperature, top_k, top_p, top_k_bound=top_k_bound, use_top_p=use_top_p)


request_seeds = _verify.request_seeds


def verify(target_logits: Array, draft_tokens: Array, draft_probs: Array, num_proposed: Array, temperature: Array,
           cuts: Array, seeds: Array, *, backend: str = "auto") -> tuple[Array, Array]:
    """Fused rejection sampling per request -> (accepted [R], next_token [R]) (see `pallas_kernels.fused_verify`)."""
    return dispatch("fused_verify", target_logits, draft_tokens, draft_probs, num_proposed, temperature, cuts, seeds,
                    backend=backend)


def slot_rows(x: Array, token_slot: Array, num_slots: int, max_chunk: int, fill=0) -> Array:
    """Packed rows x [T, ...] -> per-slot rows [R, max_chunk, ...] (slot r's chunk, in order; `fill` after it)."""
    start, count = _attn.slot_chunks(token_slot, num_slots)
    i = jnp.arange(max_chunk, dtype=jnp.int32)[None, :]
    rows = jnp.minimum(start[:, None] + i, x.shape[0] - 1)
    out = jnp.take(x, rows, axis=0)
    present = (i < count[:, None]).reshape((num_slots, max_chunk) + (1,) * (x.ndim - 1))
    return jnp.where(present, out, fill)


def verify_packed(logits: Array, token_slot: Array, draft_tokens: Array, draft_probs: Array, num_proposed: Array,
                  temperature: Array, cuts: Array, seeds: Array, *, block_size: int,
                  backend: str = "auto") -> tuple[Array, Array]:
    """`verify` over the packed layout: per-token target logits [T, V] (slot r's chunk is its anchor
    and drafts, `token_slot` [T], R = padding) -> (accepted [R], next_token [R]).

    draft_tokens [R, K], draft_probs [R, K, V], num_proposed / temperature / seeds [R] and cuts
    [R, K+1] are per slot (K = block_size); idle slots should have num_proposed 0.
    """
    r = num_proposed.shape[0]
    per_slot = slot_rows(logits, token_slot, r, block_size + 1)  # [R, K+1, V]
    return verify(per_slot, draft_tokens, draft_probs, num_proposed, temperature, cuts, seeds, backend=backend)


def sampler_supports(head_type: str | None, use_top_k: bool, use_top_p: bool) -> bool:
    """Whether the fused sampler covers this head and static sampling mode (temperature-only warping)."""
    return head_type in _sampler.HEAD_TYPES and not use_top_k and not use_top_p


def sample_drafts(base_logits: Array, h: Array, anchor: Array, temperature: Array, seeds: Array, w1: Array,
                  w2: Array, *, backend: str = "auto", with_probs: bool = True, **head) -> tuple[Array, Any, Array]:
    """K sequential Markov draft steps -> (tokens [B, K], probs [B, K, V] or None, confidence logits [B, K]).

    `head`: head_type, gate_w, gate_b, conf_w, conf_b, conf_with_markov (see `pallas_kernels.markov_sampler`).
    """
    if resolve_backend(backend) == "xla":
        tokens, probs, conf = _sampler.reference_markov_sampler(base_logits, h, anchor, temperature, seeds, w1, w2,
                                                                **head)
        return tokens, probs if with_probs else None, conf
    return dispatch("markov_sampler", base_logits, h, anchor, temperature, seeds, w1, w2, backend="pallas",
                    with_probs=with_probs, **head)


def propose_fused(draft_params: dict, head_type: str, conf_with_markov: bool, h: Array, base_logits: Array,
                  anchor: Array, keys: Array, temperature: Array, *, greedy: bool,
                  backend: str = "auto") -> tuple[Array, Array | None, Array]:
    """The speculative loop's sequential head through `sample_drafts`, from a draft parameter tree.

    draft_params: the DeepSpec-layout tree (``markov_head``, optional ``confidence_head``); h [B, K, d];
    base_logits [B, K, V]; anchor [B]; keys [B, 2] per-row PRNG keys; temperature [B] (0 = greedy row);
    greedy: every row is greedy (static: no distributions are written). Check `sampler_supports` first.
    Returns (tokens [B, K], probs [B, K, V] or None, confidence logits [B, K]).
    """
    markov = draft_params["markov_head"]
    head: dict[str, Any] = {"head_type": head_type}
    if head_type == "gated":
        head.update(gate_w=markov["gate_proj"]["kernel"], gate_b=markov["gate_proj"]["bias"])
    conf = draft_params.get("confidence_head")
    if conf is not None:
        head.update(conf_w=conf["proj"]["kernel"], conf_b=conf["proj"]["bias"], conf_with_markov=conf_with_markov)
    b = anchor.shape[0]
    temp = jnp.zeros((b,), jnp.float32) if greedy else jnp.broadcast_to(temperature, (b,)).astype(jnp.float32)
    return sample_drafts(base_logits, h, anchor, temp, request_seeds(keys), markov["markov_w1"]["embedding"],
                         markov["markov_w2"]["kernel"], backend=backend, with_probs=not greedy, **head)


def verify_fused(target_logits: Array, draft_tokens: Array, draft_probs: Array, num_proposed: Array, keys: Array,
                 temperature: Array, top_k: Array, top_p: Array, *, top_k_bound: int, use_top_p: bool,
                 backend: str = "auto") -> tuple[Array, Array]:
    """The speculative loop's rejection sampling through `verify`: per-row sampling values [B]
    (temperature 0 = greedy row), keys [B, 2]; static top-k bound (0 = off) and top-p switch.
    Returns (accepted [B] (before stop-token truncation), next_token [B])."""
    b = num_proposed.shape[0]
    row = lambda x, dt: jnp.broadcast_to(jnp.asarray(x, dt), (b,))
    temp = row(temperature, jnp.float32)
    cuts = verify_cuts(target_logits, temp[:, None], row(top_k, jnp.int32)[:, None], row(top_p, jnp.float32)[:, None],
                       top_k_bound=top_k_bound, use_top_p=use_top_p)
    return verify(target_logits, draft_tokens, draft_probs, num_proposed, temp, cuts, request_seeds(keys),
                  backend=backend)


def train_attention(q: Array, ctx_k: Array, ctx_v: Array, blk_k: Array, blk_v: Array, ctx_positions: Array,
                    anchor_positions: Array, block_keep: Array, scale: float, *, backend: str = "auto") -> Array:
    """Draft training attention of spec §1.6 (see `pallas_kernels.draft_train_attention`), differentiable."""
    return dispatch("draft_train_attention", q, ctx_k, ctx_v, blk_k, blk_v, ctx_positions, anchor_positions,
                    block_keep, scale, backend=backend)


# ----------------------------------------------------------------------------- registry + status

# Qwen3-4B: hidden 2560, 32 query heads : 8 KV heads, head_dim 128, vocab 151,936; K = 7 drafts.
QWEN3_4B = dict(hidden=2560, heads=32, kv_heads=8, head_dim=128, vocab=151936, block=7, rank=64)


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _attention_case():
    c = QWEN3_4B
    r, s, k1 = 8, 4096, c["block"] + 1
    args = (_sds((r * k1, c["heads"], c["head_dim"]), jnp.bfloat16),
            _sds((r, s, c["kv_heads"], c["head_dim"]), jnp.bfloat16),
            _sds((r, s, c["kv_heads"], c["head_dim"]), jnp.bfloat16),
            _sds((r * k1,), jnp.int32), _sds((r * k1,), jnp.int32), _sds((r,), jnp.int32))
    return (lambda f: lambda *a: f(*a, max_chunk=k1)), args


def _verify_case():
    c = QWEN3_4B
    r, k = 8, c["block"]
    args = (_sds((r, k + 1, c["vocab"]), jnp.bfloat16), _sds((r, k), jnp.int32), _sds((r, k, c["vocab"]), jnp.float32),
            _sds((r,), jnp.int32), _sds((r,), jnp.float32), _sds((r, k + 1), jnp.float32), _sds((r,), jnp.uint32))
    return (lambda f: f), args


def _sampler_case():
    c = QWEN3_4B
    b, k, d, rank, v = 8, c["block"], c["hidden"], c["rank"], c["vocab"]
    args = (_sds((b, k, v), jnp.float32), _sds((b, k, d), jnp.bfloat16), _sds((b,), jnp.int32), _sds((b,), jnp.float32),
            _sds((b,), jnp.uint32), _sds((v, rank), jnp.bfloat16), _sds((rank, v), jnp.bfloat16),
            _sds((d + rank, rank), jnp.bfloat16), _sds((rank,), jnp.bfloat16), _sds((d + rank, 1), jnp.bfloat16),
            _sds((1,), jnp.bfloat16))

    def wrap(f):
        return lambda u, h, a, t, s, w1, w2, gw, gb, cw, cb: f(u, h, a, t, s, w1, w2, head_type="gated", gate_w=gw,
                                                                gate_b=gb, conf_w=cw, conf_b=cb)
    return wrap, args


def _train_attention_case():
    c = QWEN3_4B
    b, n, k, s = 1, 16, c["block"], 2048
    h, kvh, d = c["heads"], c["kv_heads"], c["head_dim"]
    args = (_sds((b, n, k, h, d), jnp.bfloat16), _sds((b, s, kvh, d), jnp.bfloat16), _sds((b, s, kvh, d), jnp.bfloat16),
            _sds((b, n, k, kvh, d), jnp.bfloat16), _sds((b, n, k, kvh, d), jnp.bfloat16), _sds((b, s), jnp.int32),
            _sds((b, n), jnp.int32), _sds((b, n), jnp.bool_))

    def wrap(f):  # forward and backward: the gradient of a scalar of the output
        def loss(*a):
            return jnp.sum(f(*a, d ** -0.5).astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    return wrap, args


REGISTRY: dict[str, KernelSpec] = {
    "ragged_attention": KernelSpec("ragged_attention", _attn.ragged_attention, _attn.reference_ragged_attention,
                                   "decode/verify attention over the packed ragged layout (live lengths only)",
                                   _attention_case),
    "fused_verify": KernelSpec("fused_verify", _verify.fused_verify, _verify.reference_fused_verify,
                               "warping + accept/reject + residual/bonus sampling over vocabulary tiles",
                               _verify_case),
    "markov_sampler": KernelSpec("markov_sampler", _sampler.markov_sampler, _sampler.reference_markov_sampler,
                                 "K-step sequential Markov head: bias, warping, sampling, confidence",
                                 _sampler_case),
    "draft_train_attention": KernelSpec("draft_train_attention", _train_attn.draft_train_attention,
                                        _train_attn.reference_draft_train_attention,
                                        "draft training attention (context prefix + in-block), custom VJP",
                                        _train_attention_case),
}


def lowers(name: str, platform: str) -> tuple[bool, str | None]:
    """Lower kernel `name` at its Qwen3-4B-shaped case for 'tpu' or 'cuda' from this host: (ok, error)."""
    spec = REGISTRY[name]
    wrap, args = spec.lower_case()
    kernel_platform = "tpu" if platform == "tpu" else "gpu"
    fn = wrap(lambda *a, **kw: spec.kernel(*a, platform=kernel_platform, **kw))
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
        return True, None
    except Exception as err:  # report, do not crash `dspark info`
        return False, f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"


def kernel_status(check_lowering: bool = False, backend: str = "auto") -> dict[str, dict[str, Any]]:
    """{name: {"active", "backend", "description", "reference"[, "lowers": {"tpu", "cuda"}, "errors"]}}.

    "active": the Pallas kernel is what `backend` selects on this host's default JAX backend.
    """
    active = resolve_backend(backend) == "pallas"
    out: dict[str, dict[str, Any]] = {}
    for name, spec in REGISTRY.items():
        row: dict[str, Any] = {"active": active, "backend": "pallas" if active else "xla",
                               "interpret": active and jax.default_backend() not in ACCELERATORS,
                               "description": spec.description,
                               "reference": f"{spec.reference.__module__}.{spec.reference.__name__}"}
        if check_lowering:
            results = {p: lowers(name, p) for p in ("tpu", "cuda")}
            row["lowers"] = {p: ok for p, (ok, _) in results.items()}
            errors = {p: err for p, (_, err) in results.items() if err}
            if errors:
                row["errors"] = errors
        out[name] = row
    return out
