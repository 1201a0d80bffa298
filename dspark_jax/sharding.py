"""Device mesh and the one table that maps logical axis names to mesh axes.

Modules annotate every parameter with logical axis names (`("embed", "mlp")`, ...). This file
resolves them against a `Mesh` with axes `data`, `fsdp`, `model`:
  * the target is tensor-parallel over `model` (attention heads, MLP width, vocabulary) and
    optionally fully-sharded over `fsdp` (the embed dimension of weights);
  * batches shard over `data` (and `fsdp`);
  * drafts run replicated (`replicated_shardings`);
  * KV caches carry their own logical axes (`CACHE_BATCH`, `CACHE_SEQUENCE`, `CACHE_HEADS`,
    `CACHE_KV`) and shard by KV head.
Attention heads are sharded only when the head count divides the `model` axis; otherwise they are
replicated (`rules_for_config`), never split across head_dim (that would put all-to-alls and
collective-permutes into every decode step). Activation constraints (`constrain`) apply whenever
a mesh is set (`jax.set_mesh`) and a rules context is active; the target model installs its
config's rules itself (`target_rules_scope`), so inference needs nothing but `jax.set_mesh`.
A dimension whose size is not divisible by its mesh axes falls back to replication on that
dimension, so the same code runs on 1 device, an 8-device CPU simulation, or a TPU pod slice.
"""

from __future__ import annotations

from typing import Any, Sequence

import contextlib

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["LOGICAL_AXIS_RULES", "CACHE_BATCH", "CACHE_SEQUENCE", "CACHE_HEADS", "CACHE_KV", "make_mesh",
           "logical_to_spec", "param_shardings", "replicated_shardings", "batch_sharding", "shard_params",
           "target_param_shardings", "rules_for_config", "constrain", "target_rules_scope", "current_mesh",
           "place_rows"]

# Logical axes of the KV cache [B, S, K, D] (maxtext's CACHE_BATCH / CACHE_SEQUENCE / CACHE_HEADS / CACHE_KV).
CACHE_BATCH, CACHE_SEQUENCE, CACHE_HEADS, CACHE_KV = "cache_batch", "cache_sequence", "cache_heads", "cache_kv"

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). One table for the project.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("q_heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("norm", None),
    ("ctx_embed", None),
    ("markov_rank", None),
    ("act_embed", None),
    ("act_mlp", "model"),
    ("act_heads", "model"),
    ("act_kv_heads", "model"),
    ("act_vocab", "model"),
    (CACHE_BATCH, ("data", "fsdp")),
    (CACHE_SEQUENCE, None),
    (CACHE_HEADS, "model"),
    (CACHE_KV, None),
)

_QUERY_HEAD_AXES = ("q_heads", "act_heads")
_KV_HEAD_AXES = ("kv_heads", "act_kv_heads", CACHE_HEADS)


def make_mesh(*, data: int = 1, fsdp: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, model) mesh with auto (GSPMD-propagated) axes. Sizes must multiply to the device count."""
    devices = list(devices) if devices is not None else jax.devices()
    if data * fsdp * model != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x model={model} = {data * fsdp * model} "
                         f"does not match {len(devices)} devices")
    arr = np.asarray(devices, dtype=object).reshape(data, fsdp, model)
    return Mesh(arr, ("data", "fsdp", "model"),
                axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    names = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[n] for n in names]))


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> P:
    """PartitionSpec for an array with these logical axes; non-divisible dims stay replicated.

    A mesh axis is used at most once per array (first dimension that claims it wins).
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        axes = table.get(name) if name is not None else None
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        names = tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1 and n not in used)
        if names and size % _axis_size(mesh, names) == 0:
            used.update(names)
            spec.append(names if len(names) > 1 else names[0])
        else:
            spec.append(None)
    return P(*spec)


def param_shardings(boxed_params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
    """NamedSharding tree for a (possibly abstract) param tree whose leaves are `nn.Partitioned`.

    Get `boxed_params` from `jax.eval_shape(model.init, ...)["params"]` (no memory is allocated).
    """

    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def replicated_shardings(params: Any, mesh: Mesh) -> Any:
    """Fully replicated shardings (drafts run replicated on every device)."""
    return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), params)


def batch_sharding(mesh: Mesh, ndim: int, batch_size: int) -> NamedSharding:
    """Shard the leading (batch) dim over data x fsdp when divisible, else replicate."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), (batch_size,) + (1,) * (ndim - 1), mesh))


def shard_params(params: Any, shardings: Any) -> Any:
    """Place an unboxed param tree on the mesh."""
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), params, shardings)


def rules_for_config(config, mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> tuple:
    """`rules` with the head axes of `config` replicated where the head count does not divide them.

    Projections store heads fused with head_dim (`[E, H*D]`), so the divisibility fallback of
    `logical_to_spec` alone would shard H*D — splitting head_dim when H < model. Query heads
    (`q_heads`, `act_heads`) and KV heads (`kv_heads`, `act_kv_heads`, `CACHE_HEADS`) are checked
    separately against the mesh axes they map to.
    """
    out = []
    for name, axes in rules:
        heads = (config.num_attention_heads if name in _QUERY_HEAD_AXES
                 else config.num_key_value_heads if name in _KV_HEAD_AXES else None)
        if heads is not None and axes is not None:
            names = axes if isinstance(axes, tuple) else (axes,)
            if heads % _axis_size(mesh, tuple(n for n in names if n in mesh.shape)):
                axes = None
        out.append((name, axes))
    return tuple(out)


def current_mesh():
    """The mesh set by `jax.set_mesh` (abstract inside jit), or None when none / a single device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or int(np.prod(list(mesh.shape.values()))) <= 1:
        return None
    return mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical axis names, under the active rules and mesh (else a no-op).

    Unlike `nn.with_logical_constraint`, a dimension the mesh axes do not divide stays replicated
    (`logical_to_spec`), so the same model code runs at any mesh shape.
    """
    rules = nn.get_logical_axis_rules()
    mesh = current_mesh()
    if not rules or mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh, rules))


def target_rules_scope(config):
    """Context installing `rules_for_config(config, mesh)` when a mesh is set (a no-op otherwise).

    Builds on the rules already active (training installs the table itself) or the default table.
    """
    mesh = current_mesh()
    if mesh is None:
        return contextlib.nullcontext()
    return nn.logical_axis_rules(rules_for_config(config, mesh, nn.get_logical_axis_rules() or LOGICAL_AXIS_RULES))


def place_rows(tree: Any) -> Any:
    """Put per-row arrays (leading dim = the batch) on the mesh set by `jax.set_mesh`: the batch
    over data x fsdp when divisible. Without a mesh the tree is returned unchanged.

    The batch size is the leading dim of the first leaf; leaves with another leading dim (or
    scalars) are replicated.
    """
    if current_mesh() is None:
        return tree
    mesh = jax.sharding.get_mesh()
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if np.ndim(x) >= 1]
    if not leaves:
        return tree
    rows = np.shape(leaves[0])[0]

    def one(x):
        if np.ndim(x) >= 1 and np.shape(x)[0] == rows:
            return jax.device_put(x, batch_sharding(mesh, np.ndim(x), rows))
        return jax.device_put(x, NamedSharding(mesh, P()))

    return jax.tree_util.tree_map(one, tree)


def target_param_shardings(config, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
    """Shardings for a `TargetModel(config)` parameter tree (computed abstractly, no allocation).

    Head axes follow `rules_for_config`: heads that do not divide the model axis are replicated.
    """
    import jax.numpy as jnp

    from dspark_jax.target.model import TargetModel

    model = TargetModel(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens))["params"]
    return param_shardings(boxed, mesh, rules_for_config(config, mesh, rules))
