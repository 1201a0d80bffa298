"""The speculative loop with backend="pallas" (the fused Markov sampler and verification kernels,
interpreted on CPU) against the XLA path, and its lowering for TPU and CUDA at a Qwen3-4B-shaped config."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from dspark_jax.config import TargetConfig
from dspark_jax.draft.config import DraftConfig
from dspark_jax.draft.model import init_draft_params
from dspark_jax.sampling import SamplingConfig, SamplingMode
from dspark_jax.target.model import TargetModel
from infer.api import Target, generate
from infer.speculative import speculative_generate
from infer.speculative_api import Draft
from infer.state import RowParams, SpecLoop, row_keys_from_seeds
from tests.spec_helpers import oracle_draft, random_target

PROMPTS = [[3, 7, 1, 9], [5, 2]]


@pytest.fixture(scope="module")
def tiny_pair():
    """A near-bigram target and a gated-head oracle drafter whose drafts are mostly accepted."""
    cfg, params = random_target(context_scale=0.03)
    dcfg, dp = oracle_draft(cfg, params, block_size=4, head="gated")
    return Target(config=cfg, params=params), Draft(config=dcfg, params=dp)


def test_pallas_backend_gives_the_greedy_tokens_of_the_xla_path(tiny_pair):
    """Greedy speculative output with the kernels == the target's greedy output token for token (which
    the XLA path equals too: tests/test_speculative.py); one loop compile instead of two."""
    target, draft = tiny_pair
    reference = generate(target, PROMPTS, max_new_tokens=12).token_ids  # autoregressive greedy
    pallas = generate(target, PROMPTS, draft=draft, max_new_tokens=12, backend="pallas")
    assert pallas.token_ids == reference
    assert pallas.metrics["acceptance_length"] > 1.5  # the oracle drafts are accepted: the fused head matters


def test_bad_backend_is_a_one_line_error(tiny_pair):
    target, draft = tiny_pair
    with pytest.raises(ValueError, match="backend must be .xla., .pallas. or .auto."):
        generate(target, PROMPTS, draft=draft, max_new_tokens=4, backend="cuda")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_speculative_generate_with_pallas_lowers(platform):
    """The whole jitted loop (sampled mode: both fused kernels inside) lowers at Qwen3-4B widths (2 layers)."""
    cfg = TargetConfig(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=2,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                       dtype="bfloat16")
    tok = jnp.zeros((1, 1), jnp.int32)
    tparams = jax.eval_shape(lambda: nn.meta.unbox(TargetModel(cfg).init(jax.random.PRNGKey(0), tok, tok)["params"]))
    dcfg = DraftConfig.from_target(cfg, num_hidden_layers=1, block_size=7, mask_token_id=151935, markov_rank=64,
                                   markov_head_type="gated", target_layer_ids=(0,))
    dparams = jax.eval_shape(lambda: init_draft_params(dcfg, jax.random.PRNGKey(1)))
    b, p = 2, 16
    sampling = [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.0)]
    loop = SpecLoop(target=cfg, draft=dcfg, block_size=7, mode=SamplingMode.covering(sampling), max_new_tokens=8,
                    cache_len=64, backend="pallas")
    params = RowParams.build(sampling, row_keys_from_seeds(0, b), [[-1]], 8)
    lowered = speculative_generate.trace(tparams, dparams, None, jax.ShapeDtypeStruct((b, p), jnp.int32),
                                         jax.ShapeDtypeStruct((b,), jnp.int32), params, loop=loop).lower(
        lowering_platforms=(platform,))
    text = lowered.as_text()
    assert ("tpu_custom_call" in text) if platform == "tpu" else ("triton" in text.lower())
