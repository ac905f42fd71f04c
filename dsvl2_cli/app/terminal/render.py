"""Every task's answer as the CLI shows it: one renderer (`render_answer`, fed by the events of
tasks.py; `render_pages` for ocr's page loop), grounding results, timings and warnings.

The answer (text, JSON record, picture with boxes) goes to stdout or a file; progress, timings
and warnings to stderr (ui.UI).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.style import Style
from rich.text import Text

from ...engine.events import Done, Prefilling, Token
from ..inputs.sources import Source, isatty, write_atomic
from .pictures import DrawBox, HalfBlockImage, colour, draw_boxes, encode_image, rgb
from ..results import Answer, GroundAnswer, Notice, PageFailed, PageStarted, TaskEvent, untiled_note
from .summaries import cache_lines, info_lines, loaded_status, removed_lines  # noqa: F401 (the CLI's imports)
from .ui import UI


@dataclass
class AnswerView:
    """How `render_answer` shows one answer; the defaults are a chat answer's."""

    stream: bool = True           # the text on stdout as it comes (never with json or a target file)
    json: bool = False            # the JSON record instead of the text
    waiting: str = "reading the prompt"   # the spinner's words until the text starts
    header: str = ""              # written before the text (ocr of several pages: "==> name <==")
    title: str = ""               # prefixes the timing and warning lines
    page: str = ""                # names what was read in "PAGE -> FILE"
    target: Path | None = None    # write the answer to this file instead of stdout
    save: Path | None = None      # ground: save the image with its boxes drawn
    bar: tuple[Progress, TaskID] | None = None  # ocr: count tokens on this bar instead of a spinner
    pause_bar: bool = False       # take the bar off the terminal while a whole answer is written
    mute_timings: bool = False    # warnings only: a bar is showing the progress

    def __post_init__(self):
        if self.json or self.target is not None:
            self.stream = False


def render_answer(events: Iterable, ui: UI, view: AnswerView) -> Answer | PageFailed:
    """Show one answer of a task (tasks.py) and return its result: the answer's text streams to
    stdout as it comes, or the whole answer (text, JSON record, picture with boxes) goes to
    stdout or a file at the end; then its timings and warnings go to stderr.

    Reads `events` up to this answer's end (its Answer, or a page's PageFailed), so a page loop
    (tasks.read_pages) is shown by calling this once per page on the same iterator.
    """
    result = None
    ui.start_answer()
    with _counting(ui, view) as meter:
        count = 0
        for event in events:
            if isinstance(event, (Answer, PageFailed)):
                result = event
                break
            if isinstance(event, Prefilling):
                meter.prefill(event)
            elif isinstance(event, Notice):
                ui.warn(event.message)
            elif isinstance(event, PageStarted) and view.stream:
                ui.write(view.header)
                ui.start_answer()
            elif isinstance(event, Token):
                count += 1
                meter.token(count)
                if view.stream:
                    ui.answer_text(event.text)
    if isinstance(result, PageFailed):
        ui.end_line()
        ui.error(result.message)
        return result
    if isinstance(result, GroundAnswer):
        _ground_notes(result, ui, view.save)
    _show(result, ui, view)
    report(result.done, _Muted(ui) if view.mute_timings else ui, view.title)
    return result


def render_pages(events: Iterable[TaskEvent], sources: Sequence[Source], targets: Sequence[Path | None], ui: UI, *,
                 stream: bool = True, as_json: bool = False) -> int:
    """The events of tasks.read_pages over `sources`, shown page by page under a progress bar:
    each page's answer to stdout (after a header when there are several) or to its target file.
    Returns how many pages failed."""
    events = iter(events)
    many = len(sources) > 1
    bar = ui.progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[tokens]} tokens"), TimeElapsedColumn())
    bar_shown = many and ui.live
    # Streaming into the terminal the bar is drawn on would tear it: then pages appear whole.
    bar_on_stdout = bar_shown and isatty(sys.stdout)
    failed, tokens, t0 = 0, 0, time.perf_counter()
    task = bar.add_task("", total=len(sources), tokens=0)
    with bar:
        for i, (src, target) in enumerate(zip(sources, targets)):
            bar.update(task, description=src.title, tokens=0)
            header = f"{'' if i == 0 else chr(10)}==> {src.title} <==\n" if many and target is None else ""
            view = AnswerView(stream=stream and not bar_on_stdout, json=as_json, header=header,
                              title=src.title if many else "", page=src.title, target=target, bar=(bar, task),
                              pause_bar=bar_on_stdout, mute_timings=bar_shown)
            result = render_answer(events, ui, view)
            if isinstance(result, PageFailed):
                failed += 1
            else:
                tokens += result.done.stats.generated_tokens
            bar.advance(task)
    if many:
        ui.status(f"{len(sources) - failed} of {len(sources)} pages read · {tokens} tokens · "
                  f"{time.perf_counter() - t0:.1f} s")
    return failed


def prefill_text(event: Prefilling, elapsed: float) -> str:
    """e.g. "image tiles 4/10 · 6 s left", "prompt 512/1037 · 2 s left": the ETA from this
    stage's pace so far (none before its first step is done)."""
    what = "image tiles" if event.stage == "vision" else "prompt"
    text = f"{what} {event.done}/{event.total}"
    if 0 < event.done < event.total and elapsed > 0:
        text += f" · {elapsed / event.done * (event.total - event.done):.0f} s left"
    return text


class _Meter:
    """What `render_answer` shows while waiting: prefill progress (tiles, then prompt
    positions) and then the token count, on the ocr bar or on a spinner until the text shows."""

    def __init__(self, ui: UI, view: AnswerView, spin: Progress | None):
        self.view, self.spin = view, spin
        self.stage, self.t_stage = "", 0.0
        if view.bar is not None:
            bar, task = view.bar
            self.base = next(t.description for t in bar.tasks if t.id == task)

    def _describe(self, text: str) -> None:
        if self.view.bar is not None:
            bar, task = self.view.bar
            bar.update(task, description=f"{self.base} · {text}" if text else self.base)
        elif self.spin is not None:
            self.spin.update(self.spin.task_ids[0], description=f"{self.view.waiting} · {text}" if text
                             else self.view.waiting)

    def prefill(self, event: Prefilling) -> None:
        if event.stage != self.stage:
            self.stage, self.t_stage = event.stage, time.perf_counter()
        self._describe(prefill_text(event, time.perf_counter() - self.t_stage))

    def token(self, n: int) -> None:
        if self.view.bar is not None:
            bar, task = self.view.bar
            if self.stage:
                self.stage = ""
                self._describe("")
            bar.update(task, tokens=n)
        elif self.view.stream:
            self.spin.stop()  # the answer starts: clear the spinner before stdout is written
        else:
            self._describe(f"{n} tokens")


@contextlib.contextmanager
def _counting(ui: UI, view: AnswerView) -> Iterator[_Meter]:
    if view.bar is not None:
        yield _Meter(ui, view, None)
        return
    with ui.spinner(view.waiting) as spin:
        yield _Meter(ui, view, spin)


def _ground_notes(answer: GroundAnswer, ui: UI, save: Path | None) -> None:
    if save is not None:
        write_atomic(save, encode_image(draw_boxes(answer.image, _drawn(answer)), save))
        ui.status(f"saved {save}")
    for problem in answer.problems:
        ui.warn(f"grounding: {problem}")
    if not answer.boxes:
        ui.warn("no boxes found in the answer")


def _drawn(answer: GroundAnswer) -> list[DrawBox]:
    return [DrawBox(b.xyxy, b.label, colour(b.ref_index)) for b in answer.boxes]


def _show(answer: Answer, ui: UI, view: AnswerView) -> None:
    if view.target is not None:
        body = json.dumps(answer.record, ensure_ascii=False) if view.json else answer.text
        write_atomic(view.target, (body + "\n").encode("utf-8"))
        ui.status(f"{view.page} -> {view.target}")
        return
    if view.stream:
        ui.end_line()
        return
    with _paused(view.bar, view.pause_bar):
        if view.json:
            print_json(answer.record, ui)
        elif isinstance(answer, GroundAnswer):
            text = answer.text if (answer.caption or not answer.boxes) else ""
            show_boxes(ui, answer.image, _drawn(answer), text)
        else:
            ui.line(view.header + answer.text)


class _Muted:
    """A UI stand-in for `report` under a progress bar: warnings pass, timing lines do not."""

    def __init__(self, ui: UI):
        self.warn, self.status = ui.warn, lambda message: None


@contextlib.contextmanager
def _paused(bar: tuple[Progress, TaskID] | None, active: bool):
    """Take the progress bar off the terminal while an answer is written to stdout."""
    active = active and bar is not None
    if active:
        bar[0].stop()
    try:
        yield
    finally:
        if active:
            bar[0].start()


def warn_untiled(ui: UI, n: int, what: str = "images", advice: str = "") -> None:
    ui.warn(untiled_note(n, what, advice))


def print_json(record: dict, ui: UI) -> None:
    ui.line(json.dumps(record, ensure_ascii=False))


def timings(done: Done) -> str:
    """e.g. "1033 prompt tokens (1023 image) · 20 tokens · 0.84 s to first token · 35.2 tok/s"."""
    st = done.stats
    cached = f", {st.reused_tokens} cached" if st.reused_tokens else ""
    return (f"{st.prompt_tokens} prompt tokens ({st.image_tokens} image{cached}) · {st.generated_tokens} tokens · "
            f"{st.time_to_first_token:.2f} s to first token · {st.decode_tokens_per_second:.1f} tok/s")


def report(done: Done, ui: UI, title: str = "") -> None:
    """Timings on stderr (unless -q), and a warning when the answer was cut short."""
    where = f"{title}: " if title else ""
    if done.finish_reason == "length":
        ui.warn(f"{where}the answer reached --max-tokens ({done.stats.generated_tokens}) and was cut; "
                "raise --max-tokens")
    elif done.finish_reason == "context":
        ui.warn(f"{where}the context window is full, the answer was cut; use fewer or smaller images")
    ui.status(where + timings(done))


def show_boxes(ui: UI, img: Image.Image, drawn: Sequence[DrawBox], text: str) -> None:
    """A grounding result on stdout: on a terminal the picture with its boxes, then the text and
    one line per box `label: [x1, y1, x2, y2]` (pixels); plain lines otherwise."""
    lines = [(b, f"{b.label or 'box'}: [{', '.join(map(str, b.xyxy))}]") for b in drawn]
    if not ui.out_tty:
        for line in ([text] if text else []) + [line for _, line in lines]:
            ui.line(line)
        return
    console = Console(file=sys.stdout, highlight=False)
    if drawn:
        console.print(HalfBlockImage(img, drawn))
    if text:
        console.print(Text(text))
    for b, line in lines:
        console.print(Text("■ ", style=Style(color=rgb(b.colour))) + Text(line))
