"""The command-line options the model commands share, as Typer declarations (each command lists
the ones it takes), and `options` to gather them into the task layer's `Options`.

Declaring them imports nothing heavy (no torch, no engine), so `--help` and usage errors start fast."""

from __future__ import annotations

import enum
from typing import Annotated, Optional

import typer

from .. import quant_methods, settings
from ..settings import DEFAULT_MODEL

# tasks.TEMPERATURE_ADVICE, written out: tasks imports torch (test_cli checks that the two agree).
TEMPERATURE_ADVICE = 0.7


class Dtype(str, enum.Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class OcrFormat(str, enum.Enum):
    text = "text"
    markdown = "markdown"
    json = "json"


_M, _G = "Model", "Generation"
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", show_default=False, rich_help_panel=_M,
    help=f"Model folder or Hugging Face id. Default: $DSVL2_MODEL, else {DEFAULT_MODEL}.")]
DeviceOpt = Annotated[str, typer.Option("--device", rich_help_panel=_M, help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", rich_help_panel=_M, help="Weights and compute dtype.")]
QuantizeOpt = Annotated[Optional[str], typer.Option(
    "--quantize", rich_help_panel=_M, show_default=False, metavar=quant_methods.QUANTIZE_METAVAR,
    help=quant_methods.QUANTIZE_HELP)]
VisionInt8Opt = Annotated[bool, typer.Option(
    "--vision-int8", rich_help_panel=_M, show_default=False,
    help="Run the vision tower's linears in int8 (CPU with AVX512-VNNI, bf16 weights): 1.7-1.9x faster image "
         "encoding for a small accuracy cost. Default: $DSVL2_VISION_INT8, else off.")]
AllowPagingOpt = Annotated[bool, typer.Option(
    "--allow-paging", rich_help_panel=_M,
    help="Load even when the model does not fit in memory: memory-mapped weights may be paged from disk: slow.")]
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
ServerOpt = Annotated[Optional[str], typer.Option(
    "--server", metavar="URL", show_default=False, rich_help_panel=_M,
    help="Answer through this OpenAI-compatible server (dsvl2 serve, vLLM, SGLang) instead of loading a "
         "model; -m then names the server's model. Default: $DSVL2_SERVER.")]
ApiKeyOpt = Annotated[Optional[str], typer.Option(
    "--api-key", metavar="KEY", show_default=False, rich_help_panel=_M,
    help="API key: sent to --server, or required by dsvl2 serve. Default: $DSVL2_API_KEY.")]
NoCacheOpt = Annotated[bool, typer.Option(
    "--no-cache", rich_help_panel=_M,
    help="Neither read nor write the saved image prompts (dsvl2 cache lists them).")]
PagesOpt = Annotated[Optional[str], typer.Option(
    "--pages", "-p", show_default=False, help="PDF pages: 1-3,7 or 5 or 2- (to the end). Default: all.")]
DpiOpt = Annotated[int, typer.Option("--dpi", help="PDF rendering resolution (pages are capped at 4096 px).")]
MaxTilesOpt = Annotated[Optional[int], typer.Option(
    "--max-tiles", min=1, max=9, show_default=False,
    help="Most local tiles per image (1-9): less detail, more room in the context. Default: as many as fit.")]
BatchOpt = Annotated[Optional[int], typer.Option(
    "--batch", min=1, show_default=False,
    help="Pages read together (1: one at a time, streaming). Default: 4 on CPU, 8 on a GPU, less when memory is short.")]
PasswordOpt = Annotated[Optional[str], typer.Option("--password", show_default=False,
                                                    help="Password of an encrypted PDF.")]


def options(**kw):
    """tasks.Options from a command's parameters (Typer gives enum members; Options holds their values).
    A model command's `no_cache` decides whether its answers use the persistent prompt cache (a
    local model's: with a server, whose cache is its own, none is opened, nor torch imported)."""
    from .tasks import Options

    if isinstance(kw.get("dtype"), enum.Enum):
        kw["dtype"] = kw["dtype"].value
    no_cache = kw.pop("no_cache", None)
    opts = Options(**kw)
    if no_cache is False and not opts.server_url():
        opts.prompt_store = prompt_store()
    return opts


def prompt_store():
    """The persistent prompt cache in settings.prompt_cache_dir(), capped by
    $DSVL2_PROMPT_CACHE_BYTES (a malformed value is a one-line error)."""
    from ..engine.host_memory import parse_memory_size
    from ..engine.prompt_store import DEFAULT_CAP_BYTES, PromptStore

    text = settings.prompt_cache_bytes()
    cap = parse_memory_size(text, "DSVL2_PROMPT_CACHE_BYTES") if text else DEFAULT_CAP_BYTES
    return PromptStore(settings.prompt_cache_dir(), cap)
