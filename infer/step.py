"""The loops' steps, jitted for use one step at a time from Python (streaming, engines, benchmarks).

    loop = SpecLoop(...)                                    # static, hashable
    models = spec_models(loop, target_params, draft_params)  # weights + output kernel laid out once
    state = spec_init(loop, models, prompt_tokens, prompt_lengths, row_params)
    while not state.out.done.all():
        state = spec_step(loop, models, state)               # one verify + commit + propose round

`stream_steps(step, state)` wraps that loop as a generator of newly committed tokens per row.
These are the same functions `speculative_generate` / `autoregressive_generate` run inside their
`lax.while_loop`, so a streamed run commits exactly the tokens of the jitted run.
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import numpy as np

from infer.autoregressive import autoregressive_init, autoregressive_step
from infer.speculative import make_models, speculative_init, speculative_step

__all__ = ["spec_models", "spec_init", "spec_step", "ar_init", "ar_step", "stream_steps"]

spec_models = jax.jit(make_models, static_argnums=0)
spec_models.__doc__ = "Jitted `infer.speculative.make_models(loop, target_params, draft_params, sts_temperatures)`."
spec_init = jax.jit(speculative_init, static_argnums=0)
spec_init.__doc__ = "Jitted `infer.speculative.speculative_init(loop, models, prompt_tokens, prompt_lengths, params)`."
spec_step = jax.jit(speculative_step, static_argnums=0, donate_argnums=2)
spec_step.__doc__ = "Jitted `infer.speculative.speculative_step(loop, models, state)`; the state is donated."
ar_init = jax.jit(autoregressive_init, static_argnums=0)
ar_init.__doc__ = ("Jitted `infer.autoregressive.autoregressive_init(loop, params, prompt_tokens, prompt_lengths, "
                   "row_params)`.")
ar_step = jax.jit(autoregressive_step, static_argnums=0, donate_argnums=3)
ar_step.__doc__ = "Jitted `infer.autoregressive.autoregressive_step(loop, params, head, state)`; the state is donated."


def stream_steps(step: Callable, state, max_tokens: int | None = None) -> Iterator[tuple[object, list[list[int]]]]:
    """Run `state = step(state)` until every row is done, yielding (state, new tokens per row).

    The first yield carries the tokens already in `state` (the prefill's first token); each
    later one the tokens committed by one step. `max_tokens` caps what is reported per row.
    """
    seen = np.zeros(state.out.count.shape, np.int64)
    while True:
        count = np.asarray(state.out.count)
        if max_tokens is not None:
            count = np.minimum(count, max_tokens)
        fresh = np.flatnonzero(count > seen)
        tokens = np.asarray(state.out.tokens) if fresh.size else None
        new = [tokens[r, seen[r]:count[r]].tolist() if count[r] > seen[r] else [] for r in range(len(seen))]
        seen = np.maximum(seen, count)
        done = bool(np.all(np.asarray(state.out.done)))
        yield state, new
        if done:
            return
        state = step(state)
