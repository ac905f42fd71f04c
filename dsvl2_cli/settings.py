"""Every environment variable dsvl2 reads, in one place, with its default and meaning.

The values are read when asked for (not at import), so a test or a long-lived server sees the
environment as it is now. README's "Environment" table is this list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "deepseek-ai/deepseek-vl2-tiny"


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    meaning: str


VARIABLES = (
    Variable("DSVL2_MODEL", DEFAULT_MODEL, "the model when -m/--model is not given (a folder or a Hugging Face id)"),
    Variable("DSVL2_DEBUG", "", "1: errors show the Python traceback as well as the one-line message"),
    Variable("DSVL2_KERNELS", "1", "0: never build or use the native CPU kernels (torch everywhere)"),
    Variable("DSVL2_CACHE", "", "base folder of dsvl2's caches in place of $XDG_CACHE_HOME: compiled kernels, saved "
             "prompts and mapped weights go under $DSVL2_CACHE/dsvl2"),
    Variable("DSVL2_PROMPT_CACHE_BYTES", "2000000000", "most disk space for saved image prompts under $XDG_CACHE_HOME/dsvl2/"
             "prompts, in bytes or with a K/M/G/T suffix (powers of 1024); least recently used go first"),
    Variable("DSVL2_MMAP", "1", "0: CPU loads copy every weight out of the files instead of mapping a converted "
             "layout (written once per model and dtype) in place"),
    Variable("DSVL2_MMAP_DIR", "", "folder for the converted layouts that CPU loads map; default <cache>/mapped "
             "(the cache folder as for DSVL2_CACHE)"),
    Variable("DSVL2_VISION_INT8", "0", "1: the vision tower's linears in int8 (AVX512-VNNI CPUs, bf16 weights; "
             "1.7-1.9x faster tower, small accuracy cost), as --vision-int8"),
    Variable("DSVL2_BF16_PRODUCTS", "auto", "how a bf16 model's prefill and vision products run on CPU: float32 "
             "(converted per call; where the CPU lacks bf16 dot products, ~6x faster), native (torch's bf16 GEMMs), "
             "auto: float32 exactly where the CPU lacks them (no AVX512-BF16/AMX)"),
    Variable("DSVL2_BENCH_DIR", "~/.cache/dsvl2/bench", "where `dsvl2 bench` writes its synthetic checkpoints"),
    Variable("DSVL2_MEMORY_LIMIT", "", "cap on the memory dsvl2 plans to use, in bytes or with a K/M/G/T suffix "
             "(powers of 1024: 12G, 800M, 1.5G); the lower of this and what the machine has is used"),
    Variable("CC", "cc, else gcc", "the C compiler for the native CPU kernels (may include arguments)"),
    Variable("NO_COLOR", "", "set: no colour and no pictures on stdout, even on a terminal"),
    Variable("XDG_CACHE_HOME", "~/.cache", "base folder of caches (used when DSVL2_CACHE is not set)"),
    Variable("XDG_STATE_HOME", "~/.local/state", "base folder of the interactive chat's history"),
    Variable("DSVL2_SERVER", "", "URL of a dsvl2 (or other OpenAI-compatible) server to use instead of a local model"),
    Variable("DSVL2_API_KEY", "", "API key: the one `dsvl2 serve` requires, and the one the client sends"),
    Variable("HF_HUB_OFFLINE", "", "1: never download; models must already be in the Hugging Face cache"),
)


def _get(name: str) -> str:
    return os.environ.get(name, "")


def _truthy(value: str) -> bool:
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def default_model() -> str:
    return _get("DSVL2_MODEL").strip() or DEFAULT_MODEL


def debug() -> bool:
    return _truthy(_get("DSVL2_DEBUG"))


def kernels_enabled() -> bool:
    return _get("DSVL2_KERNELS").strip() != "0"


def cache_dir() -> Path:
    """dsvl2's cache folder: $DSVL2_CACHE/dsvl2, else $XDG_CACHE_HOME/dsvl2, else ~/.cache/dsvl2."""
    base = _get("DSVL2_CACHE") or _get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dsvl2"


def prompt_cache_dir() -> Path:
    """Where the persistent prompt cache keeps its entries: cache_dir()/prompts."""
    return cache_dir() / "prompts"


def prompt_cache_bytes() -> str:
    """$DSVL2_PROMPT_CACHE_BYTES as given, stripped ("" when unset: the 2 GB default)."""
    return _get("DSVL2_PROMPT_CACHE_BYTES").strip()


def mmap_enabled() -> bool:
    return _get("DSVL2_MMAP").strip() != "0"


def vision_int8() -> bool:
    """$DSVL2_VISION_INT8 set to 1 (or true/yes/on): the int8 vision tower by default."""
    return _truthy(_get("DSVL2_VISION_INT8"))


BF16_PRODUCTS = ("auto", "native", "float32")


def bf16_products() -> str:
    """$DSVL2_BF16_PRODUCTS: auto (default), native or float32 (engine/native/f32_products.py)."""
    value = _get("DSVL2_BF16_PRODUCTS").strip().lower() or "auto"
    if value not in BF16_PRODUCTS:
        from .errors import InputError

        raise InputError(f"DSVL2_BF16_PRODUCTS={value}: expected one of {', '.join(BF16_PRODUCTS)}")
    return value


def mapped_dir() -> Path:
    """Where the memory-mapped layouts live: $DSVL2_MMAP_DIR, else <cache_dir()>/mapped."""
    given = _get("DSVL2_MMAP_DIR").strip()
    return Path(given).expanduser() if given else cache_dir() / "mapped"


def state_dir() -> Path:
    return Path(_get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "dsvl2"


def bench_dir() -> Path:
    return Path(_get("DSVL2_BENCH_DIR") or Path.home() / ".cache" / "dsvl2" / "bench").expanduser()


def memory_limit() -> str:
    """$DSVL2_MEMORY_LIMIT as given, stripped ("" when unset); engine/loading/host_memory.py parses it."""
    return _get("DSVL2_MEMORY_LIMIT").strip()


def c_compiler() -> str:
    """$CC as given (it may carry arguments, e.g. "ccache gcc"); "" when unset."""
    return _get("CC").strip()


def no_color() -> bool:
    return bool(_get("NO_COLOR"))


def hf_offline() -> bool:
    return _get("HF_HUB_OFFLINE").strip().lower() in ("1", "true", "yes", "on")


def server_url() -> str:
    """$DSVL2_SERVER without a trailing slash; "" when unset (use a local model)."""
    return _get("DSVL2_SERVER").strip().rstrip("/")


def api_key() -> str:
    return _get("DSVL2_API_KEY").strip()
