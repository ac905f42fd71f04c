"""`dsvl2 serve`: an OpenAI-compatible HTTP server over one loaded model (as vLLM's entrypoints).

Endpoints: POST /v1/chat/completions (streamed as SSE or not), GET /v1/models, GET /health.
Requests are typed models validated at the edge; each handler turns a request into the engine's
own input (Messages -> Prepared + GenerationConfig) and the engine's events back into OpenAI
objects. The engine (engine/batching.py) knows nothing of HTTP: one worker thread owns the
model and decodes concurrent requests together (continuous batching).

Message content: a string, or a list of {"type": "text"} and {"type": "image_url"} parts.
Images become `<image>` placeholders in the order the parts appear and the parts are joined with
"\\n", so [image, text] gives the prompt of `dsvl2 chat IMG "text"` ("<image>\\ntext"). If the text
parts already hold `<image>` placeholders (dsvl2's conversation-file form, which dsvl2's client
sends), the text is used as it is and the images fill the placeholders in order.

Every bad request gets an OpenAI error object {"error": {"message", "type", "code"}} with a 4xx
status; the server goes on. FastAPI and uvicorn come with the `serve` extra.

Standalone: python -m dsvl2_cli.app.serve -m PATH [--port N] [--api-key K] [--dtype float32]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import io
import json
import os
import re
import signal
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Annotated, Literal

from .. import settings as env
from ..engine.generate import Done, GenerationConfig, Prefilled, Token, check_context
from ..engine.processor import IMAGE_TOKEN, Message
from ..engine.sampling import SamplingParams
from ..errors import ContextTooLongError, Dsvl2Error
from . import images as image_io

_EXTRA = "dsvl2 serve needs the serve extra: pip install 'dsvl2[serve]'"

try:
    import fastapi
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError:  # pragma: no cover - the base install
    fastapi = None
    BaseModel = object  # keeps the class statements below importable; create_app refuses to run

    def Field(*args, **kwargs):
        return None

    ConfigDict = dict


def _require_extra() -> None:
    if fastapi is None:
        raise Dsvl2Error(_EXTRA)


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = ""                   # "" = no auth; else `Authorization: Bearer KEY` required
    allow_remote_images: bool = False   # http(s) image URLs fetched (else only data: URLs)
    max_body_bytes: int = 32 << 20
    max_images: int = 8                 # per request
    max_image_pixels: int = image_io.MAX_PIXELS
    remote_image_bytes: int = 20 << 20
    remote_timeout: float = 10.0
    cache_bytes: int = 1 << 30          # shared prompt caches (LRU)
    max_batch: int = 8                  # requests decoding together
    log_level: str = "info"


# ------------------------------------------------------------------------------- the protocol

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


if fastapi is not None:
    ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]
else:  # pragma: no cover
    ContentPart = object


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class ChatCompletionRequest(BaseModel):
    model: str | None = None  # any name is accepted; responses carry ours
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=10)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: bool = True  # False keeps special tokens; grounding tags are always kept
    n: int = Field(default=1, ge=1, le=1)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    stop_reason: str | None = None  # vLLM: the stop string that ended it, None for eos/length


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    stop_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class APIError(Exception):
    """The one error type of the server: becomes an OpenAI error object with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


# ------------------------------------------------------------------- HTTP -> engine requests

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.DOTALL)


class _Translator:
    """Request messages -> dsvl2 Messages (images decoded safely) and a GenerationConfig."""

    def __init__(self, vlm, settings: ServeSettings):
        self.vlm, self.settings = vlm, settings

    def messages(self, req: ChatCompletionRequest) -> list[Message]:
        count = sum(1 for m in req.messages if isinstance(m.content, list)
                    for p in m.content if isinstance(p, ImagePart))
        if count > self.settings.max_images:
            raise APIError(400, f"the request has {count} images; this server accepts at most "
                                f"{self.settings.max_images} per request", code="too_many_images")
        out, seen = [], 0
        for i, m in enumerate(req.messages, start=1):
            role = "system" if m.role == "developer" else m.role
            if m.content is None or isinstance(m.content, str):
                out.append(self._message(i, role, m.content or "", []))
                continue
            texts, images, order = [], [], []
            for part in m.content:
                if isinstance(part, TextPart):
                    texts.append(part.text)
                    order.append(part.text)
                else:
                    seen += 1
                    images.append(self._image(part.image_url.url, seen))
                    order.append(IMAGE_TOKEN)
            if any(IMAGE_TOKEN in t for t in texts):
                content = "".join(texts)  # placeholders given: the images fill them in order
            else:
                content = "\n".join(order)
            out.append(self._message(i, role, content, images))
        return out

    @staticmethod
    def _message(i: int, role: str, content: str, images: list) -> Message:
        if role != "user" and images:
            raise APIError(400, f"message {i} ({role}): only user messages can hold images")
        return Message(role, content, tuple(images))

    def _image(self, url: str, n: int):
        name = f"image {n}"
        if url.startswith("data:"):
            match = _DATA_URL.fullmatch(url)
            if not match:
                raise APIError(400, f"{name}: not a base64 data URL (data:image/png;base64,...)", code="invalid_image")
            try:
                data = base64.b64decode(match.group("data"), validate=True)
            except (binascii.Error, ValueError):
                raise APIError(400, f"{name}: the data URL's base64 is invalid", code="invalid_image") from None
        elif url.startswith(("http://", "https://")):
            if not self.settings.allow_remote_images:
                raise APIError(400, f"{name}: remote image URLs are refused; send the image as a data: URL, or "
                                    "start the server with --allow-remote-images", code="remote_image_refused")
            data = self._fetch(url, name)
        else:
            raise APIError(400, f"{name}: unsupported image URL; use a data: URL", code="invalid_image")
        self._check_pixels(data, name)
        image, _notes = image_io.load_image_with_notes(data, name=name)
        return image

    def _check_pixels(self, data: bytes, name: str) -> None:
        """The server's pixel limit, from the header, before anything is decoded."""
        from PIL import Image
        limit = self.settings.max_image_pixels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                with Image.open(io.BytesIO(data)) as img:
                    w, h = img.size
            except Exception:  # noqa: BLE001 - load_image_with_notes says what is wrong
                return
        if w * h > limit:
            raise APIError(400, f"{name}: image is {w}x{h} = {w * h:,} pixels, above this server's limit of "
                                f"{limit:,}; resize it first", code="image_too_large")

    def _fetch(self, url: str, name: str) -> bytes:
        import httpx
        cap = self.settings.remote_image_bytes
        try:
            with httpx.stream("GET", url, timeout=self.settings.remote_timeout, follow_redirects=True) as r:
                if r.status_code != 200:
                    raise APIError(400, f"{name}: fetching {url} gave HTTP {r.status_code}", code="invalid_image")
                chunks, size = [], 0
                for chunk in r.iter_bytes():
                    size += len(chunk)
                    if size > cap:
                        raise APIError(400, f"{name}: {url} is larger than {cap:,} bytes", code="image_too_large")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise APIError(400, f"{name}: cannot fetch {url} ({type(exc).__name__})", code="invalid_image") from None

    def config(self, req: ChatCompletionRequest, prompt_tokens: int) -> GenerationConfig:
        room = self.vlm.config.language.max_position_embeddings - prompt_tokens
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, room)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        sampling = SamplingParams(temperature=req.temperature if req.temperature is not None else 0.0,
                                  top_p=req.top_p if req.top_p is not None else 1.0, seed=req.seed)
        return GenerationConfig(max_tokens=max_tokens, sampling=sampling, stop=stop)


def _stop_reason(vlm, done: Done, stops: tuple[str, ...]) -> str | None:
    """vLLM's stop_reason: which stop string ended the answer (None for eos and length)."""
    if done.finish_reason != "stop":
        return None
    raw = vlm.tokenizer.decode(done.token_ids)
    found = [(raw.find(s), s) for s in stops if raw.find(s) >= 0]
    return min(found)[1] if found else (stops[0] if stops else None)


def _usage(prompt: int, completion: int, cached: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


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
    _require_extra()
    from contextlib import asynccontextmanager

    from ..engine.batching import BatchEngine, Failed

    settings = settings or ServeSettings()
    engine = engine or BatchEngine(vlm, max_batch=settings.max_batch, cache_bytes=settings.cache_bytes)
    translate = _Translator(vlm, settings)
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
                        stop_reason=_stop_reason(vlm, event, config.stop))
        return ChatCompletion(id=rid, created=int(time.time()), model=vlm.name, choices=[choice],
                              usage=_usage(prefilled.prompt_tokens, len(event.token_ids), prefilled.reused_tokens))

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
                live = _usage(prompt, completion, cached) if opts.continuous_usage_stats else None
                if isinstance(event, Prefilled):
                    prompt, cached = event.prompt_tokens, event.reused_tokens
                    live = _usage(prompt, 0, cached) if opts.continuous_usage_stats else None
                    yield chunk(Delta(role="assistant", content=""), live)
                elif isinstance(event, Token):
                    completion += event.id is not None
                    if event.text:
                        live = _usage(prompt, completion, cached) if opts.continuous_usage_stats else None
                        yield chunk(Delta(content=event.text), live)
                elif isinstance(event, Done):
                    final = _usage(prompt, len(event.token_ids), cached)
                    yield chunk(Delta(), final if opts.continuous_usage_stats else None,
                                FINISH_REASONS[event.finish_reason], _stop_reason(vlm, event, config.stop))
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
    _require_extra()
    try:
        import uvicorn
    except ImportError:  # pragma: no cover
        raise Dsvl2Error(_EXTRA) from None
    settings = settings or ServeSettings()
    app = create_app(vlm, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()


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
        _require_extra()
        import uvicorn  # noqa: F401
    except (Dsvl2Error, ImportError):
        print(f"error: {_EXTRA}", file=sys.stderr)
        return 1
    if args.exit_with_parent:
        _exit_with_parent()
    from ..engine.runtime import load
    try:
        vlm = load(args.model or env.default_model(), device=args.device, dtype=args.dtype, quantize=args.quantize)
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
