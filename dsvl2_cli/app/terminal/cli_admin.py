"""The `dsvl2` commands around the model: serve, info, quantize, bench, pull and cache. cli.py
registers them on its app (`register`), handing in how a command opens a model, so that they
load exactly as chat and ocr do (and tests can replace the loader in one place).
`python -m dsvl2_cli.app.http.serve` (serve.py) runs this `serve` alone; the server: server_run.py."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ... import quant_methods
from ...settings import DEFAULT_MODEL
from . import exits
from .cli_options import JsonOpt, QuietOpt, shared_options
from .exits import UsageError

if TYPE_CHECKING:
    from ..tasks import Options

_open_model = None  # set by register: cli.open_model


def register(app: typer.Typer, open_model) -> None:
    """Add these commands to `app`; `open_model(opts, ui)` loads the model for `serve`."""
    global _open_model
    _open_model = open_model
    app.command()(exits.command(serve))
    app.command()(exits.command(info))
    app.command()(exits.command(quantize))
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})(exits.command(bench))
    app.command()(exits.command(pull))
    app.command()(exits.command(cache))


# -------------------------------------------------------------------------------------- serve

@shared_options("model", "device", "dtype", "quantize", "vision_int8", "quiet", "api_key")
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on; 0.0.0.0 for every interface.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8000,
    allow_remote_images: Annotated[bool, typer.Option(
        "--allow-remote-images", help="Fetch http(s) image URLs (else only data: URLs are accepted).")] = False,
    cache_bytes: Annotated[int, typer.Option(
        "--cache-bytes", min=0, help="Memory for the prompt caches that requests share (bytes).")] = 1 << 30,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most requests decoding together.")] = 8,
    log_level: Annotated[str, typer.Option(
        "--log-level", metavar="LEVEL", help="uvicorn's log: warning, info (one line per request), debug.")
                         ] = "warning",
    # Hidden: limits a test or a benchmark sets, and the test servers' tie to their parent.
    max_images: Annotated[int, typer.Option("--max-images", hidden=True, help="Most images per request.")] = 8,
    max_image_pixels: Annotated[int, typer.Option(
        "--max-image-pixels", hidden=True, help="Most pixels per image.")] = 89_478_485,  # images.MAX_PIXELS
    max_body_bytes: Annotated[int, typer.Option(
        "--max-body-bytes", hidden=True, help="Largest request body (bytes).")] = 32 << 20,
    exit_with_parent: Annotated[bool, typer.Option(
        "--exit-with-parent", hidden=True, help="Stop when the process that started the server ends.")] = False,
    *, opts: Options,
):
    """Serve the model over HTTP with the OpenAI chat-completions API (for --server, curl, any
    OpenAI client), until Ctrl-C."""
    from ..http import server_run
    from ..http.protocol import ServeSettings, require_extra
    from .render import UI

    ui = UI(opts.quiet)
    settings = ServeSettings(host=host, port=port, api_key=opts.server_key() or "",
                             allow_remote_images=allow_remote_images, cache_bytes=cache_bytes, max_batch=max_batch,
                             max_images=max_images, max_image_pixels=max_image_pixels,
                             max_body_bytes=max_body_bytes, log_level=log_level)
    require_extra()
    server_run.check_bind(settings)  # a taken port fails now, not after the model loaded
    warning = server_run.exposure_warning(settings)
    if warning:
        ui.warn(warning)
    if exit_with_parent:
        server_run.exit_with_parent()
    vlm = _open_model(opts, ui)
    ui.status(f"serving {vlm.name} at {server_run.base_url(settings)}/v1 (OpenAI-compatible; Ctrl-C stops)")
    server_run.run(vlm, settings)


# --------------------------------------------------------------------------------- info, pull

@shared_options("model", "device", "dtype", "quantize", "json_", "quiet")
def info(*, opts: Options):
    """Show the resolved model and its architecture (reads config.json; loads no weights)."""
    from ...engine.loading import hub
    from .. import tasks
    from .render import UI, info_lines, print_json

    ui = UI(opts.quiet)
    resolved = hub.resolve_local(opts.model)  # info never downloads gigabytes
    facts = tasks.model_info(resolved, opts.dtype, opts.device, opts.quantize)
    if opts.json:
        print_json(facts, ui)
        return
    for line in info_lines(facts):
        ui.line(line)


def quantize(
    src: Annotated[str, typer.Argument(metavar="SRC", help="Model folder or Hugging Face id to quantize.")],
    dst: Annotated[Path, typer.Argument(metavar="DST", help="New folder to write (must not exist or be empty).")],
    method: Annotated[str, typer.Option("--method", metavar=quant_methods.FOLDER_METAVAR,
                                        help="How to store the routed experts.")] = "int4",
    group_size: Annotated[Optional[int], typer.Option("--group-size", min=32, show_default=False,
                                                      help=quant_methods.GROUP_SIZE_HELP)] = None,
    quiet: QuietOpt = False,
):
    """Write a pre-quantized copy of a model: routed experts packed, the rest unchanged; it loads
    directly (`-m DST`) and says in its config.json how it is quantized."""
    from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn

    from ...engine.loading import hub
    from ...engine import quant
    from .render import UI

    ui = UI(quiet)
    resolved = hub.resolve(src)
    progress = ui.progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with progress:
        task = progress.add_task(f"quantizing {resolved.name} ({method})", total=None)
        out = quant.quantize_folder(resolved.path, dst, method, group_size,
                                    on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    ui.status(f"wrote {out}")
    ui.line(str(out))


def bench(ctx: typer.Context):
    """Measure speed and memory at the real model shapes, with synthetic weights (no download);
    `dsvl2 bench --help` lists its options."""
    from ...dev import bench as bench_module

    raise typer.Exit(bench_module.main(ctx.args))


def pull(model: Annotated[Optional[str], typer.Argument(
            metavar="MODEL", show_default=False,
            help=f"Hugging Face id (default: $DSVL2_MODEL, else {DEFAULT_MODEL}).")] = None,
         quiet: QuietOpt = False):
    """Download a model into the Hugging Face cache (safetensors, JSON and tokenizer files only)."""
    from ...engine.loading import hub
    from .render import UI

    ui = UI(quiet)
    name = hub.requested(model)
    folder = hub.local_folder(name)
    if folder is not None:
        ui.status(f"{name} is a local folder; nothing to download")
        ui.line(str(folder))
        return
    hub.check_repo_id(name)
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    ui.status(f"downloading {name} into the Hugging Face cache")
    path = hub.download_model(name, hub.PULL_LOCAL_FOLDER_HINT)
    ui.line(str(path))


# -------------------------------------------------------------------------------------- cache

def cache(
    action: Annotated[str | None, typer.Argument(
        metavar="[list|clear|prune]", show_default=False,
        help="list (the default): what is cached; clear [KIND]: remove it; prune: remove the mapped layouts of "
             "models that were deleted or rewritten.")] = None,
    kind: Annotated[str | None, typer.Argument(
        metavar="[prompts|pages|mapped|all]", show_default=False,
        help="What `clear` removes: prompts (the default: the saved image prompts), pages (the OCR text of "
             "scanned PDF pages), mapped (the converted weight layouts of CPU loads) or all.")] = None,
    json_: JsonOpt = False,
):
    """List what dsvl2 keeps on disk (saved image prompts, page texts of scanned PDFs, mapped weight
    layouts: sizes, last use, the model each was built from), or clear or prune it."""
    from . import caches
    from .cli_options import prompt_store
    from .render import UI, cache_lines, print_json, removed_lines

    ui = UI()
    action = action or "list"
    if action not in ("list", "clear", "prune"):
        raise UsageError(f"unknown action {action!r}: use `dsvl2 cache` to list, `dsvl2 cache clear [KIND]` or "
                         "`dsvl2 cache prune`")
    if kind is not None and (action != "clear" or kind not in caches.CLEARABLE):
        raise UsageError(f"`dsvl2 cache {action}` takes no {kind!r}" if action != "clear" else
                         f"unknown kind {kind!r}: clear {', '.join(caches.CLEARABLE)}")
    store = prompt_store()
    if action == "list":
        record = caches.listing(store)
        lines = None if json_ else cache_lines(record)
    else:
        removed = caches.clear(kind or "prompts", store) if action == "clear" else caches.prune()
        record, lines = {"removed": removed}, None if json_ else removed_lines(removed)
    if lines is None:
        print_json(record, ui)
    else:
        for line in lines:
            ui.line(line)
