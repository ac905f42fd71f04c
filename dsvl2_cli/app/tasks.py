"""The tasks dsvl2 knows: chat, ocr, ask and ground over a model (a `Backend`: a loaded
engine/runtime.VLModel, or a server's with --server), and info's facts about a model that is not
loaded.

A task accepts a Backend (backends.py) or a VLModel (wrapped in a LocalBackend). On a local model
`ask` and `ocr` plan each prompt to fit the context with its answer (documents.py, budget.py),
and ocr reads pages in batches; on a server the server tiles and batches. Chat is chat.py's
ChatSession (`chat_session`, `chat_turn`; re-exported here).

What each task asks the model and how long its answers may be come from one registry
(defaults.py: OCR_PROMPTS, task_defaults; grounding prompts from grounding.py); what comes back:
every task is a generator of the engine's events (Prefilled, Token, Done) ending with a typed
result (results.py), an `Answer` (`GroundAnswer` for ground). `read_pages` yields the events of
each page in turn, bracketed by `PageStarted` and ending in that page's `Answer` or a
`PageFailed`. Nothing here writes to a terminal: the CLI renders these events
(render.render_answer).

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
On a local model ask and ocr add "answer_budget" (the answer's planned length: a default
--max-tokens may give way to detail). ask adds "pages" (each image's page, prompt order) and,
when the pages were chosen by their text,
"page_selection": {"method": "bm25", "ocr_pages", "scores": [{"input", "page", "score"}]};
ocr --format json adds "boxes", "problems" and "raw" as ground does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from ..engine.events import Done, Event, GenerationConfig
from ..engine.prompt.messages import MAX_TILED_IMAGES, user_message
from ..errors import Dsvl2Error
from . import documents, pages
from .backends import Backend, LocalBackend, Prompt, RemoteBackend, as_backend
from .chat import ChatSession, chat_session, chat_turn
from .defaults import MAX_TOKENS, OCR_PROMPTS, TEMPERATURE_ADVICE, task_defaults
from .documents import default_ocr_batch, preflight
from .grounding import PixelBox, caption_prompt, read_grounded, referring_prompt
from .inputs.sources import Source, image_origin, output_paths
from .options import Options
from .results import (
    Answer,
    GroundAnswer,
    Notice,
    PageFailed,
    PageStarted,
    TaskEvent,
    answer_record,
    answer_with_plan,
    untiled_note,
)

if TYPE_CHECKING:
    from .budget import Plan

__all__ = [  # the task layer's names, wherever they are defined
    "MAX_TOKENS", "OCR_PROMPTS", "TEMPERATURE_ADVICE", "Answer", "Backend", "ChatSession", "GroundAnswer",
    "LocalBackend", "Notice", "Options", "PageFailed", "PageStarted", "PixelBox", "Prompt", "RemoteBackend",
    "TaskEvent", "answer_record", "as_backend", "ask", "ask_note", "chat_session", "chat_turn",
    "default_ocr_batch", "ground", "ground_prompt", "grounded", "model_info", "ocr_extension", "ocr_targets",
    "ocr_texts", "preflight", "read_pages", "task_defaults", "untiled_note", "with_boxes",
]


def _generate(backend: Backend, prompt: Prompt, images: Sequence[Image.Image], config: GenerationConfig,
              keep_special: bool = False, plan: Plan | None = None) -> Iterator[Event | Answer]:
    done = None
    for event in backend.answer(prompt, config, keep_special=keep_special):
        if isinstance(event, Done):
            done = event
        yield event
    yield answer_with_plan(backend, done, prompt.prepared, images, plan)


# -------------------------------------------------------------------------------------- tasks

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
        config = replace(config, max_tokens=plan.answer_budget)
    else:
        prompt = backend.prepare([message], opts.system)
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
    yield grounded(answer, image, caption)


def grounded(answer: Answer, image: Image.Image, caption: bool = False) -> GroundAnswer:
    """An answer read as boxes: parsed, put in pixels, and its record given the grounding keys."""
    # The streamed text keeps the grounding tokens (<|ref|>, <|det|>...) the parser needs, and
    # nothing else of the specials (placeholders, pad) nor control characters; it is also all
    # a remote server gives (no token ids).
    w, h = image.size
    found = read_grounded(answer.done.text, w, h)
    record = dict(answer.record)
    record.update(text=found.text, image_size=[w, h], problems=found.problems, raw=found.raw,
                  boxes=found.box_records())
    return GroundAnswer(answer.done, record, image=image, boxes=found.boxes, problems=tuple(found.problems),
                        raw=found.raw, caption=caption)


def ocr_extension(fmt: str, as_json: bool) -> str:
    """The file extension of ocr's per-page output files for --format `fmt` (or --json)."""
    return "json" if as_json or fmt == "json" else ("md" if fmt == "markdown" else "txt")


def with_boxes(events: Iterator[TaskEvent]) -> Iterator[TaskEvent]:
    """ocr --format json: each page's record gains "boxes" (pixels of the page, as ground's),
    "problems" and "raw" where the model grounded what it read; "text" is then without tags."""
    for event in events:
        if isinstance(event, Answer):
            found = read_grounded(event.done.text, *event.record["images"][0]["size"])
            event.record.update(text=found.text if found.boxes else event.record["text"], raw=found.raw,
                                problems=found.problems, boxes=found.box_records())
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


# ------------------------------------------------------------------------------ the page loop

@dataclass(frozen=True)
class _Page:
    """A page ready to read: its image, its prompt and how it generates (locally its Plan)."""

    source: Source
    image: Image.Image
    prompt: Prompt
    config: GenerationConfig
    plan: Plan | None = None


def read_pages(model, sources: Sequence[Source], prompt: str, opts: Options, *, max_tiles: int | None = None,
               batch: int = 1) -> Iterator[TaskEvent]:
    """ocr: read every source in order. Per page: PageStarted, its generation events and its
    Answer; or, for a page that cannot be loaded, prepared or read, a PageFailed (the loop goes on).
    On a local model each page is planned to fit the context with its answer (a Notice when the
    tiling changes from the previous page's), and with `batch` > 1 pages are read `batch` at a
    time through generate_batch: each page's PageStarted and Answer come, in page order, when
    its batch is done (no Token events); greedy answers equal one-by-one reading. A server plans,
    tiles and batches itself: its pages are read one at a time."""
    backend, config = as_backend(model), opts.generation("ocr")
    prepare = _page_preparer(backend, prompt, opts, config, max_tiles)
    size = max(1, batch) if isinstance(backend, LocalBackend) else 1
    for start in range(0, len(sources), size):
        group: list[_Page | PageFailed] = []
        for src in sources[start:start + size]:
            try:
                page, notice = prepare(src)
            except Dsvl2Error as err:
                group.append(PageFailed(src, err))
                continue
            if notice:
                yield notice
            group.append(page)
        yield from (_read_one(backend, group[0]) if size == 1 else _read_together(backend, group, config))


def _page_preparer(backend: Backend, prompt: str, opts: Options, config: GenerationConfig, max_tiles: int | None
                   ) -> Callable[[Source], tuple[_Page, Notice | None]]:
    """src -> (its _Page, a Notice or None); raises the Dsvl2Error of a page that cannot be
    loaded or prepared. Locally each page is planned (documents.page_planner)."""
    if not isinstance(backend, LocalBackend):
        def prepare(src: Source) -> tuple[_Page, None]:
            img = src.image()
            return _Page(src, img, backend.prepare([user_message(prompt, [img])], opts.system), config), None

        return prepare
    plan_page = documents.page_planner(backend.vlm, prompt, opts, config, max_tiles)

    def prepare_planned(src: Source) -> tuple[_Page, Notice | None]:
        img, plan, notice = plan_page(src)
        ready = Prompt((user_message(prompt, [img]),), opts.system, plan.prepared)
        return _Page(src, img, ready, replace(config, max_tokens=plan.answer_budget), plan), notice

    return prepare_planned


def _read_one(backend: Backend, page: _Page | PageFailed) -> Iterator[TaskEvent]:
    """One page, streamed: PageStarted, its events and Answer (or a PageFailed)."""
    if isinstance(page, PageFailed):
        yield page
        return
    try:
        yield PageStarted(page.source)
        yield from _generate(backend, page.prompt, [page.image], page.config, plan=page.plan)
    except Dsvl2Error as err:
        yield PageFailed(page.source, err)


def _read_together(backend: LocalBackend, group: list[_Page | PageFailed], config: GenerationConfig
                   ) -> Iterator[TaskEvent]:
    """Pages decoded together (generate_batch), then PageStarted and Answer each, in page order."""
    ready = [p for p in group if not isinstance(p, PageFailed)]
    try:
        dones = iter(backend.answer_batch([p.prompt for p in ready], config,
                                          max_tokens=[p.config.max_tokens for p in ready]))
    except Dsvl2Error as err:  # the batch as a whole could not run: every page of it failed
        dones, group = iter(()), [p if isinstance(p, PageFailed) else PageFailed(p.source, err) for p in group]
    for page in group:  # page order, failures in their place
        if isinstance(page, PageFailed):
            yield page
            continue
        yield PageStarted(page.source)
        yield answer_with_plan(backend, next(dones), page.prompt.prepared, [page.image], page.plan)


def model_info(resolved, dtype: str, device: str, quantize: str | None = None) -> dict:
    """`dsvl2 info`'s facts about a resolved model (hub.ResolvedModel), from its files only:
    engine/facts.model_info (which documents the keys), imported here: the engine needs torch."""
    from ..engine.loading import facts

    return facts.model_info(resolved, dtype, device, quantize)
