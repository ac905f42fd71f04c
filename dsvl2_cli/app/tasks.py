"""The tasks dsvl2 knows: chat, ocr, ask and ground over a model (a `Backend`: a loaded
engine/runtime.VLModel, or a server's with --server), and info's facts about a model that is not
loaded.

A task accepts a Backend (backends.py) or a VLModel (wrapped in a LocalBackend). On a local model
`ask` and `ocr` plan each prompt to fit the context with its answer (documents.py, budget.py),
and ocr reads pages in batches; on a server the server tiles and batches.

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
                 "grid": [wide, high], "tokens": int,     # every image in the prompt
                 "full_grid": [wide, high]}],             # ask, ocr: the grid at full detail
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
ask adds "pages" (each image's page, prompt order) and, when the pages were chosen by their text,
"page_selection": {"method": "bm25", "ocr_pages", "scores": [{"input", "page", "score"}]};
ocr --format json adds "boxes", "problems" and "raw" as ground does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from PIL import Image

from ..engine.chat import ChatSession
from ..engine.events import Done, Event, GenerationConfig
from ..engine.messages import MAX_TILED_IMAGES, user_message
from ..errors import Dsvl2Error
from . import documents, pages
from .backends import Backend, LocalBackend, Prompt, RemoteBackend, RemoteChatSession, as_backend
from .documents import default_ocr_batch, preflight
from .grounding import Box, caption_prompt, parse_grounding, referring_prompt, to_pixels, to_xywh
from .inputs import Source, image_origin, output_paths
from .results import (
    MAX_TOKENS,
    OCR_PROMPTS,
    TEMPERATURE_ADVICE,
    Answer,
    GroundAnswer,
    Notice,
    Options,
    PageFailed,
    PageStarted,
    PixelBox,
    TaskEvent,
    answer_record,
    answer_with_plan,
    untiled_note,
)

__all__ = [  # the task layer's names, wherever they are defined
    "MAX_TOKENS", "OCR_PROMPTS", "TEMPERATURE_ADVICE", "Answer", "Backend", "GroundAnswer", "LocalBackend",
    "Notice", "Options", "PageFailed", "PageStarted", "PixelBox", "Prompt", "RemoteBackend", "RemoteChatSession",
    "TaskEvent", "answer_record", "as_backend", "ask", "ask_note", "chat_session", "chat_turn",
    "default_ocr_batch", "ground", "ground_prompt", "grounded", "model_info", "ocr_extension", "ocr_targets",
    "ocr_texts", "preflight", "read_pages", "untiled_note", "with_boxes",
]


def _generate(backend: Backend, prompt: Prompt, images: Sequence[Image.Image], config: GenerationConfig,
              keep_special: bool = False, plan=None) -> Iterator[Event | Answer]:
    done = None
    for event in backend.answer(prompt, config, keep_special=keep_special):
        if isinstance(event, Done):
            done = event
        yield event
    yield answer_with_plan(backend, done, prompt.prepared, images, plan)


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


def ask(model, images: Sequence[Image.Image], question: str, opts: Options, *, max_tiles: int | None = None,
        selection: pages.Selection | None = None) -> Iterator[Event | Answer | Notice]:
    """One question about document pages (or any images), all in one prompt; on a local model
    planned so that the prompt and the answer fit the context (a Notice when tiling was lowered).
    The record adds "pages" (each image's page, prompt order) and, when the pages were chosen
    by pages.select_pages, "page_selection"."""
    backend, config = as_backend(model), opts.generation("chat")
    message = user_message(question, list(images))
    plan = None
    if isinstance(backend, LocalBackend):
        plan = yield from documents.plan_prompt(backend.vlm, question, images, opts, config, max_tiles)
        prompt = Prompt((message,), opts.system, plan.prepared)
    else:
        prompt = backend.prepare([message], opts.system)
    if plan is not None:
        config = replace(config, max_tokens=plan.answer_budget)
    for event in _generate(backend, prompt, images, config, plan=plan):
        if isinstance(event, Answer):
            event.record["pages"] = [image_origin(img).page for img in images]
            if selection is not None:
                event.record["page_selection"] = selection.as_json()
        yield event


def ocr_texts(model, sources: Sequence[Source], *, batch: int = 1, cache: pages.PageTextCache | None = None
              ) -> list[str]:
    """The OCR text of `sources` (scanned pages), from the cache where this model read them
    before; the rest read now (plain-text prompt, greedy) and stored."""
    backend = as_backend(model)
    cache = cache or pages.PageTextCache()
    prompt = OCR_PROMPTS["text"]
    vlm = getattr(backend, "vlm", None)
    model_id = f"{backend.name}|{getattr(vlm, 'path', '')}|{getattr(vlm, 'dtype', '')}"
    keys = [cache.key(model_id, prompt, src.image()) for src in sources]
    texts = [cache.get(k) for k in keys]
    missing = [i for i, t in enumerate(texts) if t is None]
    results = [e for e in read_pages(backend, [sources[i] for i in missing], prompt, Options(), batch=batch)
               if isinstance(e, (Answer, PageFailed))]
    for i, result in zip(missing, results):
        texts[i] = result.text if isinstance(result, Answer) else ""
        if isinstance(result, Answer):
            cache.put(keys[i], texts[i])
    return [t or "" for t in texts]


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
    record.update(text=result.text, image_size=[w, h], problems=result.problems, raw=raw, boxes=_box_records(boxes))
    return GroundAnswer(answer.done, record, image=image, boxes=boxes, problems=tuple(result.problems), raw=raw,
                        caption=caption)


def _box_records(boxes: Sequence[PixelBox]) -> list[dict]:
    """The JSON "boxes" of a grounded answer (ground, ocr --format json)."""
    return [{"label": b.label, "box_999": list(b.box_999), "xyxy": list(b.xyxy), "xywh": list(to_xywh(b.xyxy))}
            for b in boxes]


def _in_pixels(box: Box, w: int, h: int) -> PixelBox:
    return PixelBox(box.label, box.box_999, to_pixels(box, w, h), box.ref_index)


def ocr_extension(fmt: str, as_json: bool) -> str:
    """The file extension of ocr's per-page output files for --format `fmt` (or --json)."""
    return "json" if as_json or fmt == "json" else ("md" if fmt == "markdown" else "txt")


def with_boxes(events: Iterator[TaskEvent]) -> Iterator[TaskEvent]:
    """ocr --format json: each page's record gains "boxes" (pixels of the page, as ground's),
    "problems" and "raw" where the model grounded what it read; "text" is then without tags."""
    for event in events:
        if isinstance(event, Answer):
            raw = event.done.text.strip()
            result = parse_grounding(raw)
            w, h = event.record["images"][0]["size"]
            boxes = [_in_pixels(b, w, h) for b in result.boxes]
            event.record.update(text=result.text if boxes else event.record["text"], raw=raw,
                                problems=result.problems, boxes=_box_records(boxes))
        yield event


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


def read_pages(model, sources: Sequence[Source], prompt: str, opts: Options, *, max_tiles: int | None = None,
               batch: int = 1) -> Iterator[TaskEvent]:
    """ocr: read every source in order. Per page: PageStarted, its generation events and its
    Answer; or, for a page that cannot be loaded, prepared or read, a PageFailed (the loop goes on).
    On a local model each page is planned to fit the context with its answer (a Notice when the
    tiling changes from the previous page's), and with `batch` > 1 pages are read `batch` at a
    time through generate_batch: each page's PageStarted and Answer come, in page order, when
    its batch is done (no Token events); greedy answers equal one-by-one reading."""
    backend, config = as_backend(model), opts.generation("ocr")
    if not isinstance(backend, LocalBackend):  # the server plans, tiles and batches itself
        for src in sources:
            try:
                img = src.image()
                ready = backend.prepare([user_message(prompt, [img])], opts.system)
                yield PageStarted(src)
                yield from _generate(backend, ready, [img], config)
            except Dsvl2Error as err:
                yield PageFailed(src, err)
        return
    plan_page = documents.page_planner(backend.vlm, prompt, opts, config, max_tiles)
    if batch > 1:
        yield from documents.read_batched(backend.vlm, sources, plan_page, config, batch)
        return
    for src in sources:
        try:
            img, plan, notice = plan_page(src)
            if notice:
                yield notice
            yield PageStarted(src)
            ready = Prompt((user_message(prompt, [img]),), opts.system, plan.prepared)
            yield from _generate(backend, ready, [img], replace(config, max_tokens=plan.answer_budget), plan=plan)
        except Dsvl2Error as err:
            yield PageFailed(src, err)


def chat_session(model, opts: Options, images: Sequence[Image.Image] = ()) -> ChatSession:
    """A chat with `images` attached to its first question."""
    kind = RemoteChatSession if isinstance(model, RemoteBackend) else ChatSession
    vlm = model.vlm if isinstance(model, LocalBackend) else model
    return kind(vlm, system=opts.system, config=opts.generation("chat"), images=images)


def model_info(resolved, dtype: str, device: str, quantize: str | None = None) -> dict:
    """`dsvl2 info`'s facts about a resolved model (hub.ResolvedModel), from its files only:
    engine/facts.model_info (which documents the keys), imported here: the engine needs torch."""
    from ..engine import facts

    return facts.model_info(resolved, dtype, device, quantize)
