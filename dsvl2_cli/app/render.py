"""What the CLI shows: answers on stdout and status on stderr (`UI`), every task's answer through
one renderer (`render_answer`, fed by the events of tasks.py), grounding boxes drawn into an
image file, images shown in a terminal, and the lines of `dsvl2 info`.

Stdout carries only the answer; status, spinners, progress bars, timings and warnings go to
stderr through Rich (colour only on a terminal, never with NO_COLOR).

`HalfBlockImage` is a Rich renderable: each character cell is "▀" with the upper pixel as the
foreground and the lower pixel as the background colour (24-bit), so one cell shows two
square-ish pixels in any true-colour terminal. Boxes are drawn at the terminal's resolution
(one pixel wide lines stay visible however much the picture is scaled) and their labels are
written as text on the cells of the box's top edge. `draw_boxes` draws the same boxes and labels
into a full-size PIL image for `--save`.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from rich.color import Color
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.segment import Segment
from rich.style import Style
from rich.text import Text

from ..engine.generate import Done, Token
from .. import settings
from ..errors import InputError
from .inputs import write_atomic
from .tasks import Answer, GroundAnswer, PageFailed, PageStarted, untiled_note

HALF_BLOCK = "▀"

# Distinct, saturated colours that stand out on photos; one per label, in order.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 59, 48), (52, 199, 89), (0, 122, 255), (255, 204, 0), (175, 82, 222),
    (255, 149, 0), (90, 200, 250), (255, 45, 85), (162, 132, 94), (0, 199, 190),
)


def colour(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


@dataclass(frozen=True)
class DrawBox:
    """A box to draw: pixel corners in the image's own coordinates, a label, a colour."""

    xyxy: tuple[int, int, int, int]
    label: str
    colour: tuple[int, int, int]


def _text_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = rgb
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def draw_boxes(image: Image.Image, boxes: Sequence[DrawBox]) -> Image.Image:
    """A copy of `image` with each box outlined in its colour and its label on a filled tag."""
    out = image.convert("RGB")
    if out is image:
        out = image.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    width = max(2, round(max(w, h) / 300))
    font = _font(max(12, round(max(w, h) / 45)))
    for b in boxes:
        x1, y1, x2, y2 = _clip(b.xyxy, w, h)
        draw.rectangle([x1, y1, x2, y2], outline=b.colour, width=width)
    for b in boxes:  # labels last, so no outline crosses them
        if not b.label:
            continue
        x1, y1, x2, y2 = _clip(b.xyxy, w, h)
        left, top, right, bottom = draw.textbbox((0, 0), b.label, font=font)
        tw, th = right - left, bottom - top
        pad = max(2, th // 4)
        ty = y1 - th - 2 * pad if y1 - th - 2 * pad >= 0 else y1  # above the box, else inside
        tx = min(max(0, x1), max(0, w - tw - 2 * pad))
        draw.rectangle([tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad], fill=b.colour)
        draw.text((tx + pad - left, ty + pad - top), b.label, fill=_text_colour(b.colour), font=font)
    return out


def _clip(xyxy, w: int, h: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = xyxy
    return (min(max(0, x1), w - 1), min(max(0, y1), h - 1), min(max(0, x2), w - 1), min(max(0, y2), h - 1))


def fit_cells(size: tuple[int, int], max_cols: int, max_rows: int) -> tuple[int, int]:
    """(columns, rows) of half-block cells showing an image of `size` as large as fits while
    keeping its aspect (a cell is 1 pixel wide and 2 pixels tall)."""
    w, h = size
    max_cols, max_rows = max(1, max_cols), max(1, max_rows)
    scale = min(max_cols / w, (2 * max_rows) / h)
    cols = max(1, min(max_cols, round(w * scale)))
    rows = max(1, min(max_rows, round(h * scale / 2)))
    return cols, rows


class HalfBlockImage:
    """A PIL image (optionally with boxes) as a Rich renderable, sized to the available width.

    `max_rows` caps the height in text lines (default: the console's height minus a few lines).
    """

    def __init__(self, image: Image.Image, boxes: Sequence[DrawBox] = (), *, max_width: int | None = None,
                 max_rows: int | None = None):
        self.image = image.convert("RGB")
        self.boxes = list(boxes)
        self.max_width = max_width
        self.max_rows = max_rows

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        cols, _ = self._cells(console, options)
        return Measurement(cols, cols)

    def _cells(self, console: Console, options: ConsoleOptions) -> tuple[int, int]:
        max_cols = min(options.max_width, self.max_width or options.max_width)
        max_rows = self.max_rows or max(8, (options.height or console.height) - 4)
        return fit_cells(self.image.size, max_cols, max_rows)

    def pixels(self, cols: int, rows: int) -> Image.Image:
        """The picture at cell resolution (cols x 2*rows pixels) with the boxes drawn in."""
        small = self.image.resize((cols, rows * 2), Image.Resampling.BOX)
        if self.boxes:
            draw = ImageDraw.Draw(small)
            sx, sy = cols / self.image.width, rows * 2 / self.image.height
            for b in self.boxes:
                x1, y1, x2, y2 = b.xyxy
                rect = [int(x1 * sx), int(y1 * sy), min(cols - 1, int(x2 * sx)), min(rows * 2 - 1, int(y2 * sy))]
                draw.rectangle(rect, outline=b.colour, width=1)
        return small

    def labels_at(self, cols: int, rows: int) -> dict[tuple[int, int], tuple[str, Style]]:
        """(row, col) -> (character, style) for label text written over the picture."""
        cells: dict[tuple[int, int], tuple[str, Style]] = {}
        sx, sy = cols / self.image.width, rows * 2 / self.image.height
        for b in self.boxes:
            if not b.label:
                continue
            x1, y1 = b.xyxy[0], b.xyxy[1]
            row = min(rows - 1, max(0, int(y1 * sy) // 2))
            col = min(cols - 1, max(0, int(x1 * sx)))
            text = b.label[: max(1, cols - col)]
            style = Style(color=_rgb(_text_colour(b.colour)), bgcolor=_rgb(b.colour), bold=True)
            for i, ch in enumerate(text):
                cells[(row, col + i)] = (ch, style)
        return cells

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        cols, rows = self._cells(console, options)
        small = self.pixels(cols, rows)
        px = small.load()
        labels = self.labels_at(cols, rows)
        for r in range(rows):
            for c in range(cols):
                if (r, c) in labels:
                    ch, style = labels[(r, c)]
                    yield Segment(ch, style)
                else:
                    yield Segment(HALF_BLOCK, Style(color=_rgb(px[c, 2 * r]), bgcolor=_rgb(px[c, 2 * r + 1])))
            yield Segment.line()


def _rgb(rgb) -> Color:
    return Color.from_rgb(*rgb[:3])


# ------------------------------------------------------------------------------- terminal output

def isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class UI:
    """The answer goes to stdout; everything else to stderr. `UI.current` is the latest one
    (the CLI's Ctrl-C handler uses it to end a half-written line)."""

    current: "UI | None" = None

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        # Pictures and colour on stdout only for a terminal, and never with NO_COLOR.
        self.out_tty = isatty(sys.stdout) and not settings.no_color()
        self.mid_line = False
        self._answer_started = False
        UI.current = self

    # -- stdout
    def write(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.mid_line = not text.endswith("\n")

    def line(self, text: str = "") -> None:
        self.write(text + "\n")

    def end_line(self) -> None:
        if self.mid_line:
            self.write("\n")

    def start_answer(self) -> None:
        self._answer_started = False

    def answer_text(self, text: str) -> None:
        """Streamed answer text, without its leading whitespace (the model starts with a space)."""
        if not self._answer_started:
            text = text.lstrip()
            self._answer_started = bool(text)
        self.write(text)

    # -- stderr
    def status(self, message: str) -> None:
        if not self.quiet:
            self.err.print(Text(message, style="dim"))

    def warn(self, message: str) -> None:
        self.err.print(Text("warning: ", style="bold yellow") + Text(message))

    def error(self, message: str) -> None:
        self.err.print(Text("error: ", style="bold red") + Text(message))

    @property
    def live(self) -> bool:
        """Whether spinners and progress bars show: on a terminal, without -q."""
        return not self.quiet and self.err.is_terminal

    def progress(self, *columns, **kwargs) -> Progress:
        # redirect_stdout=False: Rich would otherwise send our stdout through the stderr console.
        return Progress(*columns, console=self.err, transient=True, disable=not self.live,
                        redirect_stdout=False, redirect_stderr=False, **kwargs)

    @contextlib.contextmanager
    def spinner(self, message: str) -> Iterator[Progress]:
        progress = self.progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        progress.add_task(message, total=None)
        with progress:
            yield progress


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
    with _counting(ui, view) as tick:
        count = 0
        for event in events:
            if isinstance(event, (Answer, PageFailed)):
                result = event
                break
            if isinstance(event, PageStarted) and view.stream:
                ui.write(view.header)
                ui.start_answer()
            elif isinstance(event, Token):
                count += 1
                tick(count)
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


@contextlib.contextmanager
def _counting(ui: UI, view: AnswerView) -> Iterator[Callable[[int], None]]:
    """A callback for each token: the count on the ocr bar, else on a spinner until text shows."""
    if view.bar is not None:
        bar, task = view.bar
        yield lambda n: bar.update(task, tokens=n)
        return
    with ui.spinner(view.waiting) as spin:
        def tick(n: int) -> None:
            if view.stream:
                spin.stop()  # the answer starts: clear the spinner before stdout is written
            else:
                spin.update(spin.task_ids[0], description=f"{view.waiting} · {n} tokens")
        yield tick


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
        console.print(Text("■ ", style=Style(color=_rgb(b.colour))) + Text(line))


def image_format(path) -> str:
    """Pillow's format name for a file name's extension (an InputError for unknown ones)."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise InputError(f"--save {path}: unknown image type {path.suffix or '(no extension)'}; use .png or .jpg")
    return fmt


def encode_image(img: Image.Image, path) -> bytes:
    """The bytes of `img` in the format `path`'s extension names."""
    buf = io.BytesIO()
    img.save(buf, format=image_format(path))
    return buf.getvalue()


def info_lines(facts: dict) -> list[str]:
    """`dsvl2 info` as aligned "key  value" lines (facts as `dsvl2 info --json` gives them)."""
    a, p = facts["architecture"], facts["parameters"]
    att, ex, vis = a["attention"], a["experts"], a["vision"]
    if att["kind"] == "mla":
        attention = (f"multi-head latent (MLA), {att['heads']} heads, kv_lora_rank {att['kv_lora_rank']}, "
                     f"rope {att['qk_rope_head_dim']}, nope {att['qk_nope_head_dim']}, v {att['v_head_dim']}")
    else:
        attention = f"multi-head, {att['heads']} heads x {att['head_dim']}, RoPE"
    experts = "none (dense)"
    if ex:
        router = f"{ex['scoring']} router, {ex['topk_method']}" + (", renormalised" if ex["renormalised"] else "")
        router += f", x{ex['scaling']:g}" if ex["scaling"] != 1.0 else ""
        experts = (f"{ex['routed']} routed + {ex['shared']} shared, {ex['per_token']} routed per token ({router}); "
                   f"{a['layers'] - ex['moe_layers']} dense layer(s)")
    cache = facts["cache_bytes_per_token"]
    rows = [
        ("model", f"{facts['model']} ({facts['source']})"),
        ("path", facts["path"]),
        ("language", f"DeepSeekMoE, {a['layers']} layers, hidden {a['hidden_size']}, vocab {a['vocab_size']}, "
                     f"context {a['context_tokens']} tokens"),
        ("attention", attention),
        ("experts", experts),
        ("vision", f"SigLIP, {vis['layers']} blocks, width {vis['width']}, {vis['heads']} heads, "
                   f"{vis['image_size']}x{vis['image_size']} tiles, patch {vis['patch_size']}, "
                   f"{vis['tokens_per_tile']} tokens per tile"),
        ("parameters", f"{_count(p['total'])} total, {_count(p['active'])} active per token (vision "
                       f"{_count(p['vision'])}, adaptor {_count(p['adaptor'])}, language {_count(p['language'])})"),
        ("kv cache", f"{_bytes(cache)} per token in {facts['dtype']} "
                     f"({cache * a['context_tokens'] / 2**20:.0f} MiB for the whole context)"),
        ("image", f"{facts['image_tokens_384']} tokens for a 384x384 image, up to {a['max_image_tokens']} "
                  "for one tiled image"),
        ("dtype", facts["dtype"]),
        ("device", facts["device"]),
    ]
    if "weight_memory" in facts:
        mem = facts["weight_memory"]
        parts = ", ".join(f"{k.replace('_', ' ')} {_bytes(v)}" for k, v in mem.items() if k != "total" and v)
        rows.append(("quantized", facts["quantization"]))
        rows.append(("weights", f"{_bytes(mem['total'])} in memory: {parts}"))
    return [f"{key:<11} {value}" for key, value in rows]


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} bytes"
