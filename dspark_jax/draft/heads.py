"""Sequential (Markov) heads and the confidence head of DSpark (spec §2, §3).

Pure functions over parameter sub-trees (jit-friendly: the head type is a static Python string,
shapes are static, no branching on traced values), plus the linen modules that own those
parameters inside `DraftModel`. All math is float32 (`Precision.HIGHEST`), whatever the parameter
dtype.

Parameter sub-trees (Flax orientation, kernels are [in, out]):

    markov_params = params["markov_head"]
        markov_w1:  {embedding: [V, r]}            W1 (an embedding table)
        markov_w2:  {kernel: [r, V]}               W2 (bias-free)
        gate_proj:  {kernel: [d + r, r], bias: [r]}       gated head only; input [h ; e]
        joint_proj: {kernel: [2r + d, 3r], bias: [3r]}    rnn head only; input [s ; e ; h]
    confidence_params = params["confidence_head"]
        proj: {kernel: [d (+ r), 1], bias: [1]}           input [h ; W1[prev]] or h

Bias B_k for slot k (prev = anchor for k = 0, else the token at slot k-1):
    vanilla: W1[prev] @ W2
    gated:   (sigmoid([h_k ; e] @ Wg + bg) * e) @ W2,             e = W1[prev]
    rnn:     [g; c; o] = [s_{k-1} ; e ; h_k] @ Wj + bj;  B_k = tanh(o) @ W2,
             s_k = sigmoid(g) * s_{k-1} + (1 - sigmoid(g)) * tanh(c),  s_{-1} = 0
             (the bias at slot k uses the OLD state s_{k-1}).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dspark_jax.draft.config import HEAD_TYPES
from dspark_jax.layers import dense_init

__all__ = [
    "HEAD_TYPES", "LinearParams", "MarkovHead", "ConfidenceHead", "markov_embedding", "teacher_forced_bias",
    "markov_step", "init_state", "confidence_logits", "bias_from_features",
]

Array = jax.Array
Params = dict[str, Any]
_HI = jax.lax.Precision.HIGHEST
_F32 = jnp.float32


def _mm(x: Array, w: Array) -> Array:
    return jnp.einsum("...i,io->...o", x.astype(_F32), w.astype(_F32), precision=_HI)


def _affine(p: Params, x: Array) -> Array:
    y = _mm(x, p["kernel"])
    if "bias" in p:
        y = y + p["bias"].astype(_F32)
    return y


def _check_type(head_type: str) -> None:
    if head_type not in HEAD_TYPES:
        raise ValueError(f"unknown head type {head_type!r}; supported: {list(HEAD_TYPES)}")


def markov_embedding(markov_params: Params, prev_ids: Array) -> Array:
    """e = W1[prev_ids]: [...] int -> [..., r] float32."""
    return jnp.take(markov_params["markov_w1"]["embedding"], prev_ids, axis=0).astype(_F32)


def bias_from_features(markov_params: Params, feats: Array) -> Array:
    """[..., r] -> [..., V] float32 (the shared W2)."""
    return _mm(feats, markov_params["markov_w2"]["kernel"])


def _gated_features(markov_params: Params, e: Array, h: Array) -> Array:
    g = jax.nn.sigmoid(_affine(markov_params["gate_proj"], jnp.concatenate([h.astype(_F32), e], axis=-1)))
    return g * e


def _rnn_features(markov_params: Params, e: Array, h: Array, state: Array) -> tuple[Array, Array]:
    z = jnp.concatenate([state.astype(_F32), e, h.astype(_F32)], axis=-1)
    g_raw, c_raw, o_raw = jnp.split(_affine(markov_params["joint_proj"], z), 3, axis=-1)
    g = jax.nn.sigmoid(g_raw)
    new_state = g * state.astype(_F32) + (1.0 - g) * jnp.tanh(c_raw)
    return jnp.tanh(o_raw), new_state


def init_state(batch_shape: tuple[int, ...], rank: int) -> Array:
    """Zero RNN state [*batch_shape, r] float32 (also the dummy state of vanilla/gated heads)."""
    return jnp.zeros((*batch_shape, rank), _F32)


def teacher_forced_bias(markov_params: Params, head_type: str, prev_ids: Array, h: Array | None = None) -> Array:
    """Biases for all K slots given the previous-token ids (training; spec §2.4).

    prev_ids: [..., K] int (slot k's previous token); h: [..., K, d] final-normed hidden (needed by
    gated/rnn). Returns [..., K, V] float32. rnn: a `lax.scan` over K from a zero state.
    """
    _check_type(head_type)
    e = markov_embedding(markov_params, prev_ids)  # [..., K, r]
    if head_type == "vanilla":
        feats = e
    elif head_type == "gated":
        feats = _gated_features(markov_params, e, h)
    else:
        def body(state, inp):
            e_k, h_k = inp
            f_k, state = _rnn_features(markov_params, e_k, h_k, state)
            return state, f_k

        state0 = init_state(e.shape[:-2], e.shape[-1])
        _, feats = jax.lax.scan(body, state0, (jnp.moveaxis(e, -2, 0), jnp.moveaxis(h, -2, 0)))
        feats = jnp.moveaxis(feats, 0, -2)
    return bias_from_features(markov_params, feats)


def markov_step(markov_params: Params, head_type: str, prev_ids: Array, h_k: Array,
                state: Array) -> tuple[Array, Array]:
    """One sequential-sampling step (spec §2.5): (bias [..., V] float32, new_state [..., r]).

    prev_ids: [...] int; h_k: [..., d]; state: [..., r] (from `init_state` at slot 0; returned
    unchanged by vanilla/gated heads). Corrected logits: Z_k = U_k + bias.
    """
    _check_type(head_type)
    e = markov_embedding(markov_params, prev_ids)
    if head_type == "vanilla":
        feats, new_state = e, state
    elif head_type == "gated":
        feats, new_state = _gated_features(markov_params, e, h_k), state
    else:
        feats, new_state = _rnn_features(markov_params, e, h_k, state)
    return bias_from_features(markov_params, feats), new_state


def confidence_logits(confidence_params: Params, h: Array, prev_ids: Array | None = None,
                      markov_params: Params | None = None) -> Array:
    """Confidence logits (spec §3): features [h ; W1[prev]] (with prev_ids) or h alone.

    h: [..., d]; prev_ids: [...] int. Returns [...] float32 logits (apply sigmoid for probabilities).
    """
    kernel = confidence_params["proj"]["kernel"]
    feats = h.astype(_F32)
    if prev_ids is not None:
        if markov_params is None:
            raise ValueError("confidence_logits with prev_ids needs markov_params (for W1)")
        feats = jnp.concatenate([feats, markov_embedding(markov_params, prev_ids)], axis=-1)
    if feats.shape[-1] != kernel.shape[0]:
        raise ValueError(f"confidence head expects {kernel.shape[0]} input features, got {feats.shape[-1]} "
                         f"({'with' if prev_ids is not None else 'without'} the Markov embedding)")
    return _affine(confidence_params["proj"], feats)[..., 0]


# ---------------------------------------------------------------------------------------------
# Parameter-owning modules (used inside DraftModel; names mirror the DeepSpec state-dict keys).


class LinearParams(nn.Module):
    """A `Projection`-compatible kernel [in, out] (+ bias [out]) that is only held, not applied."""

    in_features: int
    out_features: int
    axes: tuple[str | None, str | None] = (None, None)
    use_bias: bool = False
    std: float = 0.02
    param_dtype: Any = jnp.float32

    def setup(self):
        self.kernel = self.param("kernel", dense_init(self.std, self.axes),
                                 (self.in_features, self.out_features), self.param_dtype)
        if self.use_bias:
            self.bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                                   (self.out_features,), self.param_dtype)

    def tree(self) -> Params:
        out = {"kernel": self.kernel}
        if self.use_bias:
            out["bias"] = self.bias
        return out


class MarkovHead(nn.Module):
    """Owns W1 (`markov_w1`), W2 (`markov_w2`) and the gated/rnn projection."""

    vocab_size: int
    hidden_size: int
    rank: int
    head_type: str = "vanilla"
    std: float = 0.02
    param_dtype: Any = jnp.float32

    def setup(self):
        _check_type(self.head_type)
        r, d = self.rank, self.hidden_size
        self.markov_w1 = nn.Embed(self.vocab_size, r, param_dtype=self.param_dtype,
                                  embedding_init=nn.with_logical_partitioning(
                                      nn.initializers.normal(self.std), ("vocab", "markov_rank")))
        self.markov_w2 = LinearParams(r, self.vocab_size, ("markov_rank", "vocab"), std=self.std,
                                      param_dtype=self.param_dtype)
        if self.head_type == "gated":
            self.gate_proj = LinearParams(d + r, r, (None, "markov_rank"), True, self.std, self.param_dtype)
        elif self.head_type == "rnn":
            self.joint_proj = LinearParams(2 * r + d, 3 * r, (None, None), True, self.std, self.param_dtype)

    def tree(self) -> Params:
        out: Params = {"markov_w1": {"embedding": self.markov_w1.embedding}, "markov_w2": self.markov_w2.tree()}
        if self.head_type == "gated":
            out["gate_proj"] = self.gate_proj.tree()
        elif self.head_type == "rnn":
            out["joint_proj"] = self.joint_proj.tree()
        return out

    def teacher_forced(self, prev_ids: Array, h: Array | None = None) -> Array:
        return teacher_forced_bias(self.tree(), self.head_type, prev_ids, h)

    def step(self, prev_ids: Array, h_k: Array, state: Array) -> tuple[Array, Array]:
        return markov_step(self.tree(), self.head_type, prev_ids, h_k, state)


class ConfidenceHead(nn.Module):
    """Owns `confidence_head.proj` ([d (+ r)] -> 1 with bias)."""

    in_features: int
    std: float = 0.02
    param_dtype: Any = jnp.float32

    def setup(self):
        self.proj = LinearParams(self.in_features, 1, (None, None), True, self.std, self.param_dtype)

    def tree(self) -> Params:
        return {"proj": self.proj.tree()}
