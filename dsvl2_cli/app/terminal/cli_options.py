"""The command-line options the model commands share, declared once: `SHARED` lists them and
`shared_options` gives a command all of them (or a subset) after its own parameters, gathered into
the task layer's `Options` (`options`). The options of a single command stay in its signature.

Declaring them imports nothing heavy (no torch, no engine), so `--help` and usage errors start fast."""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ... import quant_methods, settings
from ...settings import DEFAULT_MODEL
from ..defaults import TEMPERATURE_ADVICE  # engine-free: --help stays instant

if TYPE_CHECKING:  # types only
    from ..options import Options


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


# Every shared option, in the order --help shows it: (parameter name, declaration, default).
SHARED: tuple[tuple[str, Any, Any], ...] = (
    ("model", ModelOpt, None), ("device", DeviceOpt, "auto"), ("dtype", DtypeOpt, Dtype.bfloat16),
    ("quantize", QuantizeOpt, None), ("vision_int8", VisionInt8Opt, False), ("allow_paging", AllowPagingOpt, False),
    ("no_cache", NoCacheOpt, False),
    ("max_tokens", MaxTokensOpt, None), ("temperature", TemperatureOpt, 0.0), ("top_p", TopPOpt, 1.0),
    ("seed", SeedOpt, None), ("system", SystemOpt, None),
    ("no_stream", NoStreamOpt, False), ("json_", JsonOpt, False), ("quiet", QuietOpt, False),
    ("server", ServerOpt, None), ("api_key", ApiKeyOpt, None),
)


def shared_options(*only: str, without: Collection[str] = ()) -> Callable[[Callable], Callable]:
    """Decorate a command to take the shared options (every one, or `only` these; less `without`)
    after its own parameters. The command is called with them gathered into `opts` (tasks.Options,
    see `options`) instead: its body never repeats them.

    Typer reads a command's parameters from its signature, so the decorated command gets one that
    lists both (their annotations evaluated: Typer needs the objects, not strings)."""
    known = {name for name, _, _ in SHARED}
    unknown = (set(only) | set(without)) - known
    if unknown:
        raise ValueError(f"no shared option {', '.join(sorted(unknown))}")
    chosen = [(name, decl, default) for name, decl, default in SHARED
              if (not only or name in only) and name not in without]

    def decorate(fn: Callable) -> Callable:
        # `opts: Options` names a class imported for type checkers only (the task layer is too heavy
        # for --help); it leaves the signature, so it need not resolve.
        own = inspect.signature(fn, eval_str=True, locals={"Options": None})
        if "opts" not in own.parameters:
            raise TypeError(f"{fn.__name__} must take `opts`, the shared options gathered")
        params = [p for p in own.parameters.values() if p.name != "opts"]
        params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=decl)
                   for name, decl, default in chosen]

        @functools.wraps(fn)
        def command(*args, **kwargs):
            opts = options(**{name: kwargs.pop(name) for name, _, _ in chosen})
            return fn(*args, opts=opts, **kwargs)

        command.__signature__ = own.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def options(**given) -> Options:
    """tasks.Options from the shared options a command took, by their parameter names (Typer gives
    enum members; Options holds their values). `json_` is Options.json; a command without
    --no-stream shows whole answers (stream=False). A model command's `no_cache` decides whether
    its answers use the persistent prompt cache (a local model's: with a server, whose cache is
    its own, none is opened, nor torch imported)."""
    from ..options import Options  # noqa: F811 - at run time

    kw = dict(given)
    if isinstance(kw.get("dtype"), enum.Enum):
        kw["dtype"] = kw["dtype"].value
    if "json_" in kw:
        kw["json"] = kw.pop("json_")
    kw["stream"] = not kw.pop("no_stream", True)
    no_cache = kw.pop("no_cache", None)
    opts = Options(**kw)
    if no_cache is False and not opts.server_url():
        opts.prompt_store = prompt_store()
    return opts


def local_only_options(opts: Options) -> list[str]:
    """The loading options given that a server cannot honour (it loaded its model already)."""
    from ..tasks import Options  # noqa: F811 - the defaults, at run time

    plain = Options()
    given = [("--device", opts.device != plain.device), ("--dtype", opts.dtype != plain.dtype),
             ("--quantize", opts.quantize != plain.quantize), ("--vision-int8", opts.vision_int8),
             ("--allow-paging", opts.allow_paging)]
    return [name for name, differs in given if differs]


def prompt_store():
    """The persistent prompt cache in settings.prompt_cache_dir(), capped by
    $DSVL2_PROMPT_CACHE_BYTES (a malformed value is a one-line error)."""
    from ...engine.loading.host_memory import parse_memory_size
    from ...engine.prompt_store import DEFAULT_CAP_BYTES, PromptStore

    text = settings.prompt_cache_bytes()
    cap = parse_memory_size(text, "DSVL2_PROMPT_CACHE_BYTES") if text else DEFAULT_CAP_BYTES
    return PromptStore(settings.prompt_cache_dir(), cap)
