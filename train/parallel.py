"""Sharded train-step construction shared by the target and draft trainers.

`build_train_program` turns a model-agnostic loss function into jitted `init` / `step` /
`evaluate` functions laid out on a (data, fsdp, model) mesh from `dspark_jax.sharding`:
parameters and the AdamW moments are sharded by the parameters' logical axis names
(`param_shardings`), batches over data x fsdp (`batch_sharding`), and everything else
(step counter, RNG, metrics) is replicated. A 1x1x1 mesh runs the same code on one device.

Loss-function contract (one micro-batch):

    loss_fn(params, batch, rng, frozen) -> (loss_sum, (weight, aux_sums))

`frozen` is a pytree of inputs that take no gradient and are passed to every function of the
program (the draft trainer's target weights, sharded by their own rules; None for the target trainer).

`loss_sum` is the *sum* of per-token losses, `weight` the number of counted tokens, and
`aux_sums` a dict of further weight-summed scalars. With `grad_accum_steps=k` the global batch
is split into k strided micro-batches (rows i, i+k, ...) scanned inside the step; gradients and
sums are accumulated and divided by the total weight once, so the update equals the
single-large-batch token-weighted mean exactly (up to float summation order).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dspark_jax.sharding import LOGICAL_AXIS_RULES, batch_sharding, param_shardings
from train.distributed import local_rows
from train.optim import cast_floating

__all__ = ["TrainState", "TrainProgram", "build_train_program", "put_global_batch", "mesh_context",
           "abstract_with_shardings"]

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array, Any], tuple[jax.Array, tuple[jax.Array, dict]]]


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes: step int32[], float32 master params, optimizer state, rng uint32[2]."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Trace/run under `mesh` with the project's logical-axis rules (activation constraints)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStruct tree carrying `shardings` (the restore target for orbax)."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainProgram:
    """Jitted, mesh-aware training functions (see `build_train_program`).

    init(seed, frozen=None) -> TrainState placed with `state_shardings`.
    step(state, batch, frozen=None) -> (state, metrics); the input state is donated. metrics: loss,
      grad_norm (before clipping), lr (of this step), weight (tokens counted) plus `aux_sums / weight`.
    evaluate(params, batch, frozen=None, rng=PRNGKey(0)) -> (loss_sum, weight, aux_sums), float32
      scalars (no gradient).
    """

    mesh: Mesh
    state_shardings: Any
    abstract_state: Any  # ShapeDtypeStruct tree with shardings
    init: Callable[[int], TrainState]
    step: Callable[[TrainState, Mapping[str, Any]], tuple[TrainState, dict]]
    evaluate: Callable[[Any, Mapping[str, Any]], tuple[jax.Array, jax.Array]]
    rules: tuple = LOGICAL_AXIS_RULES

    def put_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Place a host batch (leading dim = global batch) on the mesh, sharded over data x fsdp.

        With several processes each one passes only the rows its devices hold (`local_rows`):
        any (data, fsdp, model) layout works, also data x fsdp < processes, where processes
        holding replicas of one batch shard feed the same rows.
        """
        return put_global_batch(self.mesh, batch)


def put_global_batch(mesh: Mesh, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """`batch` (host arrays, leading dim = global batch) as global arrays sharded over data x fsdp."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        sharding = batch_sharding(mesh, v.ndim, v.shape[0])
        if jax.process_count() > 1:
            lo, hi = local_rows(sharding, v.shape)
            out[k] = jax.make_array_from_process_local_data(sharding, v[lo:hi], v.shape)
        else:
            out[k] = jax.device_put(v, sharding)
    return out


def _split_micro(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """[B, ...] -> [k, B // k, ...] with micro-batch i = rows i, i + k, ... (keeps B // k data-sharded)."""
    return {name: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1) for name, x in batch.items()}


def build_train_program(
    *,
    mesh: Mesh,
    init_params: Callable[[jax.Array, Any], Any],  # (rng, frozen) -> params (boxed: logical names)
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int = 1,
    compute_dtype: str = "float32",
    rules=LOGICAL_AXIS_RULES,
    frozen_abstract: Any = None,
) -> TrainProgram:
    """Build the jitted init / step / evaluate functions of one training run on `mesh`.

    `init_params(rng, frozen)` must return float32 params, boxed with logical axis names (e.g.
    `model.init(...)["params"]`) where they should be sharded (unboxed leaves are replicated); it
    is only traced. `frozen_abstract` is the shape tree of the `frozen` argument (None: no frozen
    input; the arrays arrive placed by the caller). `loss_fn` receives params cast to `compute_dtype`
    (float32 master weights stay in the state; gradients are float32).
    """
    k = int(grad_accum_steps)
    cdt = jnp.dtype(compute_dtype)

    def init_boxed(seed, frozen) -> TrainState:
        rng = jax.random.PRNGKey(seed)
        init_rng, state_rng = jax.random.split(rng)
        boxed = init_params(init_rng, frozen)
        return TrainState(step=jnp.zeros((), jnp.int32), params=boxed, opt_state=optimizer.init(boxed),
                          rng=state_rng)

    with mesh_context(mesh, rules):
        boxed_abstract = jax.eval_shape(init_boxed, 0, frozen_abstract)
    # Partitioned leaves (params and the params-shaped AdamW moments) follow their logical axes;
    # everything else (counts, rng, step) is replicated.
    state_shardings = param_shardings(boxed_abstract, mesh, rules)
    abstract = abstract_with_shardings(nn.unbox(boxed_abstract), state_shardings)
    replicated = NamedSharding(mesh, P())

    def init_fn(seed, frozen):
        return nn.unbox(init_boxed(seed, frozen))

    def compute_loss(params32, batch, rng, frozen):
        return loss_fn(cast_floating(params32, cdt), batch, rng, frozen)

    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)

    def step_fn(state: TrainState, batch, frozen):
        rng, step_rng = jax.random.split(state.rng)
        if k == 1:
            (loss_sum, (weight, aux)), grads = grad_fn(state.params, batch, step_rng, frozen)
        else:
            micro = _split_micro(batch, k)

            def body(carry, xs):
                g_acc, l_acc, w_acc, a_acc = carry
                i, mb = xs
                (l, (w, a)), g = grad_fn(state.params, mb, jax.random.fold_in(step_rng, i), frozen)
                add = lambda u, v: jax.tree_util.tree_map(jnp.add, u, v)  # noqa: E731
                return (add(g_acc, g), l_acc + l, w_acc + w, add(a_acc, a)), None

            zeros_g = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            first = jax.eval_shape(grad_fn, state.params, jax.tree_util.tree_map(lambda x: x[0], micro), step_rng,
                                   frozen)
            zeros_a = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), first[0][1][1])
            init = (zeros_g, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros_a)
            (grads, loss_sum, weight, aux), _ = jax.lax.scan(body, init, (jnp.arange(k), micro))
        denom = jnp.maximum(weight.astype(jnp.float32), 1.0)
        grads = jax.tree_util.tree_map(lambda g: (g / denom).astype(jnp.float32), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads),
                   "lr": jnp.asarray(schedule(state.step), jnp.float32), "weight": weight.astype(jnp.float32)}
        metrics.update({name: v / denom for name, v in aux.items()})
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    def eval_fn(params, batch, frozen, rng):
        loss_sum, (weight, aux) = compute_loss(params, batch, rng, frozen)
        f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        return f32(loss_sum), f32(weight), {name: f32(v) for name, v in aux.items()}

    jit_init = jax.jit(init_fn, out_shardings=state_shardings)
    jit_step = jax.jit(step_fn, out_shardings=(state_shardings, replicated), donate_argnums=0)
    jit_eval = jax.jit(eval_fn, out_shardings=replicated)

    def init(seed, frozen=None):
        with mesh_context(mesh, rules):
            return jit_init(jnp.asarray(seed, jnp.int32), frozen)

    def step(state, batch, frozen=None):
        with mesh_context(mesh, rules):
            return jit_step(state, batch, frozen)

    def evaluate(params, batch, frozen=None, rng=None):
        with mesh_context(mesh, rules):
            return jit_eval(params, batch, frozen, jax.random.PRNGKey(0) if rng is None else rng)

    return TrainProgram(mesh=mesh, state_shardings=state_shardings, abstract_state=abstract, init=init,
                        step=step, evaluate=evaluate, rules=tuple(rules))
