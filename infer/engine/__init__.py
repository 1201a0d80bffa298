"""Continuous-batching speculative engine with ragged verification and confidence scheduling (issue 11).

`Engine` (host: requests, queue, slots, streaming, metrics) over `infer.engine.core` (device:
per-slot state, insert, policy plan, packed verify round). See docs/engine.md.
"""

from infer.engine.engine import Engine, EngineError, Request, RequestOutput, default_token_buckets

__all__ = ["Engine", "EngineError", "Request", "RequestOutput", "default_token_buckets"]
