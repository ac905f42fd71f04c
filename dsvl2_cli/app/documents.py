"""Whole documents on a local model: prompts planned to fit the context with their answer
(app/budget.py; a Notice when the tiling was lowered), ocr's default batch, and the refusal
before loading (`preflight`). The page loop that uses them is tasks.read_pages."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from ..engine.events import GenerationConfig
from ..engine.prompt.messages import user_message
from ..errors import ContextTooLongError
from .inputs.sources import Source, image_origin
from .options import Options
from .results import Notice

if TYPE_CHECKING:  # planning needs the processor (torch): imported where a local model plans
    from . import budget


def image_title(img: Image.Image) -> str:
    """How warnings name an image: its file, and page for a PDF page."""
    origin = image_origin(img)
    name = origin.input or "image"
    return name if origin.page is None else f"{name} page {origin.page}"


def plan_prompt(vlm, text: str, images: Sequence[Image.Image], opts: Options, config: GenerationConfig,
             max_tiles: int | None) -> Iterator[Notice]:
    """Plan the prompt (a generator so that the Notice goes out with the events); returns the Plan."""
    from . import budget

    plan = budget.loaded_planner(vlm).plan([user_message(text, list(images))], system=opts.system,
                                           answer_budget=config.max_tokens, max_tiles=max_tiles,
                                           flexible=opts.max_tokens is None)
    note = plan.note([image_title(img) for img in images])
    if note:
        yield Notice(note)
    return plan


def page_planner(vlm, prompt: str, opts: Options, config: GenerationConfig, max_tiles: int | None):
    """src -> (its image, its Plan, a Notice or None). A PDF page's note says "each page" and
    is given only when it differs from the last one, so a document of like pages warns once."""
    from . import budget

    planner, last = budget.loaded_planner(vlm), [None]

    def plan_page(src: Source) -> tuple[Image.Image, budget.Plan, Notice | None]:
        img = src.image()
        plan = planner.plan([user_message(prompt, [img])], system=opts.system, answer_budget=config.max_tokens,
                            max_tiles=max_tiles, flexible=opts.max_tokens is None)
        note = plan.note(["each page" if src.page else src.title])
        fresh = note is not None and note != last[0]
        last[0] = note or last[0]
        return img, plan, Notice(note) if fresh else None

    return plan_page


OCR_BATCH_CPU, OCR_BATCH_GPU = 4, 8  # decoding reads the weights once per step for every row


def default_ocr_batch(vlm, pages: int) -> int:
    """ocr's --batch when not given: 4 pages at a time on CPU, 8 on a GPU (decoding is bound by
    memory bandwidth, so rows decoded together share each step's weight reads), no more than
    the pages, and 1 when memory is short: each row needs a cache for the whole context, and
    twice that is kept free for the batch's prefill activations."""
    from ..engine.loading import fit  # memory figures: only ocr needs them

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
    from . import budget

    if isinstance(images, int):
        images = [Image.new("RGB", (1, 1)) for _ in range(images)]
    try:
        return budget.planner_for(model_dir).plan([user_message(text, list(images))], system=opts.system,
                                                  answer_budget=opts.generation(task).max_tokens, max_tiles=max_tiles,
                                                  flexible=opts.max_tokens is None)
    except ContextTooLongError as err:
        if name is None:
            raise
        raise ContextTooLongError(f"{name}: {err}") from None  # what it was refused for
