"""Context budgets: plan a prompt so that it and its answer fit the model's context.

The context (4096 positions) holds the prompt and the answer. A tiled A4 page costs ~2000 image
tokens, so two pages, or one page and OCR's 2048-token answer, do not fit at full detail and
the answer would be cut ("context"). `plan` prepares the prompt once at full tiling, then, while
prompt + answer budget > context, lowers the tiling of the image with the most tokens by one
step (its next candidate layout with fewer tiles, chosen as the reference chooses among those):
the largest image shrinks first, so detail is taken where there is most of it. A prompt that
does not fit even with every image untiled (one tile each) is refused with its numbers.

A default answer budget (no --max-tokens) gives way to detail first, by up to an eighth: one A4
page at 3x3 (2074 tokens) keeps its nine tiles with a 2022-token OCR answer instead of losing
three tiles to keep the last 26 tokens of a 2048 budget. A budget the user set is kept whole.

Planning needs only the processor (tokenizer + processor settings, no weights): `planner_for`
builds one from a model folder, so a hopeless prompt is refused before the model loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..engine.prompt.processor import MAX_TILED_IMAGES, Message, Prepared, Processor, image_token_count, tiling_grid
from ..errors import ContextTooLongError


@dataclass(frozen=True)
class Plan:
    """A prompt prepared to fit: the Prepared, and per image its full and its chosen grid."""

    prepared: Prepared
    full_grids: tuple[tuple[int, int], ...]
    grids: tuple[tuple[int, int], ...]
    answer_budget: int
    context: int

    @property
    def reduced(self) -> bool:
        return self.grids != self.full_grids

    @property
    def prompt_tokens(self) -> int:
        return int(self.prepared.input_ids.numel())

    def note(self, names: Sequence[str]) -> str | None:
        """One warning line naming the images whose tiling was lowered (None when none was)."""
        if not self.reduced:
            return None
        changed = [f"{name} {_grid(full)} -> {_grid(got)}" for name, full, got in zip(names, self.full_grids, self.grids)
                   if full != got]
        return (f"the prompt and a {self.answer_budget}-token answer do not fit the {self.context}-token context at "
                f"full detail, so fewer tiles are used: {', '.join(changed)} ({self.prompt_tokens} prompt tokens); "
                "lower --max-tokens, or ask about fewer pages, for more detail")


@dataclass(frozen=True)
class Planner:
    """What planning needs of a model: its processor and the size of its context."""

    processor: Processor
    context: int

    def plan(self, messages: Sequence[Message], *, system: str | None, answer_budget: int,
             max_tiles: int | None = None, flexible: bool = False) -> Plan:
        return plan(self.processor, messages, system=system, answer_budget=answer_budget, context=self.context,
                    max_tiles=max_tiles, flexible=flexible)


def planner_for(model_dir: str | Path) -> Planner:
    """A Planner from a model folder's tokenizer and processor files, without loading weights."""
    from ..model.config import ModelConfig  # config.json only

    cfg = ModelConfig.from_dir(model_dir)
    return Planner(Processor.from_dir(model_dir), cfg.language.max_position_embeddings)


def loaded_planner(vlm) -> Planner:
    return Planner(vlm.processor, vlm.config.language.max_position_embeddings)


def _grid(g: tuple[int, int]) -> str:
    return f"{g[0]}x{g[1]}"


FLEXIBLE_SHARE = 8  # a default answer budget may shrink by budget // 8 to keep full detail


def plan(processor: Processor, messages: Sequence[Message], *, system: str | None, answer_budget: int,
         context: int, max_tiles: int | None = None, flexible: bool = False) -> Plan:
    """The prompt of `messages` at the most detail that leaves `answer_budget` tokens of the
    `context` for the answer, each image at most `max_tiles` tiles (None: no cap). `flexible`
    (the budget is a default): the answer may get as little as 7/8 of it where that keeps more
    tiles; the Plan's answer_budget is then what is left of the context, at most the default.
    Raises ContextTooLongError when even untiled images leave too little room."""
    prepared = processor.prepare(messages, system=system, max_tiles=max_tiles)
    settings = processor.settings
    side = settings.tokens_per_tile_side
    sizes = [img.size for img in prepared.images]
    full = tuple(img.grid for img in prepared.images)
    text = int(prepared.input_ids.numel()) - sum(prepared.num_image_tokens)
    tiling = len(sizes) <= MAX_TILED_IMAGES
    grids = list(full)

    def total() -> int:
        return text + sum(image_token_count(w, h, side) for w, h in grids)

    least = answer_budget - answer_budget // FLEXIBLE_SHARE if flexible else answer_budget
    while total() + least > context:
        shrinkable = [i for i, (w, h) in enumerate(grids) if w * h > 1]
        if not tiling or not shrinkable:
            _refuse(text, [image_token_count(w, h, side) for w, h in grids], least, context)
        i = max(shrinkable, key=lambda k: (image_token_count(*grids[k], side), -k))  # the largest, then the first
        grids[i] = tiling_grid(sizes[i], settings, True, grids[i][0] * grids[i][1] - 1)
    if grids != list(full):
        prepared = processor.prepare(messages, system=system, max_tiles=[w * h for w, h in grids])
    return Plan(prepared, full, tuple(grids), min(answer_budget, context - total()), context)


def _refuse(text: int, image_tokens: list[int], answer_budget: int, context: int) -> None:
    prompt = text + sum(image_tokens)
    if len(image_tokens) > 4:  # 30 pages: a count, not thirty numbers
        images = f"{len(image_tokens)} images untiled {sum(image_tokens)}, "
    else:
        images = f"images {' + '.join(map(str, image_tokens))} untiled, " if image_tokens else ""
    room = context - prompt
    fewer = "fewer images (--pages)" if image_tokens else "a shorter text"
    advice = f"lower --max-tokens to at most {room}, or use {fewer}" if room > 0 else f"use {fewer}"
    raise ContextTooLongError(
        f"prompt is {prompt} tokens ({images}text {text}) and the answer may take {answer_budget}, but the context "
        f"holds {context} in all; {advice}")
