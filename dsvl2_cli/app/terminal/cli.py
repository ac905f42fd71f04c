"""The `dsvl2` command line: chat, ocr, ask and ground here; serve, info, quantize, bench, pull and
cache in cli_admin.py, registered on the same app.

A thin layer: parse the command line, call the library, show the result (render.py). Stdout
carries only the answer, so pipes work; status, progress, timings and warnings go to stderr.
When stdout is not a terminal, or NO_COLOR is set, stdout is plain text: no colour, no pictures.

A model command lists only its own parameters: `@shared_options()` (cli_options.py) adds the
options every model command shares and hands them in gathered, as `opts`. A new one is a function
here, decorated as chat is, that calls its task (tasks.py).

Model: -m/--model (a folder or a Hugging Face id), else $DSVL2_MODEL, else
deepseek-ai/deepseek-vl2-tiny. Sampling is greedy unless --temperature > 0. With --server URL
(or $DSVL2_SERVER) chat, ocr, ask and ground load no model: a server answers (tasks.RemoteBackend).

Exit codes (exits.py): 0 success; 1 a failure, with a one-line `error: ...` on stderr; 2 a usage
error; 130 Ctrl-C; 141 stdout closed early. DSVL2_DEBUG=1 adds the traceback to errors.

JSON output (--json): one object per answer on one line; several answers (ocr of several pages
or files, several messages in a chat) give JSON Lines. Keys are stable; keys may be added. The
schema of chat, ask, ocr and ground answers is in tasks.py, next to the code that builds it.
`info --json` gives tasks.model_info's facts.
"""

from __future__ import annotations

# First: Ctrl-C from here on exits 130 with `interrupted`, even while the imports below run.
# ruff: noqa: E402
from . import interrupts

interrupts.install()

import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ... import __version__
from ...errors import InputError
from . import cli_admin, exits
from .cli_options import (BatchOpt, DpiOpt, MaxTilesOpt, OcrFormat, PagesOpt, PasswordOpt, local_only_options,
                          shared_options)
from .exits import UsageError
from ..inputs.pdf import DEFAULT_DPI

# torch, transformers and the engine load inside the commands that use them, so that --help,
# --version and usage errors answer at once (test_cli checks that none of them is imported).
if TYPE_CHECKING:
    from .render import UI
    from ..options import Options


app = typer.Typer(
    name="dsvl2", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Run DeepSeek-VL2 vision-language models locally: chat about images, read documents, find objects.",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"dsvl2 {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version, help="Print the version and exit.")] = False):
    """Run DeepSeek-VL2 vision-language models locally: chat about images, read documents, find objects."""


# -------------------------------------------------------------------------------------- model

def load_weights(model, *, device: str, dtype: str, quantize: str | None = None, on_progress=None,
                 vision_int8: bool = False):
    """The weights of `model` (open_model's hub.ResolvedModel, or a folder) with the quantization its
    plan chose, not checked again (tests replace this to reuse loaded models)."""
    from ...engine import runtime

    plan = runtime.plan_load(model, device=device, dtype=dtype, quantize=quantize, download=False,
                             memory_check=False, vision_int8=vision_int8 or None)
    return plan.load(on_progress)


def open_model(opts: Options, ui: UI, resolved=None):
    """The model of `opts` through the engine's loading path (runtime.plan_load: resolved, which may
    download, and checked, once); `resolved`: what a command's preflight resolved."""
    from rich.progress import BarColumn, SpinnerColumn, TextColumn

    from ...engine import runtime
    from .render import loaded_status

    plan = runtime.plan_load(resolved or opts.model, device=opts.device, dtype=opts.dtype, quantize=opts.quantize,
                             allow_paging=opts.allow_paging, vision_int8=opts.vision_int8 or None)
    if plan.note:
        ui.status(plan.note)
    if plan.warning:
        ui.warn(plan.warning)
    t0 = time.perf_counter()
    progress = ui.progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                           TextColumn("{task.percentage:>3.0f}%"))
    with progress:
        task = progress.add_task(f"loading {plan.model.name}", total=None)
        vlm = load_weights(plan.model, device=opts.device, dtype=opts.dtype, quantize=plan.quantize,
                           on_progress=lambda done, total: progress.update(task, completed=done, total=total),
                           vision_int8=opts.vision_int8)
    vlm = dataclasses.replace(vlm, name=plan.model.name, source=plan.model.source)
    ui.status(loaded_status(vlm, time.perf_counter() - t0))
    return vlm


def open_backend(opts: Options, ui: UI, resolved=None):
    """What the task runs on: the server of --server/$DSVL2_SERVER (no model loads), else the model."""
    from .. import tasks

    url = opts.server_url()
    if not url:
        return tasks.LocalBackend(open_model(opts, ui, resolved))
    from ..http.client import RemoteModel

    backend = tasks.RemoteBackend(RemoteModel(url, api_key=opts.server_key(), model=opts.model))
    ui.status(f"{backend.name} at {url}")
    local_only = local_only_options(opts)
    if local_only:
        ui.warn(f"{', '.join(local_only)} chose how a local model loads; the server at {url} has loaded its own, "
                "so they are ignored")
    return backend


def _note_sampling(opts: Options, ui: UI) -> None:
    note = opts.sampling_note()
    if note:
        ui.warn(note)


def _stdin_once(files: list[str]) -> None:
    if files.count("-") > 1:
        raise UsageError("stdin (-) can be read only once")


# --------------------------------------------------------------------------------------- chat

@app.command()
@exits.command
@shared_options()
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
    *, opts: Options,
):
    """Ask about images: once, with a prompt; else an interactive chat (/help inside)."""
    from .. import tasks
    from ..inputs.sources import chat_prompt, load_images, split_images_and_prompt
    from .interactive import interactive_chat
    from .render import UI, AnswerView, render_answer, warn_untiled

    ui = UI(opts.quiet)
    if conversation is not None:
        if args or prompt is not None:
            raise UsageError("--conversation takes the whole conversation from the file; give no images or prompt")
        answer_conversation(conversation, opts, ui, interactive)
        return
    files, text = (list(args or []), prompt) if prompt is not None else split_images_and_prompt(args or [])
    _stdin_once(files)
    if "-" in files and (interactive or text is None):
        raise UsageError("with an image on stdin (-), give the prompt as an argument")
    images = load_images(files, ui.warn)  # all checked before the model loads, and before stdin is read
    text = chat_prompt(text, interactive)
    _note_sampling(opts, ui)
    session = tasks.chat_session(open_backend(opts, ui), opts, images)
    if not session.tiling:
        warn_untiled(ui, len(images))
    if text is not None and not interactive:
        render_answer(tasks.chat_turn(session, text), ui, AnswerView(stream=opts.stream, json=opts.json))
        return
    if interactive_chat(session, opts, ui, images, first=text):
        raise typer.Exit(1)


def answer_conversation(source: str, opts: Options, ui: UI, interactive: bool) -> None:
    """chat --conversation: answer a conversation file, then (with -i) go on chatting."""
    from .. import tasks
    from ..inputs.conversation import read_conversation
    from .interactive import interactive_chat
    from .render import AnswerView, render_answer, warn_untiled

    messages, notes = read_conversation(source)
    for note in notes:
        ui.warn(note)
    _note_sampling(opts, ui)
    session = tasks.chat_session(open_backend(opts, ui), opts)
    session.load(messages)
    if not session.tiling:
        warn_untiled(ui, session.image_count)
    render_answer(tasks.chat_turn(session), ui, AnswerView(stream=opts.stream, json=opts.json))
    if interactive and interactive_chat(session, opts, ui, session.images):
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------- ocr

@app.command()
@exits.command
@shared_options()
def ocr(
    files: Annotated[list[str], typer.Argument(metavar="FILE", show_default=False,
                                               help="Images and PDFs (- reads one from stdin).")],
    pages: PagesOpt = None, dpi: DpiOpt = DEFAULT_DPI, password: PasswordOpt = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", file_okay=False, show_default=False,
        help="Write one file per page into this folder (NAME-p001.txt, ...) instead of stdout.")] = None,
    fmt: Annotated[OcrFormat, typer.Option(
        "--format", "-f", help="Plain text, Markdown (tables kept as Markdown tables), or json: one record per "
                               "page with boxes where the model grounds its text.")] = OcrFormat.text,
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-P", show_default=False, help="Your own prompt instead of the OCR prompt of --format.")] = None,
    skip_existing: Annotated[bool, typer.Option(
        "--skip-existing", help="With --out: skip pages whose file exists (resume a run).")] = False,
    max_tiles: MaxTilesOpt = None, batch: BatchOpt = None,
    *, opts: Options,
):
    """Read the text of images and PDF pages: to stdout with a header per page, or a file per page."""
    from ...engine.loading import hub
    from .. import tasks
    from ..inputs.sources import collect_sources
    from .render import UI, render_pages

    ui = UI(opts.quiet)
    with contextlib.ExitStack() as stack:
        _stdin_once(files)
        sources = collect_sources(files, pages, dpi, password, ui.warn, stack)
        ext = tasks.ocr_extension(fmt.value, opts.json)
        sources, targets, skipped = tasks.ocr_targets(sources, out, ext, skip_existing)
        if skipped:
            ui.status(f"skipping {skipped} page(s) already in {out}")
        if not sources:
            return
        text = prompt or tasks.OCR_PROMPTS[fmt.value]
        resolved = None if opts.server_url() else hub.resolve(opts.model)
        if resolved is not None:  # a prompt that cannot fit even untiled is refused before loading
            tasks.preflight(resolved.path, text, 1, opts, "ocr", max_tiles,
                            name=sources[0].title if len(sources) == 1 else "every page")
        _note_sampling(opts, ui)
        backend = open_backend(opts, ui, resolved)
        local = isinstance(backend, tasks.LocalBackend)
        batch = batch or (tasks.default_ocr_batch(backend.vlm, len(sources)) if local else 1)
        if batch > 1:
            ui.status(f"reading {batch} pages at a time (--batch 1: one at a time, streaming)")
        events = tasks.read_pages(backend, sources, text, opts, max_tiles=max_tiles, batch=batch)
        as_json = opts.json or fmt is OcrFormat.json
        if fmt is OcrFormat.json:
            events = tasks.with_boxes(events)
        failed = render_pages(events, sources, targets, ui, stream=opts.stream and batch == 1, as_json=as_json)
    if failed:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------- ask

@app.command()
@exits.command
@shared_options()
def ask(
    files: Annotated[list[str], typer.Argument(
        metavar="FILE", show_default=False, help="PDFs or images of pages (- reads one from stdin).")],
    question: Annotated[str, typer.Argument(metavar="QUESTION", show_default=False,
                                            help="The question about them.")],
    pages: PagesOpt = None, dpi: DpiOpt = DEFAULT_DPI, password: PasswordOpt = None,
    max_tiles: MaxTilesOpt = None,
    *, opts: Options,
):
    """Ask a question about document pages. Without --pages, the pages that best match the
    question (by their text) are chosen and read at full detail."""
    from ...engine.loading import hub
    from .. import pages as select_pages
    from .. import tasks
    from ..inputs.sources import collect_sources
    from .render import UI, AnswerView, render_answer

    ui = UI(opts.quiet)
    if not question.strip():
        raise InputError("empty question; ask something about the pages")
    backend = selection = None
    with contextlib.ExitStack() as stack:
        _stdin_once(files)
        sources = collect_sources(files, pages, dpi, password, ui.warn, stack)
        if pages is None and select_pages.selectable(sources):
            selection, backend = _choose_pages(sources, question, opts, ui)
            sources = list(selection.chosen)
            ui.status(selection.note())
        note = tasks.ask_note(len(sources))
        if note:
            ui.warn(note)
        images = [src.image() for src in sources]
    if backend is None:
        resolved = None if opts.server_url() else hub.resolve(opts.model)
        if resolved is not None:  # a prompt that cannot fit even untiled is refused before loading
            tasks.preflight(resolved.path, question, images, opts, "chat", max_tiles)
        _note_sampling(opts, ui)
        backend = open_backend(opts, ui, resolved)
    render_answer(tasks.ask(backend, images, question, opts, max_tiles=max_tiles, selection=selection), ui,
                  AnswerView(stream=opts.stream, json=opts.json, waiting="reading the pages"))


def _choose_pages(sources, question: str, opts: Options, ui: UI):
    """ask without --pages: rank the pages by their text layer; pages without one are read by
    OCR first (the model loads, or the server is asked, for that, and is returned for the
    answer; else None)."""
    from .. import pages as select_pages
    from .. import tasks

    texts = [src.text() for src in sources]
    scanned = select_pages.scanned_pages(texts)
    backend = None
    if scanned:
        _note_sampling(opts, ui)
        backend = open_backend(opts, ui)
        ui.status(f"{len(scanned)} page(s) without a text layer: reading them to find the answer's pages")
        local = isinstance(backend, tasks.LocalBackend)
        batch = tasks.default_ocr_batch(backend.vlm, len(scanned)) if local else 1
        for i, text in zip(scanned, tasks.ocr_texts(backend, [sources[i] for i in scanned], batch=batch)):
            texts[i] = text
    return select_pages.select_pages(question, sources, texts, len(scanned)), backend


# ------------------------------------------------------------------------------------- ground

@app.command()
@exits.command
@shared_options(without={"no_stream"})
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
    *, opts: Options,
):
    """Find things in an image and draw their boxes (referring-expression grounding)."""
    from .. import tasks
    from ..inputs.sources import load_image_arg, read_stdin_bytes
    from .pictures import image_format
    from .render import UI, AnswerView, render_answer

    ui = UI(opts.quiet)
    if not caption and not (what or "").strip():
        raise UsageError('say what to find, e.g. dsvl2 ground photo.jpg "the red cup", or use --caption')
    if save is not None:
        image_format(save)  # an unknown extension fails now, not after the model ran
    img = load_image_arg(image, ui.warn, read_stdin_bytes() if image == "-" else None)
    prompt = tasks.ground_prompt(what, caption)
    _note_sampling(opts, ui)
    render_answer(tasks.ground(open_backend(opts, ui), img, prompt, opts, caption), ui,
                  AnswerView(stream=False, json=opts.json, waiting="looking", save=save))


cli_admin.register(app, open_model=lambda opts, ui: open_model(opts, ui))  # serve, info, pull, quantize, bench, cache


# ---------------------------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (`entry` ends the process with it)."""
    return exits.run(app, sys.argv[1:] if argv is None else list(argv))


def entry() -> None:
    """The `dsvl2` console script and `python -m dsvl2_cli`: main(), then exits.finish (which
    skips the interpreter's half-second teardown of torch once the output is flushed)."""
    exits.finish(main())
