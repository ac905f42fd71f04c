"""`dsvl2 serve`: an OpenAI-compatible HTTP server over one loaded model (as vLLM's entrypoints).

Endpoints: POST /v1/chat/completions (streamed as SSE or not), GET /v1/models, GET /health.
Requests are typed models validated at the edge (protocol.py, which also turns a request into
the engine's own input: Messages -> Prepared + GenerationConfig); each handler here turns the
engine's events back into OpenAI objects. The engine (engine/generate/scheduler.py) knows nothing of HTTP:
one worker thread owns the model and decodes concurrent requests together (continuous batching).

Every bad request gets an OpenAI error object {"error": {"message", "type", "code"}} with a 4xx
status; the server goes on. FastAPI and uvicorn come with the `serve` extra.

`dsvl2 serve` (cli.py) loads the model as the other commands do and calls `check_bind`, then
`run`. Standalone: python -m dsvl2_cli.app.serve -m PATH [--port N] [--api-key K] [--dtype float32]
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hmac
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid

from .. import settings as env
from ..engine.generate import Done, Prefilled, Token, check_context
from ..errors import ContextTooLongError, Dsvl2Error
from .protocol import (_EXTRA, FINISH_REASONS, APIError, AssistantMessage, ChatCompletion, ChatCompletionChunk,
                       ChatCompletionRequest, Choice, ChunkChoice, Delta, ServeSettings, StreamOptions, Translator,
                       fastapi, require_extra, stop_reason, usage)

if fastapi is not None:
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

_Translator = Translator  # the name tests and earlier callers use

# ------------------------------------------------------------------------------- the app

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

    from ..engine.generate.scheduler import BatchEngine, Failed

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


# ----------------------------------------------------------------------------------- running

def run(vlm, settings: ServeSettings | None = None) -> None:
    """Serve `vlm` with uvicorn until interrupted (Ctrl-C: a clean shutdown)."""
    require_extra()
    try:
        import uvicorn
    except ImportError:  # pragma: no cover
        raise Dsvl2Error(_EXTRA) from None
    settings = settings or ServeSettings()
    app = create_app(vlm, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()


def base_url(settings: ServeSettings) -> str:
    """The URL clients use (`--server URL`); an IPv6 host goes in brackets."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_warning(settings: ServeSettings) -> str | None:
    """A warning when the server is reachable from other machines with no API key (None when fine).
    Allowed, not refused: a trusted network or a proxy in front may do the authentication."""
    if settings.api_key or _loopback(settings.host):
        return None
    return (f"--host {settings.host} makes the server reachable from other machines and no API key is set: "
            "anyone who can reach it can use it; set --api-key or DSVL2_API_KEY")


def check_bind(settings: ServeSettings) -> None:
    """Fail in one line, before the model loads, if the address cannot be listened on (uvicorn
    would only log it after the load and exit with a traceback-free but late error)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind((settings.host, settings.port))
    except (socket.gaierror, UnicodeError):  # before OSError, of which gaierror is one
        raise Dsvl2Error(f"cannot listen on {base_url(settings)}: unknown host {settings.host!r}") from None
    except OSError as exc:
        why = {errno.EADDRINUSE: "the port is in use (another server?); choose another with --port",
               errno.EACCES: "permission denied (ports below 1024 need privileges); choose another with --port",
               errno.EADDRNOTAVAIL: "this machine has no such address; check --host"}.get(
                   exc.errno, exc.strerror or str(exc))
        raise Dsvl2Error(f"cannot listen on {base_url(settings)}: {why}") from None


def _exit_with_parent() -> None:
    """Stop (as if Ctrl-C) when the process that started us is gone: no orphaned test servers."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="dsvl2-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsvl2_cli.app.serve", description="dsvl2's OpenAI-compatible server")
    parser.add_argument("-m", "--model", default=None, help="model folder or Hugging Face id ($DSVL2_MODEL)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY ($DSVL2_API_KEY)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--quantize", default=None)
    parser.add_argument("--vision-int8", action="store_true", help="vision tower linears in int8 ($DSVL2_VISION_INT8)")
    parser.add_argument("--allow-remote-images", action="store_true")
    parser.add_argument("--cache-bytes", type=int, default=ServeSettings.cache_bytes)
    parser.add_argument("--max-batch", type=int, default=ServeSettings.max_batch)
    parser.add_argument("--max-images", type=int, default=ServeSettings.max_images)
    parser.add_argument("--max-image-pixels", type=int, default=ServeSettings.max_image_pixels)
    parser.add_argument("--max-body-bytes", type=int, default=ServeSettings.max_body_bytes)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--exit-with-parent", action="store_true", help="stop when the parent process ends")
    args = parser.parse_args(argv)
    try:
        require_extra()
        import uvicorn  # noqa: F401
    except (Dsvl2Error, ImportError):
        print(f"error: {_EXTRA}", file=sys.stderr)
        return 1
    if args.exit_with_parent:
        _exit_with_parent()
    from ..engine.runtime import load
    try:
        vlm = load(args.model or env.default_model(), device=args.device, dtype=args.dtype, quantize=args.quantize,
                   vision_int8=args.vision_int8 or None)
        settings = ServeSettings(host=args.host, port=args.port, api_key=args.api_key or env.api_key(),
                                 allow_remote_images=args.allow_remote_images, cache_bytes=args.cache_bytes,
                                 max_batch=args.max_batch, max_images=args.max_images,
                                 max_image_pixels=args.max_image_pixels, max_body_bytes=args.max_body_bytes,
                                 log_level=args.log_level)
        run(vlm, settings)
    except Dsvl2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
