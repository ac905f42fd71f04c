"""The client side of `--server URL`: a remote model that streams the local engine's events.

    model = RemoteModel("http://127.0.0.1:8000", api_key=None)
    for event in model.stream([user_message("Describe it.", [img])], None, GenerationConfig(max_tokens=64)):
        ...  # Prefilled, then Token(None, text)..., then Done, as engine.generate.stream_generate

It speaks the OpenAI chat-completions protocol over httpx (the `serve` extra), so it works with
`dsvl2 serve` and with vLLM. Images go as PNG data URLs; message text keeps its `<image>`
placeholders and the images follow as image_url parts (dsvl2's server fills the placeholders in
order: the exact local prompt; vLLM places images its own way).

What differs from a local run: token ids are not sent over the wire (`Token.id` is None,
`Done.token_ids` is ()); `Prefilled.prompt_tokens` and `reused_tokens` come from the server's
usage (vLLM's `continuous_usage_stats`; 0 when the server does not send it before the answer);
`Done.stats` takes prompt/cached/completion counts from the final usage and times
(time to first token, decode tokens/s) measured here. finish_reason: "eos", "stop" (a stop
string: the server's `stop_reason` is a string), "length".

Errors are `ServerError` with one line: unreachable, refused, timed out, 401 (API key), any other
4xx/5xx with the server's own message. A stream cut mid-answer (no finish_reason or no
`data: [DONE]`) yields the tokens that arrived, then raises `ServerError` whose `partial_text`
holds them; nothing is silently truncated.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator, Sequence

from ...engine.events import Done, Event, GenerationConfig, Prefilled, Result, Stats, Token
from ...engine.prompt.messages import Message
from ...errors import Dsvl2Error, ServerError

_EXTRA = "dsvl2 --server needs the serve extra: pip install 'dsvl2[serve]'"


def image_data_url(image) -> str:
    """A PIL image as a PNG data URL."""
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_openai_messages(messages: Sequence[Message], system: str | None = None) -> list[dict]:
    out = []
    if system is not None and system.strip():
        out.append({"role": "system", "content": system.strip()})
    for m in messages:
        if m.kind == "system" and out and out[0]["role"] == "system":
            continue  # the system= argument wins, as in Processor.prepare
        if not m.images:
            out.append({"role": m.kind, "content": m.content})
            continue
        parts = [{"type": "text", "text": m.content}]
        parts += [{"type": "image_url", "image_url": {"url": image_data_url(img)}} for img in m.images]
        out.append({"role": m.kind, "content": parts})
    return out


def _server_message(response) -> str:
    """The error message of an OpenAI, vLLM or other error body, in one line."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip().splitlines()
        return text[0][:300] if text else response.reason_phrase
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        err = err.get("message") or err.get("detail") or json.dumps(err)
    return " ".join(str(err).split())[:500]


class RemoteModel:
    """A model behind an OpenAI-compatible server. `model`: the name to ask for (default: the
    server's first model). `timeout`: seconds to connect and between two pieces of the answer."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 timeout: float = 600.0, transport=None):
        try:
            import httpx
        except ImportError:  # pragma: no cover
            raise Dsvl2Error(_EXTRA) from None
        self._httpx = httpx
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.base_url, headers=headers, transport=transport,
                                    timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))
        self._model = model

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def name(self) -> str:
        """The model name the server reports (asked once)."""
        if self._model is None:
            models = self.models()
            if not models:
                raise ServerError(f"the server at {self.base_url} serves no model")
            self._model = models[0]
        return self._model

    def models(self) -> list[str]:
        response = self._request("GET", "/models")
        try:
            return [m["id"] for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise ServerError(f"{self.base_url}/models: not an OpenAI model list") from None

    def payload(self, messages: Sequence[Message], system: str | None, config: GenerationConfig,
                skip_special_tokens: bool) -> dict:
        s = config.sampling
        body = {"model": self.name, "messages": to_openai_messages(messages, system), "max_tokens": config.max_tokens,
                "temperature": s.temperature, "top_p": s.top_p, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                "skip_special_tokens": skip_special_tokens}
        if s.seed is not None:
            body["seed"] = s.seed
        if config.stop:
            body["stop"] = list(config.stop)
        if s.top_k:
            body["top_k"] = s.top_k  # vLLM's extension
        if s.repetition_penalty != 1.0:
            body["repetition_penalty"] = s.repetition_penalty
        return body

    def stream(self, messages: Sequence[Message], system: str | None = None, config: GenerationConfig | None = None,
               skip_special_tokens: bool = True) -> Iterator[Event]:
        """The answer as Prefilled, Token..., Done events (see the module docstring)."""
        config = config or GenerationConfig()
        body = self.payload(messages, system, config, skip_special_tokens)
        t0 = time.perf_counter()
        with self._errors(), self._client.stream("POST", "/chat/completions", json=body) as response:
            self._check(response)
            yield from self._events(response, t0)

    def generate(self, messages: Sequence[Message], system: str | None = None,
                 config: GenerationConfig | None = None, skip_special_tokens: bool = True) -> Result:
        for event in self.stream(messages, system, config, skip_special_tokens):
            if isinstance(event, Done):
                return event
        raise AssertionError("stream ended without Done")  # pragma: no cover

    # ---- the wire
    def _events(self, response, t0: float) -> Iterator[Event]:
        parts: list[str] = []
        usage: dict = {}
        finish = stop_reason = None
        prefilled, done_marker = False, False
        t_first = None
        n_chunks = 0
        try:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done_marker = True
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise ServerError(f"{self.base_url}: the stream sent something that is not JSON: {data[:80]}",
                                      partial_text="".join(parts)) from None
                if "error" in chunk:
                    err = chunk["error"]
                    message = err.get("message", err) if isinstance(err, dict) else err
                    raise ServerError(f"the server failed while answering: {message}", partial_text="".join(parts))
                usage = chunk.get("usage") or usage
                if not prefilled:
                    prefilled = True
                    yield Prefilled(int(usage.get("prompt_tokens", 0)), _cached(usage), 0, time.perf_counter() - t0)
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text:
                        t_first = t_first or time.perf_counter()
                        n_chunks += 1
                        parts.append(text)
                        yield Token(None, text)
                    if choice.get("finish_reason"):
                        finish, stop_reason = choice["finish_reason"], choice.get("stop_reason")
        except self._httpx.HTTPError as exc:
            raise ServerError(f"the connection to {self.base_url} broke mid-answer ({type(exc).__name__}); "
                              "the answer is incomplete", partial_text="".join(parts)) from None
        if finish is None or not done_marker:
            raise ServerError(f"the server at {self.base_url} closed the stream mid-answer; the answer is incomplete",
                              partial_text="".join(parts))
        t_end = time.perf_counter()
        n = int(usage.get("completion_tokens", n_chunks))
        stats = Stats(prompt_tokens=int(usage.get("prompt_tokens", 0)), reused_tokens=_cached(usage), image_tokens=0,
                      generated_tokens=n, time_to_first_token=(t_first or t_end) - t0,
                      prefill_tokens_per_second=0.0,
                      decode_tokens_per_second=(n - 1) / (t_end - t_first) if t_first and n > 1 and t_end > t_first
                      else 0.0,
                      cache_bytes=0)
        yield Done(_finish_reason(finish, stop_reason), "".join(parts), (), stats)

    def _request(self, method: str, path: str, **kwargs):
        with self._errors():
            response = self._client.request(method, path, **kwargs)
            self._check(response)
            return response

    def _check(self, response) -> None:
        if response.status_code < 400:
            return
        response.read()
        message = _server_message(response)
        if response.status_code == 401:
            raise ServerError(f"the server at {self.base_url} refused the API key (401: {message}); "
                              "set DSVL2_API_KEY or pass --api-key", status=401)
        raise ServerError(f"the server at {self.base_url} answered {response.status_code}: {message}",
                          status=response.status_code)

    def _errors(self):
        return _HttpErrors(self)


class _HttpErrors:
    """httpx's exceptions -> one-line ServerErrors."""

    def __init__(self, model: RemoteModel):
        self.model = model

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        httpx = self.model._httpx
        url = self.model.base_url
        if exc is None or isinstance(exc, (Dsvl2Error, GeneratorExit)):
            return False
        if isinstance(exc, httpx.ConnectError):
            raise ServerError(f"cannot reach the server at {url} (connection refused or no such host); "
                              "is `dsvl2 serve` running there?") from None
        if isinstance(exc, httpx.TimeoutException):
            raise ServerError(f"the server at {url} did not answer within {self.model.timeout:g} s") from None
        if isinstance(exc, httpx.HTTPError):
            raise ServerError(f"talking to the server at {url} failed ({type(exc).__name__}: {exc})") from None
        return False


def _cached(usage: dict) -> int:
    details = usage.get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def _finish_reason(finish: str, stop_reason) -> str:
    if finish == "stop":
        return "stop" if isinstance(stop_reason, str) else "eos"
    return finish
