"""The `dsvl2` command line: chat, ocr, ask, ground, info, pull.

A thin layer: parse the command line, call the library, show the result (render.py). Stdout
carries only the answer, so pipes work; status, progress, timings and warnings go to stderr.
When stdout is not a terminal, or NO_COLOR is set, stdout is plain text: no colour, no pictures.

Model: -m/--model (a folder or a Hugging Face id), else $DSVL2_MODEL, else
deepseek-ai/deepseek-vl2-tiny. Sampling is greedy unless --temperature > 0.

Exit codes: 0 success; 1 a failure, with a one-line `error: ...` on stderr (missing file,
unreadable image or PDF, model not found, context too long: every Dsvl2Error); 2 a usage error;
130 Ctrl-C (what was generated is flushed first); 141 stdout closed early (`... | head -1`).
DSVL2_DEBUG=1 adds the traceback to errors.

JSON output (--json): one object per answer on one line; several answers (ocr of several pages
or files, several messages in a chat) give JSON Lines. Keys are stable; keys may be added.

chat, ask, ocr:
    {"model": str,                  # the model as asked for (-m, DSVL2_MODEL or the default)
     "input": str | null,           # the file answered about ("-" for stdin); null for none or several
     "page": int | null,            # its 1-based PDF page; null for an image or several images
     "images": [{"input": str, "page": int | null, "size": [w, h]}],   # every image in the prompt
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
info --json: {"model", "path", "source", "dtype", "device", "architecture": {...},
              "parameters": {"total", "active", "vision", "adaptor", "language"},
              "cache_bytes_per_token", "image_tokens_384"}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from ..engine import facts as model_facts
from ..engine import hub, memory, quant, runtime
from ..engine.chat import ChatSession
from ..engine.generate import Done, GenerationConfig, Token, stream_generate
from ..engine.processor import MAX_TILED_IMAGES, user_message
from ..engine.sampling import SamplingParams
from .. import settings
from ..errors import Dsvl2Error, InputError, ModelError
from ..model.config import ModelConfig
from .conversation import read_conversation
from .grounding import caption_prompt, parse_grounding, referring_prompt, to_pixels, to_xywh
from .interactive import interactive_chat, warn_untiled
from .pdf import DEFAULT_DPI, Source, collect_sources, load_image_arg, read_stdin_bytes, write_atomic
from .render import (UI, DrawBox, answer_record, colour, draw_boxes, encode_image, image_format, info_lines, isatty,
                     print_json, report, show_answer, show_boxes)

TEMPERATURE_ADVICE = 0.7  # the model card: higher temperatures degrade quality
OCR_PROMPTS = {
    "text": "Read all the text in this image and write it out exactly as it appears, in reading order, "
            "keeping the line breaks. Output only the text.",
    "markdown": "Convert this page to Markdown: keep its headings, lists, tables and emphasis, and write out "
                "all of its text in reading order. Output only the Markdown.",
}
MAX_TOKENS = {"chat": 1024, "ocr": 2048, "ground": 1024}
_FILE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jfif", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".pdf", ".ppm",
                  ".pgm", ".pbm", ".ico", ".heic", ".avif"}


def _click_class(name: str) -> type:
    """click's exception classes, wherever this typer takes click from (recent typers vendor it)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


UsageError, ClickException = _click_class("UsageError"), _click_class("ClickException")

app = typer.Typer(
    name="dsvl2", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Run DeepSeek-VL2 vision-language models locally: chat about images, read documents, find objects.",
)


class Dtype(str, enum.Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class OcrFormat(str, enum.Enum):
    text = "text"
    markdown = "markdown"


# ------------------------------------------------------------------------------ shared options

_M, _G = "Model", "Generation"
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", show_default=False, rich_help_panel=_M,
    help=f"Model folder or Hugging Face id. Default: $DSVL2_MODEL, else {hub.DEFAULT_MODEL}.")]
DeviceOpt = Annotated[str, typer.Option("--device", rich_help_panel=_M, help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", rich_help_panel=_M, help="Weights and compute dtype.")]
QuantizeOpt = Annotated[Optional[str], typer.Option(
    "--quantize", rich_help_panel=_M, show_default=False, metavar="none|int8|int4|nf4",
    help="Quantize the routed experts while loading: int4 (fast on CPU), nf4 (bitsandbytes), int8. "
         "Default: the folder as it is.")]
MaxTokensOpt = Annotated[Optional[int], typer.Option(
    "--max-tokens", min=1, show_default=False, rich_help_panel=_G,
    help="Most tokens per answer (default 1024; ocr 2048).")]
TemperatureOpt = Annotated[float, typer.Option(
    "--temperature", "-t", min=0.0, max=2.0, rich_help_panel=_G,
    help=f"0 = greedy: reproducible, best for OCR and grounding. The model card advises <= {TEMPERATURE_ADVICE}.")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, rich_help_panel=_G,
                                        help="Nucleus sampling, with --temperature > 0.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", show_default=False, rich_help_panel=_G,
                                                help="Random seed for sampling.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", "-s", show_default=False, rich_help_panel=_G,
                                                  help="System prompt.")]
NoStreamOpt = Annotated[bool, typer.Option("--no-stream", help="Print the answer once it is complete.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per answer (schema: README).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No status, progress or timings on stderr.")]
PagesOpt = Annotated[Optional[str], typer.Option(
    "--pages", "-p", show_default=False, help="PDF pages: 1-3,7 or 5 or 2- (to the end). Default: all.")]
DpiOpt = Annotated[int, typer.Option("--dpi", help="PDF rendering resolution (pages are capped at 4096 px).")]
PasswordOpt = Annotated[Optional[str], typer.Option("--password", show_default=False,
                                                    help="Password of an encrypted PDF.")]


@dataclasses.dataclass
class Options:
    """The options every model command shares."""

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

    def generation(self, command: str) -> GenerationConfig:
        sampling = SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        return GenerationConfig(max_tokens=self.max_tokens or MAX_TOKENS[command], sampling=sampling)


def _opts(**kw) -> Options:
    if isinstance(kw.get("dtype"), enum.Enum):
        kw["dtype"] = kw["dtype"].value
    return Options(**kw)


def _command(fn):
    """Ctrl-C and a closed stdout end a command quietly, with exit codes 130 and 141."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            ui = UI.current
            with contextlib.suppress(Exception):
                if ui is not None:
                    ui.end_line()  # what was generated stays, on a finished line
                sys.stdout.flush()
                sys.stderr.write("interrupted\n")
            raise typer.Exit(130) from None
        except BrokenPipeError:
            _silence_stdout()
            raise typer.Exit(141) from None
    return wrapper


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush cannot fail again."""
    with contextlib.suppress(Exception):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# -------------------------------------------------------------------------------------- model

def load_weights(path: Path, *, device: str, dtype: str, quantize: str | None = None, on_progress=None):
    """runtime.load on a resolved folder (tests replace this to reuse loaded models)."""
    return runtime.load(path, device=device, dtype=dtype, quantize=quantize, download=False,
                        on_progress=on_progress)


def open_model(opts: Options, ui: UI):
    resolved = hub.resolve(opts.model)  # may download, with huggingface_hub's own progress bars
    t0 = time.perf_counter()
    progress = ui.progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                           TextColumn("{task.percentage:>3.0f}%"))
    with progress:
        task = progress.add_task(f"loading {resolved.name}", total=None)
        vlm = load_weights(resolved.path, device=opts.device, dtype=opts.dtype, quantize=opts.quantize,
                           on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    vlm = dataclasses.replace(vlm, name=resolved.name, source=resolved.source)
    ui.status(f"{resolved.name} ({resolved.source}) · {_dtype_name(vlm.dtype)} on {vlm.device} · "
              f"loaded in {time.perf_counter() - t0:.1f} s")
    return vlm


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_sampling(opts: Options, ui: UI) -> None:
    if opts.temperature > TEMPERATURE_ADVICE:
        ui.warn(f"temperature {opts.temperature:g} is above {TEMPERATURE_ADVICE}, where the model card says "
                "quality degrades")


# ------------------------------------------------------------------------------------- inputs

def _stdin_once(files: list[str]) -> None:
    if files.count("-") > 1:
        raise UsageError("stdin (-) can be read only once")


def split_images_and_prompt(args: list[str]) -> tuple[list[str], str | None]:
    """`[IMAGE]... [PROMPT]`: the last argument is the prompt unless it names a file (or is "-")."""
    if not args:
        return [], None
    last = args[-1]
    if last == "-" or _looks_like_file(last):
        return list(args), None
    return list(args[:-1]), last


def _looks_like_file(arg: str) -> bool:
    if not arg.strip():  # "" is an (empty) prompt, not the current folder
        return False
    try:
        if Path(arg).exists():
            return True
    except (OSError, ValueError):  # e.g. a prompt too long to be a file name
        return False
    return not any(c.isspace() for c in arg) and Path(arg).suffix.lower() in _FILE_SUFFIXES


# --------------------------------------------------------------------------------------- chat

@app.command()
@_command
def chat(
    args: Annotated[Optional[list[str]], typer.Argument(
        metavar="IMAGE|PROMPT", show_default=False,
        help="Image files (- reads one from stdin), then the prompt. Without a prompt: the text piped "
             "on stdin, else an interactive chat.")] = None,
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-P", show_default=False, help="The prompt; every argument is then an image.")] = None,
    interactive: Annotated[bool, typer.Option(
        "--interactive", "-i", help="Chat even when stdin is not a terminal (one message per line).")] = False,
    conversation: Annotated[Optional[str], typer.Option(
        "--conversation", metavar="FILE", show_default=False,
        help="Answer a conversation given exactly: a JSON file in the official message format "
             "(- reads it from stdin); image paths are relative to the file.")] = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = Dtype.bfloat16,
    quantize: QuantizeOpt = None,
    max_tokens: MaxTokensOpt = None, temperature: TemperatureOpt = 0.0, top_p: TopPOpt = 1.0,
    seed: SeedOpt = None, system: SystemOpt = None, no_stream: NoStreamOpt = False, json_: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Ask about images: once, with a prompt; else an interactive chat (/help inside)."""
    opts = _opts(model=model, device=device, dtype=dtype, quantize=quantize, max_tokens=max_tokens,
                 temperature=temperature,
                 top_p=top_p, seed=seed, system=system, stream=not no_stream, json=json_, quiet=quiet)
    ui = UI(quiet)
    if conversation is not None:
        if args or prompt is not None:
            raise UsageError("--conversation takes the whole conversation from the file; give no images or prompt")
        answer_conversation(conversation, opts, ui, interactive)
        return
    files, text = (list(args or []), prompt) if prompt is not None else split_images_and_prompt(args or [])
    _stdin_once(files)
    if "-" in files and (interactive or text is None):
        raise UsageError("with an image on stdin (-), give the prompt as an argument")
    if text is None and not interactive and not isatty(sys.stdin):
        text = sys.stdin.read()
        if not text.strip():
            raise InputError("empty prompt on stdin; give a prompt argument or pipe some text")
    if text is not None and not interactive and not text.strip():
        raise InputError("empty prompt; say what to ask about the images (an argument, -P TEXT or text on stdin)")
    data = read_stdin_bytes() if "-" in files else None
    images = [load_image_arg(f, ui.warn, data if f == "-" else None)  # all checked before the model loads
              for f in files]
    _check_sampling(opts, ui)
    vlm = open_model(opts, ui)
    session = ChatSession(vlm, system=opts.system, config=opts.generation("chat"), images=images)
    if not session.tiling:
        warn_untiled(ui, len(images))
    if text is not None and not interactive:
        done = show_answer(session.ask(text), ui, stream=opts.stream and not opts.json, echo=not opts.json)
        if opts.json:
            print_json(answer_record(vlm, done, session.last_prepared, session.images), ui)
        report(done, ui)
        return
    if interactive_chat(session, opts, ui, images, first=text):
        raise typer.Exit(1)


def answer_conversation(source: str, opts: Options, ui: UI, interactive: bool) -> None:
    """chat --conversation: answer a conversation file, then (with -i) go on chatting."""
    messages, notes = read_conversation(source)
    for note in notes:
        ui.warn(note)
    _check_sampling(opts, ui)
    vlm = open_model(opts, ui)
    session = ChatSession(vlm, system=opts.system, config=opts.generation("chat"))
    session.load(messages)
    if not session.tiling:
        warn_untiled(ui, session.image_count)
    done = show_answer(session.respond(), ui, stream=opts.stream and not opts.json, echo=not opts.json)
    if opts.json:
        print_json(answer_record(vlm, done, session.last_prepared, session.images), ui)
    report(done, ui)
    if interactive and interactive_chat(session, opts, ui, session.images):
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------- ocr

@app.command()
@_command
def ocr(
    files: Annotated[list[str], typer.Argument(metavar="FILE", show_default=False,
                                               help="Images and PDFs (- reads one from stdin).")],
    pages: PagesOpt = None, dpi: DpiOpt = DEFAULT_DPI, password: PasswordOpt = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", file_okay=False, show_default=False,
        help="Write one file per page into this folder (NAME-p001.txt, ...) instead of stdout.")] = None,
    fmt: Annotated[OcrFormat, typer.Option("--format", "-f", help="Plain text or Markdown.")] = OcrFormat.text,
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-P", show_default=False, help="Your own prompt instead of the OCR prompt of --format.")] = None,
    skip_existing: Annotated[bool, typer.Option(
        "--skip-existing", help="With --out: skip pages whose file exists (resume a run).")] = False,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = Dtype.bfloat16,
    quantize: QuantizeOpt = None,
    max_tokens: MaxTokensOpt = None, temperature: TemperatureOpt = 0.0, top_p: TopPOpt = 1.0,
    seed: SeedOpt = None, system: SystemOpt = None, no_stream: NoStreamOpt = False, json_: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Read the text of images and PDF pages: to stdout with a header per page, or a file per page."""
    opts = _opts(model=model, device=device, dtype=dtype, quantize=quantize, max_tokens=max_tokens,
                 temperature=temperature,
                 top_p=top_p, seed=seed, system=system, stream=not no_stream, json=json_, quiet=quiet)
    ui = UI(quiet)
    ext = "json" if opts.json else ("md" if fmt == OcrFormat.markdown else "txt")
    with contextlib.ExitStack() as stack:
        _stdin_once(files)
        sources = collect_sources(files, pages, dpi, password, ui.warn, stack)
        targets: list[Path | None] = [None] * len(sources)
        if out is not None:
            targets = _output_paths(sources, out, ext)
            if skip_existing:
                keep = [i for i, path in enumerate(targets) if not path.exists()]
                if len(keep) < len(sources):
                    ui.status(f"skipping {len(sources) - len(keep)} page(s) already in {out}")
                sources, targets = [sources[i] for i in keep], [targets[i] for i in keep]
        if not sources:
            return
        _check_sampling(opts, ui)
        vlm = open_model(opts, ui)
        failed = run_ocr(vlm, sources, targets, prompt or OCR_PROMPTS[fmt.value], opts, ui)
    if failed:
        raise typer.Exit(1)


def _output_paths(sources: list[Source], out: Path, ext: str) -> list[Path]:
    seen: dict[str, Source] = {}
    for src in sources:
        name = src.output_name(ext)
        if name in seen:
            raise InputError(f"{seen[name].title} and {src.title} would both be written to {out / name}; "
                             "run them separately")
        seen[name] = src
    return [out / src.output_name(ext) for src in sources]


def run_ocr(vlm, sources: list[Source], targets: list[Path | None], prompt: str, opts: Options, ui: UI) -> int:
    """Read every source; a page that fails is reported and skipped. Returns the failure count."""
    config = opts.generation("ocr")
    many = len(sources) > 1
    bar = ui.progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[tokens]} tokens"), TimeElapsedColumn())
    bar_shown = many and ui.live
    to_stdout = targets[0] is None
    # Streaming into the terminal the bar is drawn on would tear it: then pages appear whole.
    stream = opts.stream and not opts.json and to_stdout and not (bar_shown and isatty(sys.stdout))
    failed, tokens, t0 = 0, 0, time.perf_counter()
    task = bar.add_task("", total=len(sources), tokens=0)
    with bar:
        for i, (src, target) in enumerate(zip(sources, targets)):
            bar.update(task, description=src.title, tokens=0)
            header = f"{'' if i == 0 else chr(10)}==> {src.title} <==\n" if many and to_stdout and not opts.json else ""
            try:
                img = src.image()
                prepared = vlm.prepare([user_message(prompt, [img])], system=opts.system)
                if stream:
                    ui.write(header)
                    ui.start_answer()
                done = None
                for event in stream_generate(vlm, prepared, config):
                    if isinstance(event, Token):
                        bar.update(task, tokens=bar.tasks[0].fields["tokens"] + 1)
                        if stream:
                            ui.answer_text(event.text)
                    elif isinstance(event, Done):
                        done = event
            except Dsvl2Error as err:
                failed += 1
                ui.end_line()
                message = str(err)
                ui.error(message if message.startswith(src.input) else f"{src.title}: {message}")
                bar.advance(task)
                continue
            record = answer_record(vlm, done, prepared, [img])
            if target is not None:
                body = json.dumps(record, ensure_ascii=False) if opts.json else record["text"]
                write_atomic(target, (body + "\n").encode("utf-8"))
                ui.status(f"{src.title} -> {target}")
            elif stream:
                ui.end_line()
            else:
                with _paused(bar, bar_shown and isatty(sys.stdout)):
                    ui.write((json.dumps(record, ensure_ascii=False) if opts.json else header + record["text"]) + "\n")
            tokens += done.stats.generated_tokens
            report(done, ui if not bar_shown else _Muted(ui), src.title if many else "")
            bar.advance(task)
    if many:
        ui.status(f"{len(sources) - failed} of {len(sources)} pages read · {tokens} tokens · "
                  f"{time.perf_counter() - t0:.1f} s")
    return failed


class _Muted:
    """A UI stand-in for `report` under a progress bar: warnings pass, timing lines do not."""

    def __init__(self, ui: UI):
        self.warn, self.status = ui.warn, lambda message: None


@contextlib.contextmanager
def _paused(bar, active: bool):
    """Take the progress bar off the terminal while a page is written to stdout."""
    if active:
        bar.stop()
    try:
        yield
    finally:
        if active:
            bar.start()


# ---------------------------------------------------------------------------------------- ask

@app.command()
@_command
def ask(
    files: Annotated[list[str], typer.Argument(
        metavar="FILE", show_default=False, help="PDFs or images of pages (- reads one from stdin).")],
    question: Annotated[str, typer.Argument(metavar="QUESTION", show_default=False,
                                            help="The question about them.")],
    pages: PagesOpt = None, dpi: DpiOpt = DEFAULT_DPI, password: PasswordOpt = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = Dtype.bfloat16,
    quantize: QuantizeOpt = None,
    max_tokens: MaxTokensOpt = None, temperature: TemperatureOpt = 0.0, top_p: TopPOpt = 1.0,
    seed: SeedOpt = None, system: SystemOpt = None, no_stream: NoStreamOpt = False, json_: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Ask a question about document pages (best with 1 or 2 pages: those are tiled)."""
    opts = _opts(model=model, device=device, dtype=dtype, quantize=quantize, max_tokens=max_tokens,
                 temperature=temperature,
                 top_p=top_p, seed=seed, system=system, stream=not no_stream, json=json_, quiet=quiet)
    ui = UI(quiet)
    if not question.strip():
        raise InputError("empty question; ask something about the pages")
    with contextlib.ExitStack() as stack:
        _stdin_once(files)
        sources = collect_sources(files, pages, dpi, password, ui.warn, stack)
        if len(sources) > MAX_TILED_IMAGES:
            warn_untiled(ui, len(sources), "pages", "ask about 1 or 2 pages at a time (e.g. --pages 3 or "
                                                     "--pages 3-4) for detail")
        images = [src.image() for src in sources]
    _check_sampling(opts, ui)
    vlm = open_model(opts, ui)
    prepared = vlm.prepare([user_message(question, images)], system=opts.system)
    done = show_answer(stream_generate(vlm, prepared, opts.generation("chat")), ui,
                       stream=opts.stream and not opts.json, echo=not opts.json, waiting="reading the pages")
    if opts.json:
        print_json(answer_record(vlm, done, prepared, images), ui)
    report(done, ui)


# ------------------------------------------------------------------------------------- ground

@app.command()
@_command
def ground(
    image: Annotated[str, typer.Argument(metavar="IMAGE", show_default=False,
                                         help="The image (- reads it from stdin).")],
    what: Annotated[Optional[str], typer.Argument(
        metavar="WHAT", show_default=False,
        help='What to find, e.g. "the red cup". With --caption: an optional question.')] = None,
    caption: Annotated[bool, typer.Option(
        "--caption", "-c", help="Grounded caption: describe the image with boxes for what it names.")] = False,
    save: Annotated[Optional[Path], typer.Option(
        "--save", dir_okay=False, show_default=False, help="Save the image with the boxes drawn (PNG, JPEG...).")] = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = Dtype.bfloat16,
    quantize: QuantizeOpt = None,
    max_tokens: MaxTokensOpt = None, temperature: TemperatureOpt = 0.0, top_p: TopPOpt = 1.0,
    seed: SeedOpt = None, system: SystemOpt = None, json_: JsonOpt = False, quiet: QuietOpt = False,
):
    """Find things in an image and draw their boxes (referring-expression grounding)."""
    opts = _opts(model=model, device=device, dtype=dtype, quantize=quantize, max_tokens=max_tokens,
                 temperature=temperature,
                 top_p=top_p, seed=seed, system=system, stream=False, json=json_, quiet=quiet)
    ui = UI(quiet)
    if not caption and not (what or "").strip():
        raise UsageError('say what to find, e.g. dsvl2 ground photo.jpg "the red cup", or use --caption')
    if save is not None:
        image_format(save)  # an unknown extension fails now, not after the model ran
    img = load_image_arg(image, ui.warn, read_stdin_bytes() if image == "-" else None)
    prompt = caption_prompt(what) if caption else referring_prompt(what)
    _check_sampling(opts, ui)
    vlm = open_model(opts, ui)
    prepared = vlm.prepare([user_message(prompt, [img])], system=opts.system)
    done = show_answer(stream_generate(vlm, prepared, opts.generation("ground")), ui, stream=False, echo=False,
                       waiting="looking")
    # The raw answer keeps the grounding tokens (<|ref|>, <|det|>...) the parser needs.
    raw = vlm.tokenizer.decode(done.token_ids, skip_special_tokens=False)
    result = parse_grounding(raw)
    w, h = img.size
    boxes = [(b, to_pixels(b, w, h)) for b in result.boxes]
    drawn = [DrawBox(xyxy, b.label, colour(b.ref_index)) for b, xyxy in boxes]
    if save is not None:
        write_atomic(save, encode_image(draw_boxes(img, drawn), save))
        ui.status(f"saved {save}")
    for problem in result.problems:
        ui.warn(f"grounding: {problem}")
    if not boxes:
        ui.warn("no boxes found in the answer")
    if opts.json:
        record = answer_record(vlm, done, prepared, [img])
        record.update(text=result.text, image_size=[w, h], problems=result.problems, raw=raw, boxes=[
            {"label": b.label, "box_999": list(b.box_999), "xyxy": list(xyxy), "xywh": list(to_xywh(xyxy))}
            for b, xyxy in boxes])
        print_json(record, ui)
    else:
        show_boxes(ui, img, drawn, result.text if (caption or not boxes) else "")
    report(done, ui)


# --------------------------------------------------------------------------------- info, pull

@app.command()
@_command
def info(model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = Dtype.bfloat16,
         quantize: QuantizeOpt = None, json_: JsonOpt = False, quiet: QuietOpt = False):
    """Show the resolved model and its architecture (reads config.json; loads no weights)."""
    ui = UI(quiet)
    try:
        resolved = hub.resolve(model, download=False)  # info never downloads gigabytes
    except ModelError:
        name = model or settings.default_model()
        if hub.is_offline() or Path(name).expanduser().exists() or "/" not in name:
            raise
        raise ModelError(f"{name}: not downloaded yet; `dsvl2 pull {name}` fetches it (info reads local files "
                         "only)") from None
    facts = model_facts.describe_model(resolved, _opts(dtype=dtype).dtype, device)
    spec = quant.choose_spec(quantize, quant.read_spec(resolved.path), str(resolved.path))
    cfg = ModelConfig.from_dir(resolved.path)
    facts["quantization"] = quant.spec_label(spec)
    facts["weight_memory"] = memory.planned_weight_memory(cfg, runtime.resolve_dtype(facts["dtype"]), spec)
    if json_:
        print_json(facts, ui)
        return
    for line in info_lines(facts):
        ui.line(line)


@app.command()
@_command
def quantize(
    src: Annotated[str, typer.Argument(metavar="SRC", help="Model folder or Hugging Face id to quantize.")],
    dst: Annotated[Path, typer.Argument(metavar="DST", help="New folder to write (must not exist or be empty).")],
    method: Annotated[str, typer.Option("--method", metavar="int4|nf4|int8",
                                        help="How to store the routed experts.")] = "int4",
    group_size: Annotated[Optional[int], typer.Option("--group-size", min=32, show_default=False,
                                                      help="Values per scale (default: int4 128, nf4 64).")] = None,
    quiet: QuietOpt = False,
):
    """Write a pre-quantized copy of a model: routed experts packed, the rest unchanged; it loads
    directly (`-m DST`) and says in its config.json how it is quantized."""
    ui = UI(quiet)
    resolved = hub.resolve(src)
    progress = ui.progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with progress:
        task = progress.add_task(f"quantizing {resolved.name} ({method})", total=None)
        out = quant.quantize_folder(resolved.path, dst, method, group_size,
                                    on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    ui.status(f"wrote {out}")
    ui.line(str(out))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
@_command
def bench(ctx: typer.Context):
    """Measure speed and memory at the real model shapes, with synthetic weights (no download);
    `dsvl2 bench --help` lists its options."""
    from ..dev import bench as bench_module

    raise typer.Exit(bench_module.main(ctx.args))


@app.command()
@_command
def pull(model: Annotated[Optional[str], typer.Argument(
            metavar="MODEL", show_default=False,
            help=f"Hugging Face id (default: $DSVL2_MODEL, else {hub.DEFAULT_MODEL}).")] = None,
         quiet: QuietOpt = False):
    """Download a model into the Hugging Face cache (safetensors, JSON and tokenizer files only)."""
    ui = UI(quiet)
    name = model or settings.default_model()
    if Path(name).expanduser().is_dir():
        ui.status(f"{name} is a local folder; nothing to download")
        ui.line(str(Path(name).expanduser().resolve()))
        return
    if "/" not in name or any(c.isspace() for c in name):
        raise ModelError(f"{name}: not a Hugging Face id (owner/name) nor a folder; e.g. {hub.DEFAULT_MODEL}")
    if hub.is_offline():
        raise ModelError(f"{name}: cannot download while HF_HUB_OFFLINE is set; unset it on a connected machine "
                         "and run dsvl2 pull again")
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    ui.status(f"downloading {name} into the Hugging Face cache")
    path = hub.download_model(name)
    ui.line(str(path))


# ---------------------------------------------------------------------------------- entry point

def _debug() -> bool:
    return settings.debug()


def _fail(message: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        Text("error: ", style="bold red") + Text(" ".join(message.split())))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script passes it to sys.exit)."""
    command = typer.main.get_command(app)
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # bare `dsvl2`: the help, on stderr, as the usage error it is
        with contextlib.redirect_stdout(sys.stderr):
            command.main(args=["--help"], prog_name="dsvl2", standalone_mode=False)
        return 2
    try:
        result = command.main(args=argv, prog_name="dsvl2", standalone_mode=False)
        code = result if isinstance(result, int) else 0
        sys.stdout.flush()
    except UsageError as err:
        if err.ctx is not None:
            sys.stderr.write(f"{err.ctx.get_usage()}\nTry '{err.ctx.command_path} --help' for help.\n")
        _fail(err.format_message())
        code = 2
    except ClickException as err:
        _fail(err.format_message())
        code = err.exit_code
    except typer.Abort:
        code = 130
    except Dsvl2Error as err:
        if _debug():
            traceback.print_exc()
        _fail(str(err))
        code = 1
    except BrokenPipeError:
        _silence_stdout()
        code = 141
    except KeyboardInterrupt:
        code = 130
    except Exception as err:  # noqa: BLE001 - out of memory, or a bug: then show everything
        oom = isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"  # torch's, on a GPU
        if _debug() or not oom:
            traceback.print_exc()
        _fail("out of memory; try fewer or smaller images, --dtype bfloat16, --device cpu or a smaller model"
              if oom else f"unexpected {type(err).__name__}: {err} (a bug: please report it with the traceback)")
        code = 1
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code
