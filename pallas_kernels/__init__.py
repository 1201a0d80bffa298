"""Pallas kernels of the speculative loop (imports only jax).

One module per kernel; each exposes the kernel entry point and its pure-jnp ``reference_*``
beside it (the XLA path and the test oracle):

* `ragged_attention`      decode/verify attention over the packed ragged layout (live lengths only)
* `fused_verify`          warping + accept/reject + residual/bonus sampling over vocabulary tiles
* `markov_sampler`        the K-step sequential Markov head (spec §2.5): bias, warping, sampling, confidence
* `draft_train_attention` draft training attention (spec §1.6) with a custom VJP

Every kernel takes ``platform`` ("tpu" = Mosaic, "gpu" = Triton) and ``interpret`` (run the
kernel body with the Pallas interpreter, e.g. on CPU). The library's backend switch
(`dspark_jax.kernels`) picks them per lowering platform.
"""

from pallas_kernels import draft_train_attention, fused_verify, markov_sampler, ragged_attention

__all__ = ["ragged_attention", "fused_verify", "markov_sampler", "draft_train_attention"]
