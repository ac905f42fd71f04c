"""The tasks dsvl2 knows: chat, ocr, ask and ground over a model (a `Backend`: a loaded
engine/runtime.VLModel, or a server's with --server), and info's facts about a model that is not
loaded.

A `Backend` has a `name` and two steps: `prepare(messages, system) -> Prompt` and
`answer(prompt, config, keep_special=) -> Iterator[Event]` (Prefilled, Token..., Done).
`LocalBackend` runs the engine (prepare = the processor's token ids and image layout, so a prompt
too long fails before anything runs); `RemoteBackend` sends the messages to an OpenAI-compatible
server (app/client.RemoteModel). A task accepts a VLModel too (wrapped in a LocalBackend). Chat
is a ChatSession either way: the local one keeps its prompt cache, the remote one
(`RemoteChatSession`) sends the whole conversation each turn (the server reuses its own cache).

What each task asks the model (OCR_PROMPTS; grounding prompts come from grounding.py), how long
its answers may be (MAX_TOKENS), and what comes back: every task is a generator of the engine's
events (Prefilled, Token, Done) ending with a typed result, an `Answer` (`GroundAnswer` for
ground). `read_pages` yields the events of each page in turn, bracketed by `PageStarted` and
ending in that page's `Answer` or a `PageFailed`. Nothing here writes to a terminal: the CLI
renders these events (render.render_answer), and a server can turn them into HTTP responses.

The JSON record of an answer (`answer_record`; `--json` prints one per line):
    {"model": str,                  # the model as asked for (-m, DSVL2_MODEL or the default)
     "input": str | null,           # the file answered about ("-" for stdin); null for none or several
     "page": int | null,            # its 1-based PDF page; null for an image or several images
     "images": [{"input": str, "page": int | null, "size": [w, h],
                 "grid": [wide, high], "tokens": int}],   # every image in the prompt
     "text": str,                   # the answer, surrounding whitespace stripped
     "finish_reason": "eos" | "length" | "stop" | "context",
     "usage": {"prompt_tokens": int, "cached_tokens": int, "image_tokens": [int, ...],  # per image
               "generated_tokens": int},
     "timings": {"time_to_first_token_s": float, "prefill_tokens_per_s": float,
                 "decode_tokens_per_s": float},
     "token_ids": [int, ...]}
With --server (RemoteBackend) the keys are the same: "token_ids" is [] (not sent over the wire),
"grid" and "tokens" of each image and each "image_tokens" entry are null (the server tiles the
image, its layout is not reported), "usage" is the server's and "timings" are measured here
("prefill_tokens_per_s" 0: not measurable from outside).
ground: the same keys, plus
     "boxes": [{"label": str, "box_999": [x1, y1, x2, y2],   # 0..999 of the image's width/height
                "xyxy": [x1, y1, x2, y2], "xywh": [x, y, w, h]}],   # pixels (v / 999 * size)
     "image_size": [w, h],
     "problems": [str, ...],        # what in the answer could not be read as boxes
     "raw": str                     # the answer with its special tokens (<|ref|>, <|det|>, ...)
   where "text" is the answer without tags and box lists.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from PIL import Image

from .. import settings
from ..engine import facts as model_facts
from ..engine import fit, memory, quant, runtime
from ..engine.chat import ChatSession
from ..engine.generate import Done, Event, GenerationConfig, stream_generate
from ..engine.processor import MAX_TILED_IMAGES, Message, Prepared, user_message
from ..engine.prompt_store import PromptStore
from ..engine.sampling import SamplingParams
from ..engine.tokenizer import GROUNDING_TOKENS
from ..errors import Dsvl2Error
from ..model.config import ModelConfig
from .grounding import Box, caption_prompt, parse_grounding, referring_prompt, to_pixels, to_xywh
from .inputs import Source, image_origin, output_paths

TEMPERATURE_ADVICE = 0.7  # the model card: higher temperatures degrade quality
OCR_PROMPTS = {
    "text": "Read all the text in this image and write it out exactly as it appears, in reading order, "
            "keeping the line breaks. Output only the text.",
    "markdown": "Convert this page to Markdown: keep its headings, lists, tables and emphasis, and write out "
                "all of its text in reading order. Output only the Markdown.",
}
MAX_TOKENS = {"chat": 1024, "ocr": 2048, "ground": 1024}


@dataclass
class Options:
    """The options every model command shares: which model, how to sample, how to answer."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "bfloat16"
    quantize: str | None = None  # also "auto": check_memory chooses
    allow_paging: bool = False  # load even when the plan does not fit (a warning instead)
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    system: str | None = None
    stream: bool = True
    json: bool = False
    quiet: bool = False
    prompt_store: PromptStore | None = None  # image prefixes saved across runs (None: --no-cache)
    server: str | None = None    # --server URL (else $DSVL2_SERVER): answer through that server
    api_key: str | None = None   # --api-key (else $DSVL2_API_KEY): sent to the server

    def server_url(self) -> str:
        """The server to use ("" = a local model)."""
        return (self.server or "").strip().rstrip("/") or settings.server_url()

    def server_key(self) -> str | None:
        return self.api_key or settings.api_key() or None

    def generation(self, task: str) -> GenerationConfig:
        sampling = SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        return GenerationConfig(max_tokens=self.max_tokens or MAX_TOKENS[task], sampling=sampling,
                                prompt_store=self.prompt_store)

    def sampling_note(self) -> str | None:
        """A warning for a temperature the model card advises against (None when fine)."""
        if self.temperature > TEMPERATURE_ADVICE:
            return (f"temperature {self.temperature:g} is above {TEMPERATURE_ADVICE}, where the model card says "
                    "quality degrades")
        return None


def untiled_note(n: int, what: str = "images", advice: str = "") -> str:
    """Why detail is lost with more than MAX_TILED_IMAGES images in one prompt."""
    return (f"{n} {what}: with more than {MAX_TILED_IMAGES} images the model sees each at 384x384 without "
            f"tiling, so small text and detail are lost; {advice or f'use at most {MAX_TILED_IMAGES} for detail'}")


# ------------------------------------------------------------------------------------ results

@dataclass(frozen=True)
class Answer:
    """One finished answer: the engine's Done event and the JSON record built from it."""

    done: Done
    record: dict

    @property
    def text(self) -> str:
        return self.record["text"]


@dataclass(frozen=True)
class PixelBox:
    """A grounding box in the image's pixels, with its place in the answer."""

    label: str
    box_999: tuple[int, int, int, int]
    xyxy: tuple[int, int, int, int]
    ref_index: int  # which distinct label, in order of appearance


@dataclass(frozen=True)
class GroundAnswer(Answer):
    """An answer with boxes: `text` without tags and box lists, `raw` with them."""

    image: Image.Image | None = None
    boxes: tuple[PixelBox, ...] = ()
    problems: tuple[str, ...] = ()
    raw: str = ""
    caption: bool = False  # a grounded caption: its text matters as much as its boxes


@dataclass(frozen=True)
class PageStarted:
    """ocr: the page is loaded and its prompt prepared; its generation events follow."""

    source: Source


@dataclass(frozen=True)
class PageFailed:
    """ocr: the page could not be read; the loop goes on with the next one."""

    source: Source
    error: Dsvl2Error

    @property
    def message(self) -> str:
        """The error, naming the page unless it already starts with the file's name."""
        message = str(self.error)
        return message if message.startswith(self.source.input) else f"{self.source.title}: {message}"


TaskEvent = Event | Answer | PageStarted | PageFailed


def answer_record(vlm, done: Done, prepared: Prepared | None, images: Sequence[Image.Image]) -> dict:
    """The JSON object of one answer (schema above); `prepared` None: a server's answer, whose
    image layout is unknown here."""
    st = done.stats
    entries = [image_origin(img).as_json() for img in images]
    for entry in entries:
        entry.update(grid=None, tokens=None)
    for entry, prepared_image in zip(entries, prepared.images if prepared is not None else ()):
        entry["grid"] = list(prepared_image.grid)  # local tiles (wide, high); [1, 1] when untiled
        entry["tokens"] = prepared_image.num_tokens
    image_tokens = list(prepared.num_image_tokens) if prepared is not None else [None] * len(images)
    inputs = {e["input"] for e in entries}
    return {
        "model": vlm.name,
        "input": entries[0]["input"] if len(inputs) == 1 else None,
        "page": entries[0]["page"] if len(entries) == 1 else None,
        "images": entries,
        "text": done.text.strip(),
        "finish_reason": done.finish_reason,
        "usage": {"prompt_tokens": st.prompt_tokens, "cached_tokens": st.reused_tokens,
                  "image_tokens": image_tokens, "generated_tokens": st.generated_tokens},
        "timings": {"time_to_first_token_s": round(st.time_to_first_token, 4),
                    "prefill_tokens_per_s": round(st.prefill_tokens_per_second, 2),
                    "decode_tokens_per_s": round(st.decode_tokens_per_second, 2)},
        "token_ids": list(done.token_ids),
    }


# ----------------------------------------------------------------------------------- backends

@dataclass(frozen=True)
class Prompt:
    """A prompt ready to answer: the messages, and locally the processor's token ids and layout."""

    messages: tuple[Message, ...]
    system: str | None
    prepared: Prepared | None = None  # None on a server: it builds the prompt itself


class Backend(Protocol):
    """What a task runs on (module docstring)."""

    name: str

    def prepare(self, messages: Sequence[Message], system: str | None) -> Prompt: ...

    def answer(self, prompt: Prompt, config: GenerationConfig, *, keep_special: bool = False
               ) -> Iterator[Event]: ...


class LocalBackend:
    """A loaded model (VLModel): the engine's prepare and stream_generate."""

    def __init__(self, vlm):
        self.vlm = vlm
        self.name = vlm.name

    def prepare(self, messages: Sequence[Message], system: str | None) -> Prompt:
        return Prompt(tuple(messages), system, self.vlm.prepare(list(messages), system=system))

    def answer(self, prompt: Prompt, config: GenerationConfig, *, keep_special: bool = False) -> Iterator[Event]:
        # keep_special needs nothing here: the local decoder always keeps the grounding tokens
        return stream_generate(self.vlm, prompt.prepared, config)


# The model's special tokens (<|User|>, <｜end▁of▁sentence｜>, <image>...): what a server keeps
# when asked to keep special tokens, of which the local text keeps only the grounding ones.
_SPECIAL = re.compile(r"<\|[^|<>\s]{1,40}\|>|<｜[^｜<>]{1,40}｜>|<image>")


def _local_specials_only(text: str) -> str:
    return _SPECIAL.sub(lambda m: m.group(0) if m.group(0) in GROUNDING_TOKENS else "", text)


class RemoteBackend:
    """A model behind an OpenAI-compatible server (`client.RemoteModel`, or anything with its
    `name` and `stream`). Nothing is prepared here: the server tiles and tokenizes."""

    def __init__(self, remote):
        self.remote = remote
        self.name = remote.name  # asks the server now: an unreachable one fails before any work

    def prepare(self, messages: Sequence[Message], system: str | None) -> Prompt:
        return Prompt(tuple(messages), system)

    def answer(self, prompt: Prompt, config: GenerationConfig, *, keep_special: bool = False) -> Iterator[Event]:
        """The server's events. keep_special: ask for the special tokens (vLLM drops the grounding
        tags otherwise), then drop all but the grounding tags from the final text, as locally."""
        for event in self.remote.stream(list(prompt.messages), prompt.system, config,
                                        skip_special_tokens=not keep_special):
            if keep_special and isinstance(event, Done):
                event = replace(event, text=_local_specials_only(event.text))
            yield event


def as_backend(model) -> Backend:
    """A Backend as it is; a loaded model (VLModel) in a LocalBackend."""
    return model if isinstance(model, (LocalBackend, RemoteBackend)) else LocalBackend(model)


def _generate(backend: Backend, prompt: Prompt, images: Sequence[Image.Image], config: GenerationConfig,
              keep_special: bool = False) -> Iterator[Event | Answer]:
    done = None
    for event in backend.answer(prompt, config, keep_special=keep_special):
        if isinstance(event, Done):
            done = event
        yield event
    yield Answer(done, answer_record(backend, done, prompt.prepared, images))


# -------------------------------------------------------------------------------------- tasks

def chat_turn(session: ChatSession, text: str | None = None) -> Iterator[Event | Answer]:
    """One answer in a chat: to `text` (with the session's pending images), or with None to the
    conversation as loaded (ChatSession.load). Closing this generator closes the session's, so
    an interrupted answer is kept or dropped as ChatSession.ask says."""
    events = session.ask(text) if text is not None else session.respond()
    done = None
    try:
        for event in events:
            if isinstance(event, Done):
                done = event
            yield event
    finally:
        events.close()
    prepared = session.last_prepared
    if isinstance(prepared, Prompt):  # a RemoteChatSession's
        prepared = prepared.prepared
    yield Answer(done, answer_record(session.vlm, done, prepared, session.images))


def ask_note(pages: int) -> str | None:
    """ask: why so many pages lose detail, and what to do (None when they are all tiled)."""
    if pages <= MAX_TILED_IMAGES:
        return None
    return untiled_note(pages, "pages", "ask about 1 or 2 pages at a time (e.g. --pages 3 or --pages 3-4) for detail")


def ask(model, images: Sequence[Image.Image], question: str, opts: Options) -> Iterator[Event | Answer]:
    """One question about document pages (or any images), all in one prompt."""
    backend = as_backend(model)
    prompt = backend.prepare([user_message(question, list(images))], opts.system)
    yield from _generate(backend, prompt, images, opts.generation("chat"))


def ground_prompt(what: str | None, caption: bool) -> str:
    """What to find (a referring expression), or with `caption` a grounded caption of the image."""
    return caption_prompt(what) if caption else referring_prompt(what)


def ground(model, image: Image.Image, prompt: str, opts: Options, caption: bool = False
           ) -> Iterator[Event | GroundAnswer]:
    """The boxes of what `prompt` (ground_prompt) asks for, ending with a GroundAnswer."""
    backend = as_backend(model)
    ready = backend.prepare([user_message(prompt, [image])], opts.system)
    answer = None
    for event in _generate(backend, ready, [image], opts.generation("ground"), keep_special=True):
        if isinstance(event, Answer):
            answer = event
        else:
            yield event
    yield grounded(backend, answer, image, caption)


def grounded(vlm, answer: Answer, image: Image.Image, caption: bool = False) -> GroundAnswer:
    """An answer read as boxes: parsed, put in pixels, and its record given the grounding keys."""
    # The streamed text keeps the grounding tokens (<|ref|>, <|det|>...) the parser needs, and
    # nothing else of the specials (placeholders, pad) nor control characters; it is also all
    # a remote server gives (no token ids).
    raw = answer.done.text.strip()
    result = parse_grounding(raw)
    w, h = image.size
    boxes = tuple(_in_pixels(b, w, h) for b in result.boxes)
    record = dict(answer.record)
    record.update(text=result.text, image_size=[w, h], problems=result.problems, raw=raw, boxes=[
        {"label": b.label, "box_999": list(b.box_999), "xyxy": list(b.xyxy), "xywh": list(to_xywh(b.xyxy))}
        for b in boxes])
    return GroundAnswer(answer.done, record, image=image, boxes=boxes, problems=tuple(result.problems), raw=raw,
                        caption=caption)


def _in_pixels(box: Box, w: int, h: int) -> PixelBox:
    return PixelBox(box.label, box.box_999, to_pixels(box, w, h), box.ref_index)


def ocr_extension(fmt: str, as_json: bool) -> str:
    """The file extension of ocr's per-page output files for --format `fmt` (or --json)."""
    return "json" if as_json else ("md" if fmt == "markdown" else "txt")


def ocr_targets(sources: list[Source], out: Path | None, ext: str, skip_existing: bool = False
                ) -> tuple[list[Source], list[Path | None], int]:
    """(sources, their output files, how many were skipped): with `out`, one file per page in
    that folder, leaving out pages whose file exists when `skip_existing`; without, stdout (None)."""
    if out is None:
        return sources, [None] * len(sources), 0
    targets = output_paths(sources, out, ext)
    if not skip_existing:
        return sources, list(targets), 0
    keep = [i for i, path in enumerate(targets) if not path.exists()]
    return [sources[i] for i in keep], [targets[i] for i in keep], len(sources) - len(keep)


def read_pages(model, sources: Sequence[Source], prompt: str, opts: Options) -> Iterator[TaskEvent]:
    """ocr: read every source in order. Per page: PageStarted, its generation events and its
    Answer; or, for a page that cannot be loaded, prepared or read, a PageFailed (the loop goes on)."""
    backend, config = as_backend(model), opts.generation("ocr")
    for src in sources:
        try:
            img = src.image()
            ready = backend.prepare([user_message(prompt, [img])], opts.system)
            yield PageStarted(src)
            yield from _generate(backend, ready, [img], config)
        except Dsvl2Error as err:
            yield PageFailed(src, err)


def chat_session(model, opts: Options, images: Sequence[Image.Image] = ()) -> ChatSession:
    """A chat with `images` attached to its first question."""
    kind = RemoteChatSession if isinstance(model, RemoteBackend) else ChatSession
    vlm = model.vlm if isinstance(model, LocalBackend) else model
    return kind(vlm, system=opts.system, config=opts.generation("chat"), images=images)


class RemoteChatSession(ChatSession):
    """A ChatSession whose answers come from a server (`vlm` is a RemoteBackend): each turn sends
    the whole conversation; the prompt cache is the server's. Its `last_prepared` is a Prompt."""

    def _prepare(self, messages: Sequence[Message]) -> Prompt:
        return self.vlm.prepare(messages, self.system)

    def _generate(self, prepared: Prompt) -> Iterator[Event]:
        return self.vlm.answer(prepared, self.config)


def check_memory(resolved, opts: Options) -> fit.Fit:
    """The memory check before a model command loads `resolved` (fit.check_load): MemoryFitError
    when the plan does not fit, else the verdict, with `--quantize auto` replaced by its choice."""
    return fit.check_load(resolved.path, resolved.name, runtime.resolve_dtype(opts.dtype),
                          runtime.resolve_device(opts.device), opts.quantize, allow_paging=opts.allow_paging)


def model_info(resolved, dtype: str, device: str, quantize: str | None = None) -> dict:
    """`dsvl2 info`'s facts about a resolved model (hub.ResolvedModel), from its files only: the
    architecture, parameter counts, the weight memory it would take loaded with `quantize`, and
    the memory plan of each method against what this process may use.

    {"model", "path", "source", "dtype", "device", "architecture": {...},
     "parameters": {"total", "active", "vision", "adaptor", "language"},
     "cache_bytes_per_token", "image_tokens_384", "quantization", "weight_memory": {...},
     "memory": {"available": {"bytes", "source"}, "method": str,   # the method these options load
                "plans": {method: {"total", "weights", "cache", "activations", "loading",
                                   "overhead", "fits"}}}}   # bytes; fits: total <= available
    The plans: none, int8, int4 (and the --quantize method) for a float folder, a pre-quantized
    folder's own method only; batch 1, the cache at the full context."""
    facts = model_facts.describe_model(resolved, dtype, device)
    dt, dev = runtime.resolve_dtype(facts["dtype"]), facts["device"]
    folder = quant.read_spec(resolved.path)
    auto = quantize is not None and quantize.lower() == "auto"
    requested = None if auto else quant.choose_spec(quantize, folder, str(resolved.path))
    extra = () if requested is None or requested.method in fit.AUTO_ORDER else (requested.method,)
    plans = fit.plans_for_folder(resolved.path, dt, dev, (*fit.AUTO_ORDER, *extra))
    available = fit.available_memory(dev)
    if auto:  # what the model commands would choose; nothing fitting is not an error here
        quantize, _ = fit.choose_quantization(resolved.name, plans, available, allow_paging=True)
    spec = quant.choose_spec(quantize, folder, str(resolved.path))
    cfg = ModelConfig.from_dir(resolved.path)
    facts["quantization"] = quant.spec_label(spec)
    facts["weight_memory"] = memory.planned_weight_memory(cfg, dt, spec)
    facts["memory"] = {
        "available": {"bytes": available.bytes, "source": available.source},
        "method": spec.method if spec else "none",
        "plans": {m: {"total": p.total, "weights": p.weight_bytes, "cache": p.cache,
                      "activations": max(p.vision, p.prefill), "loading": p.loading, "overhead": p.overhead,
                      "fits": p.total <= available.bytes} for m, p in plans.items()},
    }
    return facts
