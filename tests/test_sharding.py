"""Sharding: the rules table, and sharded == 1-device results on 8 simulated CPU devices."""

import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from dspark_jax.config import TargetConfig
from dspark_jax.sharding import logical_to_spec, make_mesh, rules_for_config
from tests.helpers import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeMesh:
    """Just the `.shape` mapping that `logical_to_spec` reads."""

    def __init__(self, **shape):
        self.shape = shape


def test_rules_shard_heads_and_mlp_over_model():
    mesh = FakeMesh(data=2, fsdp=1, model=4)
    assert logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P(None, "model")
    assert logical_to_spec(("vocab", "embed"), (64, 64), mesh) == P("model", None)
    assert logical_to_spec(("batch", None), (8, 3), mesh) == P("data", None)


def test_non_divisible_dims_fall_back_to_replication():
    mesh = FakeMesh(data=2, fsdp=1, model=4)
    assert logical_to_spec(("embed", "kv_heads"), (64, 6), mesh) == P(None, None)
    assert logical_to_spec(("batch",), (3,), mesh) == P(None)


def test_fsdp_axis_and_single_use_per_array():
    mesh = FakeMesh(data=1, fsdp=2, model=2)
    assert logical_to_spec(("embed", "mlp"), (64, 64), mesh) == P("fsdp", "model")
    assert logical_to_spec(("batch", "embed"), (4, 64), mesh) == P("fsdp", None)  # fsdp used once


def test_heads_that_do_not_divide_model_are_replicated_never_split_along_head_dim():
    mesh = FakeMesh(data=2, fsdp=1, model=4)
    small = TargetConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    rules = rules_for_config(small, mesh)
    assert {n: a for n, a in rules if "heads" in n} == {
        "q_heads": None, "kv_heads": None, "act_heads": None, "act_kv_heads": None, "cache_heads": None}
    assert logical_to_spec(("embed", "kv_heads"), (64, 2 * 16), mesh, rules) == P(None, None)  # not P(None, "model")
    assert logical_to_spec(("cache_batch", "cache_sequence", "cache_heads", "cache_kv"), (4, 32, 2, 16), mesh,
                           rules) == P("data", None, None, None)
    big = TargetConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    rules = rules_for_config(big, mesh)
    assert logical_to_spec(("cache_batch", "cache_sequence", "cache_heads", "cache_kv"), (4, 32, 4, 16), mesh,
                           rules) == P("data", None, "model", None)
    assert logical_to_spec(("embed", "q_heads"), (64, 8 * 16), mesh, rules) == P(None, "model")


def test_make_mesh_checks_device_count():
    with pytest.raises(ValueError, match="does not match 1 devices"):
        make_mesh(data=2, model=4, devices=jax.devices()[:1])


def test_vocab_parallel_sampling_on_sharded_logits():
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "sharded_vocab.py")],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("OK")


def test_sharded_speculative_loop_equals_single_device_and_moves_no_vocab():
    """6 query / 2 KV heads on data 2 x model 4, f32 and bf16, greedy and sampled (tests/scripts/sharded_loop.py)."""
    flags = xla_flags("--xla_force_host_platform_device_count=8", "--xla_allow_excess_precision=false")
    env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "sharded_loop.py")],
                          env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("OK")
