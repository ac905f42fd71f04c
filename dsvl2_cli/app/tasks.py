"""The tasks dsvl2 knows: chat, ocr, ask and ground over a loaded model (engine/runtime.VLModel),
and info's facts about a model that is not loaded.

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
ground: the same keys, plus
     "boxes": [{"label": str, "box_999": [x1, y1, x2, y2],   # 0..999 of the image's width/height
                "xyxy": [x1, y1, x2, y2], "xywh": [x, y, w, h]}],   # pixels (v / 999 * size)
     "image_size": [w, h],
     "problems": [str, ...],        # what in the answer could not be read as boxes
     "raw": str                     # the answer with its special tokens (<|ref|>, <|det|>, ...)
   where "text" is the answer without tags and box lists.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..engine import facts as model_facts
from ..engine import memory, quant, runtime
from ..engine.chat import ChatSession
from ..engine.generate import Done, Event, GenerationConfig, generate_batch, stream_generate
from ..engine.processor import MAX_TILED_IMAGES, Prepared, user_message
from ..engine.sampling import SamplingParams
from ..errors import ContextTooLongError, Dsvl2Error
from ..model.config import ModelConfig
from . import budget, pages
from .grounding import Box, caption_prompt, parse_grounding, referring_prompt, to_pixels, to_xywh
from .inputs import Source, image_origin, output_paths

TEMPERATURE_ADVICE = 0.7  # the model card: higher temperatures degrade quality
OCR_PROMPTS = {
    "text": "Read all the text in this image and write it out exactly as it appears, in reading order, "
            "keeping the line breaks. Output only the text.",
    "markdown": "Convert this page to Markdown: keep its headings, lists, tables and emphasis, and write out "
                "all of its text in reading order. Output only the Markdown.",
    # <|grounding|> asks the model to tie what it names to boxes (as in grounded captions);
    # --format json keeps them per page where it does.
    "json": "<|grounding|>Read all the text in this image and write it out exactly as it appears, in reading "
            "order, keeping the line breaks.",
}
MAX_TOKENS = {"chat": 1024, "ocr": 2048, "ground": 1024}


@dataclass
class Options:
    """The options every model command shares: which model, how to sample, how to answer."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "bfloat16"
    quantize: str | None = None
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    system: str | None = None
    stream: bool = True
    json: bool = False
    quiet: bool = False

    def generation(self, task: str) -> GenerationConfig:
        sampling = SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        return GenerationConfig(max_tokens=self.max_tokens or MAX_TOKENS[task], sampling=sampling)

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


@dataclass(frozen=True)
class Notice:
    """Something the user should know before the answer (a lowered tiling): one warning line."""

    message: str


TaskEvent = Event | Answer | PageStarted | PageFailed | Notice


def answer_record(vlm, done: Done, prepared: Prepared, images: Sequence[Image.Image]) -> dict:
    """The JSON object of one answer (schema above)."""
    st = done.stats
    entries = [image_origin(img).as_json() for img in images]
    for entry, prepared_image in zip(entries, prepared.images):
        entry["grid"] = list(prepared_image.grid)  # local tiles (wide, high); [1, 1] when untiled
        entry["tokens"] = prepared_image.num_tokens
    inputs = {e["input"] for e in entries}
    return {
        "model": vlm.name,
        "input": entries[0]["input"] if len(inputs) == 1 else None,
        "page": entries[0]["page"] if len(entries) == 1 else None,
        "images": entries,
        "text": done.text.strip(),
        "finish_reason": done.finish_reason,
        "usage": {"prompt_tokens": st.prompt_tokens, "cached_tokens": st.reused_tokens,
                  "image_tokens": list(prepared.num_image_tokens), "generated_tokens": st.generated_tokens},
        "timings": {"time_to_first_token_s": round(st.time_to_first_token, 4),
                    "prefill_tokens_per_s": round(st.prefill_tokens_per_second, 2),
                    "decode_tokens_per_s": round(st.decode_tokens_per_second, 2)},
        "token_ids": list(done.token_ids),
    }


def _generate(vlm, prepared: Prepared, images: Sequence[Image.Image], config: GenerationConfig,
              plan: budget.Plan | None = None) -> Iterator[Event | Answer]:
    done = None
    for event in stream_generate(vlm, prepared, config):
        if isinstance(event, Done):
            done = event
        yield event
    yield _answer(vlm, done, prepared, images, plan)


def _answer(vlm, done: Done, prepared: Prepared, images: Sequence[Image.Image], plan: budget.Plan | None) -> Answer:
    record = answer_record(vlm, done, prepared, images)
    if plan is not None:
        for entry, full in zip(record["images"], plan.full_grids):
            entry["full_grid"] = list(full)  # what full detail would have used; "grid" is what was used
    return Answer(done, record)


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
    yield Answer(done, answer_record(session.vlm, done, session.last_prepared, session.images))


def ask_note(pages: int) -> str | None:
    """ask: why so many pages lose detail, and what to do (None when they are all tiled)."""
    if pages <= MAX_TILED_IMAGES:
        return None
    return untiled_note(pages, "pages", "ask about 1 or 2 pages at a time (e.g. --pages 3 or --pages 3-4) for detail")


def ask(vlm, images: Sequence[Image.Image], question: str, opts: Options, *, max_tiles: int | None = None,
        selection: pages.Selection | None = None) -> Iterator[Event | Answer | Notice]:
    """One question about document pages (or any images), all in one prompt, planned so that
    the prompt and the answer fit the context (budget.plan; a Notice when tiling was lowered).
    The record adds "pages" (each image's page, prompt order) and, when the pages were chosen
    by pages.select_pages, "page_selection"."""
    config = opts.generation("chat")
    plan = yield from _planned(vlm, question, images, opts, config, max_tiles)
    for event in _generate(vlm, plan.prepared, images, config, plan):
        if isinstance(event, Answer):
            event.record["pages"] = [image_origin(img).page for img in images]
            if selection is not None:
                event.record["page_selection"] = selection.as_json()
        yield event


# ---------------------------------------------------------------------------- page selection

def ocr_texts(vlm, sources: Sequence[Source], *, batch: int = 1, cache: pages.PageTextCache | None = None
              ) -> list[str]:
    """The OCR text of `sources` (scanned pages), from the cache where this model read them
    before; the rest read now (plain-text prompt, greedy) and stored."""
    cache = cache or pages.PageTextCache()
    prompt = OCR_PROMPTS["text"]
    model_id = f"{vlm.name}|{getattr(vlm, 'path', '')}|{getattr(vlm, 'dtype', '')}"
    keys = [cache.key(model_id, prompt, src.image()) for src in sources]
    texts = [cache.get(k) for k in keys]
    missing = [i for i, t in enumerate(texts) if t is None]
    results = {}
    for event in read_pages(vlm, [sources[i] for i in missing], prompt, Options(), batch=batch):
        if isinstance(event, (Answer, PageFailed)):
            results[len(results)] = event
    for slot, i in enumerate(missing):
        result = results.get(slot)
        texts[i] = result.text if isinstance(result, Answer) else ""
        if isinstance(result, Answer):
            cache.put(keys[i], texts[i])
    return [t or "" for t in texts]


def image_title(img: Image.Image) -> str:
    """How warnings name an image: its file, and page for a PDF page."""
    origin = image_origin(img)
    name = origin.input or "image"
    return name if origin.page is None else f"{name} page {origin.page}"


def _planned(vlm, text: str, images: Sequence[Image.Image], opts: Options, config: GenerationConfig,
             max_tiles: int | None) -> Iterator[Notice]:
    """Plan the prompt (a generator so that the Notice goes out with the events); returns the Plan."""
    plan = budget.loaded_planner(vlm).plan([user_message(text, list(images))], system=opts.system,
                                           answer_budget=config.max_tokens, max_tiles=max_tiles)
    note = plan.note([image_title(img) for img in images])
    if note:
        yield Notice(note)
    return plan


def ground_prompt(what: str | None, caption: bool) -> str:
    """What to find (a referring expression), or with `caption` a grounded caption of the image."""
    return caption_prompt(what) if caption else referring_prompt(what)


def ground(vlm, image: Image.Image, prompt: str, opts: Options, caption: bool = False
           ) -> Iterator[Event | GroundAnswer]:
    """The boxes of what `prompt` (ground_prompt) asks for, ending with a GroundAnswer."""
    prepared = vlm.prepare([user_message(prompt, [image])], system=opts.system)
    answer = None
    for event in _generate(vlm, prepared, [image], opts.generation("ground")):
        if isinstance(event, Answer):
            answer = event
        else:
            yield event
    yield grounded(vlm, answer, image, caption)


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
    return "json" if as_json or fmt == "json" else ("md" if fmt == "markdown" else "txt")


def with_boxes(events: Iterator[TaskEvent]) -> Iterator[TaskEvent]:
    """ocr --format json: each page's record gains "boxes" (pixels of the page, as ground's),
    "problems" and "raw" where the model grounded what it read; "text" is then without tags."""
    for event in events:
        if isinstance(event, Answer):
            raw = event.done.text.strip()
            result = parse_grounding(raw)
            w, h = event.record["images"][0]["size"]
            event.record.update(text=result.text if result.boxes else event.record["text"], raw=raw,
                                problems=result.problems, boxes=[
                                    {"label": b.label, "box_999": list(b.box_999), "xyxy": list(px),
                                     "xywh": list(to_xywh(px))}
                                    for b in result.boxes for px in [to_pixels(b, w, h)]])
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


def read_pages(vlm, sources: Sequence[Source], prompt: str, opts: Options, *, max_tiles: int | None = None,
               batch: int = 1) -> Iterator[TaskEvent]:
    """ocr: read every source in order. Per page: PageStarted, its generation events and its
    Answer; or, for a page that cannot be loaded, prepared or read, a PageFailed (the loop goes on).
    Each page is planned to fit the context with its answer (a Notice when the tiling changes
    from the previous page's). With `batch` > 1, pages are read `batch` at a time through
    generate_batch: each page's PageStarted and Answer come, in page order, when its batch is
    done (no Token events); greedy answers equal one-by-one reading."""
    config = opts.generation("ocr")
    plan_page = _page_planner(vlm, prompt, opts, config, max_tiles)
    if batch > 1:
        yield from _read_batched(vlm, sources, plan_page, config, batch)
        return
    for src in sources:
        try:
            img, plan, notice = plan_page(src)
            if notice:
                yield notice
            yield PageStarted(src)
            yield from _generate(vlm, plan.prepared, [img], config, plan)
        except Dsvl2Error as err:
            yield PageFailed(src, err)


def _page_planner(vlm, prompt: str, opts: Options, config: GenerationConfig, max_tiles: int | None):
    """src -> (its image, its Plan, a Notice or None). A PDF page's note says "each page" and
    is given only when it differs from the last one, so a document of like pages warns once."""
    planner, last = budget.loaded_planner(vlm), [None]

    def plan_page(src: Source) -> tuple[Image.Image, budget.Plan, Notice | None]:
        img = src.image()
        plan = planner.plan([user_message(prompt, [img])], system=opts.system, answer_budget=config.max_tokens,
                            max_tiles=max_tiles)
        note = plan.note(["each page" if src.page else src.title])
        fresh = note is not None and note != last[0]
        last[0] = note or last[0]
        return img, plan, Notice(note) if fresh else None

    return plan_page


def _read_batched(vlm, sources: Sequence[Source], plan_page, config: GenerationConfig, batch: int
                  ) -> Iterator[TaskEvent]:
    for start in range(0, len(sources), batch):
        ready: list[tuple[Source, Image.Image, budget.Plan] | PageFailed] = []
        for src in sources[start:start + batch]:
            try:
                img, plan, notice = plan_page(src)
                if notice:
                    yield notice
                ready.append((src, img, plan))
            except Dsvl2Error as err:
                ready.append(PageFailed(src, err))
        runs = [r for r in ready if not isinstance(r, PageFailed)]
        try:
            dones = iter(generate_batch(vlm, [plan.prepared for _, _, plan in runs], config))
        except Dsvl2Error as err:  # the batch as a whole could not run: every page of it failed
            dones, ready = iter(()), [r if isinstance(r, PageFailed) else PageFailed(r[0], err) for r in ready]
        for item in ready:  # page order, failures in their place
            if isinstance(item, PageFailed):
                yield item
                continue
            src, img, plan = item
            yield PageStarted(src)
            yield _answer(vlm, next(dones), plan.prepared, [img], plan)


OCR_BATCH_CPU, OCR_BATCH_GPU = 4, 8  # decoding reads the weights once per step for every row


def default_ocr_batch(vlm, pages: int) -> int:
    """ocr's --batch when not given: 4 pages at a time on CPU, 8 on a GPU (decoding is bound by
    memory bandwidth, so rows decoded together share each step's weight reads), no more than
    the pages, and 1 when memory is short: each row needs a cache for the whole context, and
    twice that is kept free for the batch's prefill activations."""
    from ..engine import fit  # memory figures: only ocr needs them

    lm = vlm.config.language
    row = 2 * lm.cache_values_per_token() * lm.num_hidden_layers * vlm.dtype.itemsize * lm.max_position_embeddings
    free = fit.available_memory(vlm.device).bytes
    want = OCR_BATCH_GPU if vlm.device.type == "cuda" else OCR_BATCH_CPU
    return max(1, min(want, pages, free // max(row, 1)))


def preflight(model_dir: Path, text: str, images: Sequence[Image.Image] | int, opts: Options, task: str,
              max_tiles: int | None = None, name: str | None = None) -> budget.Plan:
    """Plan a prompt from the model folder's processor files alone, before any weights load, so
    that a prompt that cannot fit even untiled is refused first (ContextTooLongError). `images`
    may be a count: untiled 1x1 stand-ins, the smallest an image can be (ocr, before its pages
    render). `name` (the first input) prefixes a refusal."""
    if isinstance(images, int):
        images = [Image.new("RGB", (1, 1)) for _ in range(images)]
    try:
        return budget.planner_for(model_dir).plan([user_message(text, list(images))], system=opts.system,
                                                  answer_budget=opts.generation(task).max_tokens, max_tiles=max_tiles)
    except ContextTooLongError as err:
        if name is None:
            raise
        raise ContextTooLongError(f"{name}: {err}") from None  # what it was refused for


def chat_session(vlm, opts: Options, images: Sequence[Image.Image] = ()) -> ChatSession:
    """A chat with `images` attached to its first question."""
    return ChatSession(vlm, system=opts.system, config=opts.generation("chat"), images=images)


def model_info(resolved, dtype: str, device: str, quantize: str | None = None) -> dict:
    """`dsvl2 info`'s facts about a resolved model (hub.ResolvedModel), from its files only: the
    architecture, parameter counts, and the weight memory it would take loaded with `quantize`.

    {"model", "path", "source", "dtype", "device", "architecture": {...},
     "parameters": {"total", "active", "vision", "adaptor", "language"},
     "cache_bytes_per_token", "image_tokens_384", "quantization", "weight_memory": {...}}"""
    facts = model_facts.describe_model(resolved, dtype, device)
    spec = quant.choose_spec(quantize, quant.read_spec(resolved.path), str(resolved.path))
    cfg = ModelConfig.from_dir(resolved.path)
    facts["quantization"] = quant.spec_label(spec)
    facts["weight_memory"] = memory.planned_weight_memory(cfg, runtime.resolve_dtype(facts["dtype"]), spec)
    return facts
