"""OpenAI-compatible HTTP API over the engine (`dspark serve`): FastAPI app factory.

Endpoints: POST /v1/completions, POST /v1/chat/completions (only when the target's tokenizer
carries a chat template), GET /v1/models, GET /health, GET /metrics (Prometheus). Streaming uses
server-sent events (`data: {chunk}` ... `data: [DONE]`) like OpenAI. Errors are OpenAI-shaped:
`{"error": {"message", "type", "param", "code"}}` with 400 (invalid request), 404 (unknown model),
429 (queue full), 503 (shutting down / engine down).

Speculative decoding is invisible except in `usage.speculative` (rounds, drafts verified,
accepted, acceptance length τ, mean verify budget) and in /metrics. Extensions to the OpenAI
request: `top_k` (int), `ignore_eos` (bool: generate exactly max_tokens). A client that
disconnects cancels its request; its slot is free at the next engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from dspark_jax.sampling import SamplingConfig, SamplingError
from infer.engine import EngineError, Request
from infer.server.chat import ChatTemplate, ChatTemplateError
from infer.server.metrics import CONTENT_TYPE, ServerMetrics
from infer.server.runner import EngineRunner, QueueFull, RequestHandle, ShuttingDown

__all__ = ["create_app", "CompletionRequest", "ChatCompletionRequest", "error_body"]


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0, lt=2 ** 32)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None
    ignore_eos: bool = False
    user: str | None = None


class CompletionRequest(_Common):
    """Body of POST /v1/completions (prompt: text, token ids, or a one-element list of either)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = None


class _ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = ""


class ChatCompletionRequest(_Common):
    """Body of POST /v1/chat/completions."""

    messages: list[_ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class APIError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """`{"error": {...}}` as OpenAI sends it."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _TextStream:
    """Incremental detokenisation with stop strings: `add(ids)` -> (new text, stopped)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.holdback = max((len(s) for s in self.stops), default=1) - 1

    def add(self, ids: list[int], final: bool = False) -> tuple[str, bool]:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        for stop in self.stops:
            at = text.find(stop, max(self.sent - len(stop), 0))
            if at >= 0:
                text = text[:at]
                self.text = text
                delta, self.sent = text[self.sent:], len(text)
                return delta, True
        self.text = text
        safe = len(text) if final else len(text) - self.holdback
        if not final and text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            safe = min(safe, len(text) - 1)
        if safe <= self.sent:
            return "", False
        delta, self.sent = text[self.sent:safe], safe
        return delta, False


def _usage(handle: RequestHandle, completion_tokens: int) -> dict[str, Any]:
    m = handle.last.metrics if handle.last is not None else {}
    return {"prompt_tokens": handle.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": handle.prompt_tokens + completion_tokens,
            "speculative": {"rounds": m.get("rounds"), "drafts_verified": m.get("drafts_verified"),
                            "accepted": m.get("accepted"), "acceptance_length": m.get("tau"),
                            "mean_verify_budget": m.get("mean_verify_budget"),
                            "time_to_first_token_s": m.get("ttft_s"), "time_per_output_token_s": m.get("tpot_s")}}


def _finish_reason(engine_reason: str | None, stopped_by_string: bool) -> str:
    if stopped_by_string or engine_reason == "stop":
        return "stop"
    return "length" if engine_reason == "length" else (engine_reason or "stop")


def create_app(runner: EngineRunner, *, target, model_name: str, chat_template: ChatTemplate | None,
               metrics: ServerMetrics, default_max_tokens: int = 16, shutdown_grace_s: float = 10.0,
               info: dict[str, Any] | None = None) -> FastAPI:
    """The FastAPI app serving `runner`'s engine as `model_name` (see the module docstring).

    `info` (policy, slots, ...) is reported by /health.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await runner.shutdown(grace_s=shutdown_grace_s)

    app = FastAPI(title="dspark-jax", lifespan=lifespan)
    tokenizer = target.tokenizer
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_req, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return JSONResponse(error_body(f"{param + ': ' if param else ''}{err.get('msg', 'invalid value')}",
                                       param=param, code="invalid_value"), status_code=400)

    @app.get("/health")
    async def health():
        if not runner.alive:
            return JSONResponse({"status": "error", "error": repr(runner.error)}, status_code=503)
        if not runner.accepting:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return {"status": "ok", "model": model_name, "in_flight": runner.in_flight, **(info or {})}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dspark-jax"}]}

    def check_common(body: _Common) -> None:
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"model {body.model!r} is not served here (this server serves {model_name!r})",
                           "invalid_request_error", "model", "model_not_found")
        if body.n != 1:
            raise APIError(400, "n > 1 is not supported; send one request per completion", param="n")
        if body.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if body.presence_penalty or body.frequency_penalty:
            raise APIError(400, "presence/frequency penalties are not supported (they would change the target's "
                                "distribution)", param="presence_penalty" if body.presence_penalty else "frequency_penalty")

    def engine_request(body: _Common, ids: list[int], max_tokens: int | None) -> Request:
        try:
            sampling = SamplingConfig(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p)
        except (SamplingError, ValueError) as e:
            raise APIError(400, str(e), param="temperature") from e
        seed = body.seed if body.seed is not None else secrets.randbelow(2 ** 31)
        return Request(prompt=ids, max_new_tokens=int(max_tokens or default_max_tokens), sampling=sampling, seed=seed,
                       stop_token_ids=[] if body.ignore_eos else None)

    async def submit(req: Request) -> RequestHandle:
        try:
            handle = await runner.submit(req)
        except QueueFull as e:
            metrics.rejected.labels("queue_full").inc()
            raise APIError(429, str(e), "rate_limit_error", None, "queue_full") from e
        except ShuttingDown as e:
            metrics.rejected.labels("unavailable").inc()
            raise APIError(503, str(e), "server_error", None, "unavailable") from e
        except EngineError as e:
            metrics.rejected.labels("invalid").inc()
            msg = str(e)
            param = "max_tokens" if "too long" in msg or "max_new_tokens" in msg else "prompt"
            raise APIError(400, msg, param=param, code="invalid_value") from e
        metrics.prompt.inc(handle.prompt_tokens)
        return handle

    def tokenize(text: str) -> list[int]:
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer.json: send the prompt as token ids", param="prompt")
        return list(tokenizer.encode(text))

    def stops_of(body: _Common) -> list[str]:
        return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])

    async def run(http: HTTPRequest, handle: RequestHandle, body: _Common, kind: str):
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        stream = _TextStream(tokenizer, stops_of(body)) if tokenizer is not None else None
        obj = "chat.completion" if kind == "chat" else "text_completion"
        now = int(time.time())

        def chunk(text: str, finish: str | None, usage: dict | None = None, first: bool = False) -> dict:
            if kind == "chat":
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text or not first else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            out = {"id": rid, "object": obj + (".chunk" if kind == "chat" else ""), "created": now, "model": model_name,
                   "choices": [choice]}
            if usage is not None:
                out["usage"] = usage
            return out

        async def pieces() -> AsyncIterator[tuple[str, str | None, int]]:
            """(new text, finish reason or None, completion tokens so far)."""
            n = 0
            async for out in handle:
                n = len(out.token_ids)
                if out.finish_reason == "error":
                    raise APIError(500, f"generation failed: {out.error}", "server_error")
                if stream is None:
                    text, stopped = " ".join(map(str, out.new_token_ids)), False
                else:
                    text, stopped = stream.add(out.new_token_ids, final=out.finished)
                if stopped:
                    runner.cancel_nowait(handle)
                    yield text, "stop", n
                    return
                yield text, (_finish_reason(out.finish_reason, False) if out.finished else None), n

        if body.stream:
            async def sse():
                try:
                    # Something now, so the status line and headers go out while the request waits for a
                    # slot (servers flush headers with the first body bytes); SSE clients skip comments.
                    if kind == "chat":
                        yield f"data: {json.dumps(chunk('', None, first=True))}\n\n"
                    else:
                        yield ": accepted\n\n"
                    async for text, finish, n in pieces():
                        if text or finish:
                            usage = _usage(handle, n) if finish else None
                            yield f"data: {json.dumps(chunk(text, finish, usage))}\n\n"
                        if finish:
                            break
                    yield "data: [DONE]\n\n"
                except APIError as e:
                    yield f"data: {json.dumps(error_body(e.message, e.type))}\n\n"
                finally:
                    if not handle.finished:  # client went away (or the server is stopping): free the slot
                        runner.cancel_nowait(handle)

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def collect():
            parts, finish, n = [], None, 0
            async for text, finish, n in pieces():
                parts.append(text)
                if finish:
                    break
            return "".join(parts), finish, n

        task = asyncio.ensure_future(collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    break
                if await http.is_disconnected():
                    task.cancel()
                    runner.cancel_nowait(handle)
                    return Response(status_code=499)
        finally:
            if not handle.finished:
                runner.cancel_nowait(handle)
        text, finish, n = task.result()
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": obj, "created": now, "model": model_name, "choices": [choice],
                "usage": _usage(handle, n)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        check_common(body)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported", param="best_of")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"batched prompts are not supported: got {len(prompt)} prompts, send one per "
                                    f"request", param="prompt")
            prompt = prompt[0]
        ids = tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        handle = await submit(engine_request(body, ids, body.max_tokens))
        return await run(http, handle, body, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        check_common(body)
        if chat_template is None:
            raise APIError(400, f"model {model_name!r} has no chat template (its tokenizer_config.json carries no "
                                f"'chat_template'): use /v1/completions", param="messages", code="no_chat_template")
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if any(p.get("type") != "text" for p in content):
                    raise APIError(400, "only text content parts are supported", param="messages")
                content = "".join(str(p.get("text", "")) for p in content)
            messages.append({"role": m.role, "content": content or ""})
        try:
            text = chat_template.render(messages)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from e
        ids = tokenize(text)
        handle = await submit(engine_request(body, ids, body.max_completion_tokens or body.max_tokens))
        return await run(http, handle, body, "chat")

    return app
