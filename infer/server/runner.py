"""An asyncio front for the (synchronous, single-threaded) engine: one thread drives `Engine.step()`.

    runner = EngineRunner(engine)            # starts the engine thread
    handle = await runner.submit(Request(prompt="def f(x):", max_new_tokens=32))
    async for out in handle:                 # RequestOutput per engine step with new tokens
        print(out.new_token_ids, out.finished)
    await runner.cancel(handle)              # frees the slot (also done on client disconnect)
    await runner.shutdown(grace_s=10)        # finish in-flight requests, cancel what is left

The engine is not thread-safe, so every call into it happens on the engine thread: `submit` and
`cancel` post commands to it and await the answer (validation errors come back as the engine's
`EngineError`; a full queue as `QueueFull`). After each step the thread hands each request's
output to that request's asyncio queue with `loop.call_soon_threadsafe`. The thread sleeps on a
condition when there is no work, so an idle server costs nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable

from infer.engine import Engine, EngineError, Request, RequestOutput

__all__ = ["EngineRunner", "RequestHandle", "QueueFull", "ShuttingDown"]


class QueueFull(EngineError):
    """The engine's wait queue is full (HTTP 429)."""


class ShuttingDown(EngineError):
    """The runner no longer accepts requests (HTTP 503)."""


@dataclasses.dataclass
class RequestHandle:
    """A submitted request: its id, prompt length, and the queue its outputs arrive on."""

    request_id: str
    prompt_tokens: int
    outputs: asyncio.Queue
    submitted_at: float
    finished: bool = False
    last: RequestOutput | None = None

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            out = await self.outputs.get()
            self.last = out
            self.finished = out.finished
            yield out


class EngineRunner:
    """Drives `engine` on a background thread; see the module docstring.

    On the engine thread, `on_step(engine, outputs, step_s)` runs after every step and
    `on_finish(output)` once per finished request (stop, length, cancelled, error): metrics hooks.
    """

    def __init__(self, engine: Engine, *, on_step: Callable[[Engine, list[RequestOutput], float], None] | None = None,
                 on_finish: Callable[[RequestOutput], None] | None = None):
        self.engine = engine
        self._on_step = on_step
        self._on_finish = on_finish
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Condition()
        self._subscribers: dict[str, tuple[asyncio.AbstractEventLoop, RequestHandle]] = {}
        self._accepting = True
        self._stop = False
        self.error: BaseException | None = None  # set if the engine thread died
        self._thread = threading.Thread(target=self._loop, name="dspark-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ engine thread
    def _post(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._commands.put((fn, fut))
            self._wake.notify()
        return fut

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting caller
                fut.set_exception(e)

    def _cancel(self, request_id: str) -> None:
        if request_id in self._subscribers:
            self.engine.cancel(request_id)
            self._deliver([self.engine.result(request_id)])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            sub = self._subscribers.get(out.request_id)
            if sub is None:
                continue
            loop, handle = sub
            if out.finished:
                self._subscribers.pop(out.request_id, None)
                if self._on_finish is not None:
                    self._on_finish(out)
                # The engine keeps every finished request for `Engine.result`; a long-running server
                # must not, so the record is dropped once handed over (no public API for it yet).
                getattr(self.engine, "_done", {}).pop(out.request_id, None)
            try:
                loop.call_soon_threadsafe(handle.outputs.put_nowait, out)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stop and self._commands.empty() and not self.engine.has_work():
                        self._wake.wait()
                self._run_commands()
                if self._stop:
                    return
                if self.engine.has_work():
                    t0 = time.perf_counter()
                    outputs = self.engine.step()
                    if self._on_step is not None:
                        self._on_step(self.engine, outputs, time.perf_counter() - t0)
                    self._deliver(outputs)
        except BaseException as e:  # noqa: BLE001 - reported by health checks and every waiter
            self.error = e
            for rid, (loop, handle) in list(self._subscribers.items()):
                out = RequestOutput(request_id=rid, token_ids=[], new_token_ids=[], finished=True,
                                    finish_reason="error", error=f"engine failed: {type(e).__name__}: {e}")
                try:
                    loop.call_soon_threadsafe(handle.outputs.put_nowait, out)
                except RuntimeError:
                    pass
            self._subscribers.clear()

    # ------------------------------------------------------------------ asyncio side
    @property
    def alive(self) -> bool:
        """Whether the engine thread is running."""
        return self._thread.is_alive() and self.error is None

    @property
    def accepting(self) -> bool:
        """Whether new requests are admitted (False once shutdown began)."""
        return self._accepting and self.alive

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished."""
        return len(self._subscribers)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the engine thread (between steps) and return its result."""
        if not self.alive:
            raise ShuttingDown("the engine is not running")
        return await asyncio.wrap_future(self._post(fn))

    async def submit(self, request: Request) -> RequestHandle:
        """Queue `request` (prompt as token ids); raises EngineError (invalid), QueueFull, or ShuttingDown."""
        if not self.accepting:
            raise ShuttingDown("the server is shutting down")
        loop = asyncio.get_running_loop()

        def do() -> RequestHandle:
            eng = self.engine
            if eng.queue_length >= eng.max_queue:
                raise QueueFull(f"queue full: {eng.queue_length} requests waiting for {eng.spec.slots} slots "
                                f"(max_queue {eng.max_queue}); retry later")
            rid = eng.submit(request)
            handle = RequestHandle(request_id=rid, prompt_tokens=len(request.prompt), outputs=asyncio.Queue(),
                                   submitted_at=time.perf_counter())
            self._subscribers[rid] = (loop, handle)
            return handle

        return await self.call(do)

    async def cancel(self, handle: RequestHandle) -> None:
        """Cancel a running or queued request (its slot is free for the next step)."""
        if handle.finished or not self.alive:
            return

        await self.call(lambda: self._cancel(handle.request_id))

    def cancel_nowait(self, handle: RequestHandle) -> None:
        """`cancel` without waiting (safe from `finally` blocks of cancelled tasks)."""
        if not handle.finished and self.alive:
            self._post(lambda: self._cancel(handle.request_id))

    async def metrics(self) -> dict[str, Any]:
        """`Engine.metrics()` read on the engine thread."""
        return await self.call(self.engine.metrics)

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop accepting; let in-flight requests finish for up to `grace_s`; cancel the rest; stop."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self.in_flight and self.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.alive:
            await self.call(lambda: [self._cancel(rid) for rid in list(self._subscribers)])
        self.close()

    def close(self) -> None:
        """Stop the engine thread (after the current step)."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=60)
