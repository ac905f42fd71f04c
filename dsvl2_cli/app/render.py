"""What the CLI shows: answers on stdout and status on stderr (`UI`), every task's answer through
one renderer (`render_answer`, fed by the events of tasks.py; `render_pages` for ocr's page
loop), grounding results, and the lines of `dsvl2 info`.

Stdout carries only the answer; status, spinners, progress bars, timings and warnings go to
stderr through Rich (colour only on a terminal, never with NO_COLOR).
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
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn,
                           TimeElapsedColumn)
from rich.style import Style
from rich.text import Text

from ..engine.events import Done, Prefilling, Token
from .. import settings
from .inputs import Source, isatty, write_atomic
from .pictures import DrawBox, HalfBlockImage, colour, draw_boxes, encode_image, rgb
from .tasks import Answer, GroundAnswer, Notice, PageFailed, PageStarted, TaskEvent, untiled_note


# ------------------------------------------------------------------------------- terminal output

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


_NOUNS = {"prompts": "saved prompt(s)", "pages": "page text(s)", "mapped": "mapped layout(s)"}


def cache_lines(record: dict) -> list[str]:
    """`dsvl2 cache` (record: caches.listing): the saved prompts, most recently used first, and
    their total; the page texts' total; the mapped layouts, each with the model folder, dtype and
    quantization it was built from, and their total."""
    lines = [f"{e['last_used'].replace('T', ' ')}  {_bytes(e['bytes']):>10}  {e['name']}"
             for e in reversed(record["entries"])]
    lines.append(f"{len(record['entries'])} {_NOUNS['prompts']}, {_bytes(record['total_bytes'])} of "
                 f"{_bytes(record['cap_bytes'])} in {record['folder']}")
    pages = record["pages"]
    lines.append(f"{len(pages['entries'])} {_NOUNS['pages']}, {_bytes(pages['total_bytes'])} in {pages['folder']}")
    mapped = record["mapped"]
    for e in reversed(mapped["entries"]):
        built = (e["dtype"] or "?") + (f" {e['quant']}" if e["quant"] else "")
        state = "" if e["state"] == "ready" else f"  ({e['state']})"
        lines.append(f"{e['last_used'].replace('T', ' ')}  {_bytes(e['bytes']):>10}  {built}  "
                     f"{e['source'] or e['name']}{state}")
    stale = sum(1 for e in mapped["entries"] if e["stale"])
    note = f"; {stale} stale ({_bytes(mapped['stale_bytes'])}): `dsvl2 cache prune` removes them" if stale else ""
    lines.append(f"{len(mapped['entries'])} {_NOUNS['mapped']}, {_bytes(mapped['total_bytes'])} in "
                 f"{mapped['folder']}{note}")
    return lines


def removed_lines(removed: list[dict]) -> list[str]:
    """`dsvl2 cache clear` / `prune`: one line per kind, "removed N ..., B bytes, from FOLDER"."""
    return [f"removed {r['entries']} {_NOUNS[r['kind']]}, {r['bytes']:,} bytes, from {r['folder']}" for r in removed]


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
    if "memory" in facts:
        rows += _memory_rows(facts["memory"])
    return [f"{key:<11} {value}" for key, value in rows]


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"  # GB as in engine/fit.py's messages, so the numbers match


def _memory_rows(memory: dict) -> list[tuple[str, str]]:
    """info's plan of each method: what it needs and whether it fits in what is available."""
    avail = memory["available"]
    head = f"{_gb(avail['bytes'])} available ({avail['source']}); needs at batch 1, the cache at the full context:"
    rows = [("memory", head)]
    for method, p in memory["plans"].items():
        verdict = "fits" if p["fits"] else "does not fit"
        used = " (these options)" if method == memory["method"] and len(memory["plans"]) > 1 else ""
        need = (f"{_gb(p['total'])}: weights {_gb(p['weights'])}, cache {_gb(p['cache'])}, "
                f"activations {_gb(p['activations'])}: {verdict}{used}")
        rows.append((f"  {method}", need))
    return rows


def loaded_status(vlm, seconds: float) -> str:
    """The line after loading: the model, its dtype and quantization, the device, the time."""
    dtype = str(vlm.dtype).removeprefix("torch.")
    spec = getattr(vlm, "quantization", None)
    parts = [dtype] + ([f"{spec.method} routed experts"] if spec else [])
    parts += ["int8 vision"] if getattr(vlm, "vision_int8", False) else []
    how = f"{', '.join(parts)}, on {vlm.device}" if len(parts) > 1 else f"{dtype} on {vlm.device}"
    return f"{vlm.name} ({vlm.source}) · {how} · loaded in {seconds:.1f} s"


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
