"""What the tasks yield: the typed results (Answer, GroundAnswer, PageStarted, PageFailed, Notice)
and the JSON record of an answer (its schema: tasks.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from ..engine.events import Done, Event
from ..engine.prompt.messages import MAX_TILED_IMAGES
from ..errors import Dsvl2Error
from .grounding import PixelBox
from .inputs.sources import Source, image_origin

if TYPE_CHECKING:  # types only: a command answered by a server never imports torch
    from ..engine.prompt.processor import Prepared


@dataclass(frozen=True)
class Answer:
    """One finished answer: the engine's Done event and the JSON record built from it."""

    done: Done
    record: dict

    @property
    def text(self) -> str:
        return self.record["text"]


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


def untiled_note(n: int, what: str = "images", advice: str = "") -> str:
    """Why detail is lost with more than MAX_TILED_IMAGES images in one prompt."""
    return (f"{n} {what}: with more than {MAX_TILED_IMAGES} images the model sees each at 384x384 without "
            f"tiling, so small text and detail are lost; {advice or f'use at most {MAX_TILED_IMAGES} for detail'}")


def answer_record(model, done: Done, prepared: Prepared | None, images: Sequence[Image.Image]) -> dict:
    """The JSON object of one answer by `model` (a Backend: its name; schema in tasks.py);
    `prepared` None: a server's answer, whose image layout is unknown here."""
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
        "model": model.name,
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


def answer_with_plan(model, done: Done, prepared: Prepared | None, images: Sequence[Image.Image], plan=None) -> Answer:
    """The Answer of `done`; with a budget Plan, each image's record also says the grid full
    detail would have used ("full_grid"; "grid" is what was used), and the record the answer's
    planned budget ("answer_budget": a default --max-tokens may give way to detail)."""
    record = answer_record(model, done, prepared, images)
    if plan is not None:
        record["answer_budget"] = plan.answer_budget
        for entry, full in zip(record["images"], plan.full_grids):
            entry["full_grid"] = list(full)
    return Answer(done, record)
