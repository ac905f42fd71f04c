"""The HTTP side of `dsvl2 serve`: an OpenAI-compatible FastAPI app over one loaded model (as
vLLM's entrypoints).

Endpoints: POST /v1/chat/completions (streamed as SSE or not), GET /v1/models, GET /health.
Requests are typed models validated at the edge (protocol.py, which also turns a request into
the engine's own input: Messages -> Prepared + GenerationConfig); each handler here turns the
engine's events back into OpenAI objects. The engine (engine/generate/scheduler.py) knows nothing of HTTP:
one worker thread owns the model and decodes concurrent requests together (continuous batching).

Every bad request gets an OpenAI error object {"error": {"message", "type", "code"}} with a 4xx
status; the server goes on; a body above the limit is refused before it is parsed (413).
FastAPI and uvicorn come with the `serve` extra. Binding and running the app: server_run.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from ...engine.events import Done, Prefilled, Token
from ...engine.generate import check_context
from ...errors import ContextTooLongError, Dsvl2Error
from .protocol import (FINISH_REASONS, APIError, AssistantMessage, ChatCompletion, ChatCompletionChunk,
                       ChatCompletionRequest, Choice, ChunkChoice, Delta, ServeSettings, StreamOptions, Translator,
                       fastapi, require_extra, stop_reason, usage)

if fastapi is not None:
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException


class _BodyLimit:
    """ASGI middleware: refuse a body above `limit` bytes (413) before the app parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        err = APIError(413, f"the request body is larger than this server's limit of {self.limit:,} bytes",
                       code="request_too_large")
        await err.response()(scope, receive, send)


def create_app(vlm, settings: ServeSettings | None = None, engine=None) -> FastAPI:
    """The FastAPI app serving `vlm`. Starts the engine's worker thread; it stops with the app."""
    require_extra()
    from contextlib import asynccontextmanager

    from ...engine.generate.scheduler import BatchEngine, Failed

    settings = settings or ServeSettings()
    engine = engine or BatchEngine(vlm, max_batch=settings.max_batch, cache_bytes=settings.cache_bytes)
    translate = Translator(vlm, settings)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="dsvl2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" or tuple(e.get("loc", ())) == ("body",) for e in errors):
            return APIError(400, "the request body is not a valid JSON object", code="invalid_json").response()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return APIError(422, f"{where}: {first.get('msg', 'invalid request')}", code="invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind).response()

    async def authorize(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or wrong API key; send Authorization: Bearer KEY",
                           "authentication_error", "invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": engine.active}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{
            "id": vlm.name, "object": "model", "created": created, "owned_by": "dsvl2",
            "max_model_len": vlm.config.language.max_position_embeddings}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        prepared, config = await run_in_threadpool(_prepare, body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        handle = engine.submit(prepared, config, lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                               skip_special_tokens=body.skip_special_tokens)
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        async def next_event():
            """The next engine event; None once the client has gone."""
            while True:
                try:
                    return await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return None

        if body.stream:
            return StreamingResponse(_sse(body, config, rid, next_event, handle), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            prefilled = None
            while True:
                event = await next_event()
                if event is None:
                    return JSONResponse({}, status_code=499)
                if isinstance(event, Failed):
                    raise _engine_error(event.error)
                if isinstance(event, Prefilled):
                    prefilled = event
                if isinstance(event, Done):
                    break
        finally:
            handle.cancel()
        choice = Choice(message=AssistantMessage(content=event.text), finish_reason=FINISH_REASONS[event.finish_reason],
                        stop_reason=stop_reason(vlm, event, config.stop))
        return ChatCompletion(id=rid, created=int(time.time()), model=vlm.name, choices=[choice],
                              usage=usage(prefilled.prompt_tokens, len(event.token_ids), prefilled.reused_tokens))

    def _prepare(body: ChatCompletionRequest):
        try:
            messages = translate.messages(body)
            prepared = vlm.prepare(messages)
            check_context(vlm, prepared)
            return prepared, translate.config(body, int(prepared.input_ids.numel()))
        except Dsvl2Error as exc:
            raise _engine_error(exc) from None

    async def _sse(body, config, rid, next_event, handle):
        opts = body.stream_options or StreamOptions()
        now = int(time.time())

        def chunk(delta: Delta, usage=None, finish=None, stop_reason=None, choices=True) -> str:
            c = ChatCompletionChunk(id=rid, created=now, model=vlm.name, usage=usage,
                                    choices=[ChunkChoice(delta=delta, finish_reason=finish, stop_reason=stop_reason)]
                                    if choices else [])
            data = c.model_dump(exclude_none=True)
            for choice in data["choices"]:
                choice.setdefault("finish_reason", None)  # OpenAI sends null until the last chunk
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        prompt = cached = completion = 0
        try:
            while True:
                event = await next_event()
                if event is None:
                    return  # the client is gone; `finally` cancels its generation
                if isinstance(event, Failed):
                    err = _engine_error(event.error)
                    yield "data: " + json.dumps({"error": {"message": err.message, "type": err.type,
                                                           "code": err.code}}) + "\n\n"
                    break
                live = usage(prompt, completion, cached) if opts.continuous_usage_stats else None
                if isinstance(event, Prefilled):
                    prompt, cached = event.prompt_tokens, event.reused_tokens
                    live = usage(prompt, 0, cached) if opts.continuous_usage_stats else None
                    yield chunk(Delta(role="assistant", content=""), live)
                elif isinstance(event, Token):
                    completion += event.id is not None
                    if event.text:
                        live = usage(prompt, completion, cached) if opts.continuous_usage_stats else None
                        yield chunk(Delta(content=event.text), live)
                elif isinstance(event, Done):
                    final = usage(prompt, len(event.token_ids), cached)
                    yield chunk(Delta(), final if opts.continuous_usage_stats else None,
                                FINISH_REASONS[event.finish_reason], stop_reason(vlm, event, config.stop))
                    if opts.include_usage:
                        yield chunk(Delta(), final, choices=False)
                    break
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()

    return app


def _engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextTooLongError):
        return APIError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, Dsvl2Error):
        return APIError(400, str(exc))
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_server_error")
