"""The OpenAI chat-completions protocol of `dsvl2 serve` (as vLLM's entrypoints/openai/protocol.py):
the typed request and response models validated at the edge, the one error type (`APIError`),
and the translation of a request into the engine's own input (Messages + GenerationConfig).

Message content: a string, or a list of {"type": "text"} and {"type": "image_url"} parts.
Images become `<image>` placeholders in the order the parts appear and the parts are joined with
"\\n", so [image, text] gives the prompt of `dsvl2 chat IMG "text"` ("<image>\\ntext"). If the text
parts already hold `<image>` placeholders (dsvl2's conversation-file form, which dsvl2's client
sends), the text is used as it is and the images fill the placeholders in order. Images are
decoded through images.py (bombs, truncation, modes), with the server's own pixel limit first.

FastAPI and pydantic come with the `serve` extra; without it this module still imports (the
class statements run against stand-ins) and `require_extra` refuses to serve.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from typing import Annotated, Literal

from ...engine.events import Done, GenerationConfig
from ...engine.prompt.processor import IMAGE_TOKEN, Message
from ...engine.generate.sampling import SamplingParams
from ...errors import Dsvl2Error
from ..inputs import images as image_io

_EXTRA = "dsvl2 serve needs the serve extra: pip install 'dsvl2[serve]'"

try:
    import fastapi
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError:  # pragma: no cover - the base install
    fastapi = None
    BaseModel = object  # keeps the class statements below importable; create_app refuses to run

    def Field(*args, **kwargs):
        return None

    ConfigDict = dict


def require_extra() -> None:
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
    log_level: str = "warning"          # uvicorn's; the `serve` command's default


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


class Translator:
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


def stop_reason(vlm, done: Done, stops: tuple[str, ...]) -> str | None:
    """vLLM's stop_reason: which stop string ended the answer (None for eos and length)."""
    if done.finish_reason != "stop":
        return None
    raw = vlm.tokenizer.decode(done.token_ids)
    found = [(raw.find(s), s) for s in stops if raw.find(s) >= 0]
    return min(found)[1] if found else (stops[0] if stops else None)


def usage(prompt: int, completion: int, cached: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))
