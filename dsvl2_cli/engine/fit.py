"""Fit before loading: a memory plan from config.json (no weights read), what this process may
use, and a one-line refusal naming the quantizations that would fit.

The plan, in bytes, for one model, compute dtype and quantization, batch 1:
  weights     by component, as `memory.planned_weight_memory` (the tensor table of the config);
  cache       the KV (MHA) or latent (MLA) cache at the full context (max_position_embeddings);
  vision      the peak of encoding one batch of TILE_BATCH tiles through SigLIP and the projector;
  prefill     the peak of one prefill chunk of DEFAULT_PREFILL_CHUNK positions at the full context;
  loading     the transient while the weights are read (mapped file pages + one stacked part);
  overhead    torch, Python, the tokenizer and the allocator's slack (RUNTIME_OVERHEAD, measured).
total = weights + overhead + max(cache + max(vision, prefill), loading): the cache and the
activations live together while generating; loading happens before either exists.

What this process may use (`available_memory`): MemAvailable, lowered by the cgroup's limit minus
its usage (containers), or a CUDA device's free memory; DSVL2_MEMORY_LIMIT caps either. Memory-
mapped weights paged from disk are not planned for (yet): `allow_paging=True` only warns.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import settings
from ..errors import Dsvl2Error, MemoryFitError
from ..model.config import ModelConfig
from . import f32_products
from .generate import DEFAULT_PREFILL_CHUNK
from .runtime import TILE_BATCH, vision_int8_unavailable
from .memory import planned_weight_memory
from .quant.format import QuantSpec, choose_spec, parse_method, read_spec
from .weights import RELEASE_BYTES

# What a process holds besides weights, cache and activations: torch and Python (`python -c
# "import torch, dsvl2_cli.engine.runtime"`: 0.30 GB RSS on Linux x86-64, torch 2.13 CPU build),
# the tokenizer of a 129k vocabulary, PIL, the processor, the worker threads and the allocator's
# slack. Measured as RSS after loading minus the weight bytes, real tiny shapes: 0.40 GB (bf16),
# 0.43 GB (int4) (benchmarks/bench_memory_plan.py). The one measured number in the plan.
RUNTIME_OVERHEAD = 400 * 2**20
# A CUDA context (kernels, cuBLAS workspace) on the device itself: an estimate, not measured here.
CUDA_CONTEXT_OVERHEAD = 600 * 2**20
FILE_DTYPE_BYTES = 2  # every DeepSeek-VL2 checkpoint stores bfloat16
AUTO_ORDER = ("none", "int8", "int4")  # `--quantize auto` takes the first that fits
GB = 1e9


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a model needs, planned from its config; `total` is what must fit."""

    dtype: str
    method: str  # "none", "int8", "int4", "nf4"
    weights: Mapping[str, int] = field(compare=False)  # memory.COMPONENTS + "total"
    cache: int
    context: int  # positions the cache is planned for
    vision: int
    prefill: int
    loading: int
    overhead: int
    device: str = "cpu"

    @property
    def weight_bytes(self) -> int:
        return self.weights["total"]

    @property
    def running(self) -> int:
        """Cache and activations while generating (vision and prefill do not overlap)."""
        return self.cache + max(self.vision, self.prefill)

    @property
    def total(self) -> int:
        return self.weight_bytes + self.overhead + max(self.running, self.loading)

    def label(self) -> str:
        return self.dtype if self.method == "none" else f"{self.dtype} with {self.method} experts"

    def describe(self) -> str:
        """One line: the total and its terms, GB with one decimal."""
        parts = ", ".join(f"{k} {self.weights[k] / GB:.2f}" for k in self.weights if k != "total" and self.weights[k])
        return (f"{_gb(self.total)} in {self.label()}: weights {_gb(self.weight_bytes)} ({parts}), "
                f"cache {_gb(self.cache)} at {self.context} positions, vision {self.vision / GB:.2f} GB, "
                f"prefill {self.prefill / GB:.2f} GB, loading {self.loading / GB:.2f} GB, "
                f"runtime {self.overhead / GB:.2f} GB")

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "method": self.method, "device": self.device, "weights": dict(self.weights),
                "cache": self.cache, "context": self.context, "vision": self.vision, "prefill": self.prefill,
                "loading": self.loading, "overhead": self.overhead, "total": self.total}


def vision_peak(cfg: ModelConfig, dtype_bytes: int, tiles: int = TILE_BATCH) -> int:
    """Peak activations of encoding `tiles` tiles at once (SigLIP block by block, then the projector)."""
    v, b = cfg.vision, dtype_bytes
    t = v.grid * v.grid  # 729 patches per tile, no class token
    rows = tiles * t
    pixels = tiles * 3 * v.image_size * v.image_size * 4  # the float32 tiles, held throughout
    residual = 2 * rows * v.width * b  # x and the block input kept for the skip connection
    # attention: LayerNorm output, the fused qkv projection, q/k/v made contiguous for SDPA, and
    # the scores of every head in float32 with their softmax (the math path: the worst case)
    attention = (rows * v.width * b + 3 * rows * v.width * b * 2
                 + 2 * tiles * v.heads * t * t * 4 + rows * v.width * b)
    mlp = rows * v.width * b + 2 * rows * v.mlp_hidden * b + rows * v.width * b  # norm, fc1 + GELU, fc2
    p = cfg.projector
    side = cfg.tokens_per_tile_side
    projector = tiles * side * side * (p.input_dim * p.downsample_ratio ** 2 + 2 * p.n_embed) * b
    return pixels + residual + max(attention, mlp, projector)


def prefill_peak(cfg: ModelConfig, dtype_bytes: int, context: int, chunk: int = DEFAULT_PREFILL_CHUNK) -> int:
    """Peak activations of one prefill chunk whose attention reaches `context` cached positions."""
    lm, b = cfg.language, dtype_bytes
    c, d, length = min(chunk, context), lm.hidden_size, context
    embeds = length * d * b  # the whole prompt's embeddings, held through every chunk
    residual = 2 * c * d * b + c * d * 4  # x, the norm output, RMSNorm's float32 statistics
    h = lm.num_attention_heads
    scores = 2 * h * c * length * 4  # float32 scores and softmax of the chunk over the context
    if lm.use_mla:
        # q (nope + rope), the latent of the chunk, and the keys/values decompressed for the
        # whole context: (H, L, nope + rope) and (H, L, v)
        attention = (c * h * lm.q_head_dim * b * 2 + c * lm.cache_values_per_token() * b
                     + length * h * (lm.qk_nope_head_dim + lm.v_head_dim) * b
                     + length * h * (lm.q_head_dim + lm.v_head_dim) * b + scores + c * h * lm.v_head_dim * b)
    else:
        kv_rep = h // lm.num_key_value_heads
        # q/k/v and their rotated copies; grouped heads repeated over the context
        attention = (3 * c * h * lm.head_dim * b * 2 + (2 * length * h * lm.head_dim * b if kv_rep > 1 else 0)
                     + scores + c * h * lm.head_dim * b)
    dense = c * (3 * lm.intermediate_size + d) * b  # gate_up (2I), the activation (I), down
    if lm.n_routed_experts:
        k, m, e = lm.num_experts_per_tok, lm.moe_intermediate_size, lm.n_routed_experts
        rows = c * k  # token copies, sorted by expert
        routed = rows * (d + 3 * m + 2 * d) * b + rows * d * 4 * 2  # gathered x, gate_up + act, out, unsorted; float32 mix
        router = 2 * c * e * 4
        shared = c * 3 * m * (lm.n_shared_experts or 0) * b
        moe = routed + router + shared
    else:
        moe = 0
    logits = lm.vocab_size * (4 + b)  # the last position only (last_only=True)
    return embeds + residual + max(attention, dense, moe) + logits


def loading_peak(cfg: ModelConfig, spec: QuantSpec | None) -> int:
    """The transient while loading: the mapped file pages not yet let go. `weights.load_into` drops
    them once more than RELEASE_BYTES were read, so at most RELEASE_BYTES plus the pages of the
    largest tensor built (the embedding table, or one MoE layer's stacked gate_up). The tensor
    built is a weight (counted there); quantizing while loading packs one part, then drops both
    the float stack and its pages, which stays within the same bound. `spec` is kept for callers
    (a pre-quantized folder reads smaller parts; the bound holds)."""
    lm = cfg.language
    d = lm.hidden_size
    largest = max(lm.vocab_size * d, 2 * lm.intermediate_size * d,
                  (lm.n_routed_experts or 0) * 2 * lm.moe_intermediate_size * d) * FILE_DTYPE_BYTES
    return RELEASE_BYTES + largest


def f32_products_bytes(cfg: ModelConfig, chunk: int = DEFAULT_PREFILL_CHUNK) -> int:
    """What float32 products (f32_products.py: a bf16 model on a CPU without bf16 dot products) add
    to a prefill or vision peak: the largest weight converted at once (a dense MLP's fused gate_up,
    or the vision MLP's fc1; routed experts convert one expert at a time) in float32, and a chunk's
    float32 input and output of that product."""
    lm, v = cfg.language, cfg.vision
    d, inner = lm.hidden_size, 2 * lm.intermediate_size
    weight = max(inner * d, v.mlp_hidden * v.width) * 4
    rows = max(chunk, TILE_BATCH * v.grid * v.grid)
    return weight + rows * (max(d, v.width) + max(inner, v.mlp_hidden)) * 4


def vision_int8_bytes(cfg: ModelConfig) -> int:
    """The memory of the opt-in int8 vision tower's packed weights (engine/vision_int8.py): each block's
    qkv, proj, fc1 and fc2 packed as int8_kernels.pack_int8 does (N up to 64 columns, K up to 4, int8
    codes, then a float32 scale and an int32 correction per column). ~0.41 GB for SigLIP-SO400M."""
    w, h = cfg.vision.width, cfg.vision.mlp_hidden

    def packed(n: int, k: int) -> int:
        n_pad, k_pad = -(-n // 64) * 64, -(-k // 4) * 4
        return n_pad * k_pad + 8 * n_pad

    return cfg.vision.layers * (packed(3 * w, w) + packed(w, w) + packed(h, w) + packed(w, h))


def plan(cfg: ModelConfig, dtype: torch.dtype, spec: QuantSpec | None, device: str | torch.device = "cpu",
         context: int | None = None, vision_int8: bool = False) -> MemoryPlan:
    """The memory plan of `cfg` in `dtype` with routed experts as `spec` (None: in `dtype`), batch 1,
    the cache at `context` positions (default: the model's full context); `vision_int8`: with the
    opt-in int8 vision tower's packed weights (a weights component of their own)."""
    b = torch.empty((), dtype=dtype).element_size()
    lm = cfg.language
    context = lm.max_position_embeddings if context is None else int(context)
    weights = planned_weight_memory(cfg, dtype, spec)
    if vision_int8:
        extra = vision_int8_bytes(cfg)
        weights = {**weights, "vision_int8": extra, "total": weights["total"] + extra}
    cache = lm.cache_values_per_token() * lm.num_hidden_layers * b * context
    dev = torch.device(device)
    overhead = CUDA_CONTEXT_OVERHEAD if dev.type == "cuda" else RUNTIME_OVERHEAD
    f32 = f32_products_bytes(cfg) if f32_products.wanted(dtype, dev) else 0
    return MemoryPlan(dtype=_dtype_name(dtype), method=spec.method if spec else "none", weights=weights,
                      cache=cache, context=context, vision=vision_peak(cfg, b) + f32,
                      prefill=prefill_peak(cfg, b, context) + f32, loading=loading_peak(cfg, spec),
                      overhead=overhead, device=dev.type)


def _spec(method: str) -> QuantSpec | None:
    return None if method == "none" else QuantSpec.make(method)


def plan_for_folder(path: str | os.PathLike, dtype: torch.dtype, quantize: str | None = None,
                    device: str | torch.device = "cpu") -> MemoryPlan:
    """The plan of a model folder from its config.json (and its pre-quantized spec, if any); no
    weights are read. quantize as `load()`: None (as the folder is), "none", "int8", "int4", "nf4"."""
    cfg = ModelConfig.from_dir(path)
    return plan(cfg, dtype, choose_spec(quantize, read_spec(path), str(path)), device)


def plans_for_folder(path: str | os.PathLike, dtype: torch.dtype, device: str | torch.device = "cpu",
                     methods: tuple[str, ...] = AUTO_ORDER, vision_int8: bool = False) -> dict[str, MemoryPlan]:
    """Plans by method for `check_fits` / `choose_quantization`: `methods` for a float folder, the
    folder's own method only for a pre-quantized one (its float experts are gone)."""
    cfg = ModelConfig.from_dir(path)
    folder = read_spec(path)
    if folder is not None:
        return {folder.method: plan(cfg, dtype, folder, device, vision_int8=vision_int8)}
    return {m: plan(cfg, dtype, _spec(parse_method(m)), device, vision_int8=vision_int8) for m in methods}


# -------------------------------------------------------------------------------- what is available

@dataclass(frozen=True)
class Available:
    """Bytes this process may use and where the number comes from (the lowest of `sources`)."""

    bytes: int
    source: str
    sources: Mapping[str, int] = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        return f"{_gb(self.bytes)} ({self.source})"


_SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_LIMIT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_memory_size(text: str, what: str = "DSVL2_MEMORY_LIMIT") -> int:
    """"12G", "800M", "1.5G", "1073741824" -> bytes. Suffixes K/M/G/T are powers of 1024 (so
    "16G" = 16 GiB: what `free -g` and container limits such as `docker -m 16g` mean); "KB"/"KiB"
    read the same. A malformed or zero value is a Dsvl2Error naming `what`."""
    m = _LIMIT.match(text or "")
    if m is None:
        raise Dsvl2Error(f"{what}={text!r} is not a memory size; use bytes or a number with K, M, G or T "
                         f"(powers of 1024), e.g. 12G or 800M")
    value = int(float(m.group(1)) * _SUFFIXES[m.group(2).upper()])
    if value <= 0:
        raise Dsvl2Error(f"{what}={text!r} must be more than 0 bytes")
    return value


def memory_limit() -> int | None:
    """DSVL2_MEMORY_LIMIT in bytes (None when unset)."""
    text = settings.memory_limit()
    return parse_memory_size(text) if text else None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def mem_available(meminfo: str | os.PathLike = "/proc/meminfo") -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none: not Linux)."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def cgroup_headroom(proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
                    cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> int | None:
    """What the memory cgroup still allows: limit minus usage (page cache that can be dropped,
    inactive_file, not counted as used), the lowest over the cgroup and its ancestors; None
    without a limit. v2: memory.max / memory.current; v1: memory.limit_in_bytes / usage_in_bytes.
    Inside a container the cgroup namespace puts our cgroup at the root, so the root is tried too."""
    root = Path(cgroup_root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    v2_path, v1_path = None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
        elif "memory" in parts[1].split(","):
            v1_path = parts[2]
    best = None

    def consider(folder: Path, limit_name: str, usage_name: str, inactive_key: str) -> None:
        nonlocal best
        limit = _read_int(folder / limit_name)  # "max" (v2) reads as None
        usage = _read_int(folder / usage_name)
        if limit is None or usage is None or limit >= 2**60:  # v1 "no limit" is ~2**63
            return
        used = max(0, usage - _stat_value(folder / "memory.stat", inactive_key))
        room = max(0, limit - used)
        best = room if best is None else min(best, room)

    def folders(base: Path, rel: str | None) -> list[Path]:
        out, seen = [], set()
        if rel is not None:
            p = Path(rel.strip("/"))
            while True:
                out.append(base / p)
                if p == Path("."):
                    break
                p = p.parent
        out.append(base)
        return [f for f in out if not (f in seen or seen.add(f))]

    if v2_path is not None or (root / "memory.max").exists():
        base = root / "unified" if (root / "unified" / "cgroup.controllers").exists() else root
        for f in folders(base, v2_path):
            consider(f, "memory.max", "memory.current", "inactive_file")
    if v1_path is not None:
        for f in folders(root / "memory", v1_path):
            consider(f, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    return best


def available_memory(device: str | torch.device = "cpu", *, meminfo: str | os.PathLike = "/proc/meminfo",
                     proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
                     cgroup_root: str | os.PathLike = "/sys/fs/cgroup", limit: int | None = None) -> Available:
    """What this process may use on `device`: for the CPU, MemAvailable or the cgroup's headroom
    when lower; for CUDA, the device's free memory; DSVL2_MEMORY_LIMIT (or `limit`) caps either."""
    dev = torch.device(device)
    sources: dict[str, int] = {}
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        sources[f"free memory of {dev}"] = int(free)
    else:
        for name, value in (("MemAvailable", mem_available(meminfo)),
                            ("cgroup memory limit", cgroup_headroom(proc_cgroup, cgroup_root))):
            if value is not None:
                sources[name] = value
    cap = memory_limit() if limit is None else limit
    if cap is not None:
        sources["DSVL2_MEMORY_LIMIT"] = cap
    if not sources:  # no /proc (macOS, Windows): only what psutil-free Python can tell
        try:
            sources["physical memory"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            sources["unknown"] = 2**62
    source = min(sources, key=lambda k: (sources[k], k != "DSVL2_MEMORY_LIMIT"))
    return Available(sources[source], source, sources)


# -------------------------------------------------------------------------------- the verdict

def _alternatives(plans: Mapping[str, MemoryPlan], chosen: str, available: Available) -> str:
    others = [(m, p) for m, p in plans.items() if m != chosen]
    fits = [f"--quantize {m} needs {_gb(p.total)} (fits)" for m, p in others if p.total <= available.bytes]
    if fits:
        return "; ".join(fits)
    smallest = min(plans.values(), key=lambda p: p.total)
    hint = "" if smallest.method == chosen else f" (--quantize {smallest.method} needs {_gb(smallest.total)})"
    return f"no quantization fits{hint}: use a smaller model, free memory, or raise the limit"


def check_fits(name: str, plan_by_method: Mapping[str, MemoryPlan], available: Available,
               method: str | None = None, *, allow_paging: bool = False) -> str | None:
    """None when `plan_by_method[method]` (default: the first) fits in `available`; else a
    MemoryFitError whose one-line message names the need, what is available and the methods of
    `plan_by_method` that fit. allow_paging=True: the same line returned as a warning instead."""
    method = next(iter(plan_by_method)) if method is None else method
    p = plan_by_method[method]
    if p.total <= available.bytes:
        return None
    message = (f"{name} needs {_gb(p.total)} in {p.label()}, {_gb(available.bytes)} is available "
               f"({available.source}); {_alternatives(plan_by_method, method, available)}")
    if allow_paging:
        return message.split(";")[0] + "; the weights will be paged from disk, which is slow"
    raise MemoryFitError(message)


def choose_quantization(name: str, plan_by_method: Mapping[str, MemoryPlan], available: Available, *,
                        allow_paging: bool = False) -> tuple[str, str]:
    """`--quantize auto`: the first of none, int8, int4 (those in `plan_by_method`) that fits, and a
    line saying so. None fits: the MemoryFitError of the smallest (or, allow_paging, it with a warning)."""
    order = [m for m in AUTO_ORDER if m in plan_by_method] + [m for m in plan_by_method if m not in AUTO_ORDER]
    for m in order:
        p = plan_by_method[m]
        if p.total <= available.bytes:
            return m, f"--quantize auto: {m} ({_gb(p.total)} of {available.describe()})"
    smallest = min(order, key=lambda m: plan_by_method[m].total)
    warning = check_fits(name, {smallest: plan_by_method[smallest]}, available, allow_paging=allow_paging)
    return smallest, f"--quantize auto: {smallest}; {warning}"


@dataclass(frozen=True)
class Fit:
    """What `check_load` decided: the load may go ahead with `quantize` (what to pass on: the
    request, `auto` replaced by its choice), `plan` is the plan of the method in use."""

    quantize: str | None
    method: str  # the method in use: "none", "int8", "int4", "nf4" (a pre-quantized folder's own)
    plan: MemoryPlan
    available: Available
    note: str | None = None  # --quantize auto: what it chose, one line
    warning: str | None = None  # allow_paging: the refusal, as a one-line warning


def check_load(path: str | os.PathLike, name: str, dtype: torch.dtype, device: str | torch.device,
               quantize: str | None = None, *, allow_paging: bool = False, vision_int8: bool = False) -> Fit:
    """The check `load()` makes before reading any weight: the plan of `quantize` (None: the folder
    as it is; "auto": the first of none, int8, int4 that fits) against `available_memory(device)`.
    Too big: MemoryFitError, or with allow_paging the same line as `Fit.warning`. vision_int8: the
    opt-in int8 vision tower is asked for (counted where it will run: CPU, bf16, VNNI)."""
    auto = quantize is not None and str(quantize).lower() == "auto"
    folder = read_spec(path)
    available = available_memory(device)
    int8 = vision_int8 and vision_int8_unavailable(dtype, torch.device(device)) is None
    if auto:
        plans = plans_for_folder(path, dtype, device, vision_int8=int8)
        method, line = choose_quantization(name, plans, available, allow_paging=allow_paging)
        fits = plans[method].total <= available.bytes
        return Fit(method, method, plans[method], available, line if fits else None, None if fits else line)
    spec = choose_spec(quantize, folder, str(path))  # a method the folder cannot load fails here, first
    method = spec.method if spec else "none"
    wanted = AUTO_ORDER if method in AUTO_ORDER else (*AUTO_ORDER, method)
    plans = plans_for_folder(path, dtype, device, wanted, vision_int8=int8)
    warning = check_fits(name, plans, available, method, allow_paging=allow_paging)
    return Fit(quantize, method, plans[method], available, None, warning)


# -------------------------------------------------------------------------------- out of memory

_RAM_PATTERNS = (re.compile(r"unable to mmap.*Cannot allocate memory", re.IGNORECASE | re.DOTALL),
                 re.compile(r"DefaultCPUAllocator: (can't|not enough memory)", re.IGNORECASE),
                 re.compile(r"\[enforce fail at alloc_cpu", re.IGNORECASE))
_GPU_PATTERNS = (re.compile(r"CUDA out of memory", re.IGNORECASE),
                 re.compile(r"CUDA error: out of memory", re.IGNORECASE),
                 re.compile(r"MPS backend out of memory", re.IGNORECASE))
_ADVICE = "use --quantize int4, a smaller model, fewer or smaller images, or a shorter conversation"


def describe_oom(err: BaseException) -> str | None:
    """A one-line message for an out-of-memory error from torch or Python (RAM or GPU memory, and
    what to do); None for any other error. Follows __cause__ / __context__."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
        if (oom_type is not None and isinstance(err, oom_type)) or any(p.search(text) for p in _GPU_PATTERNS):
            where = "MPS" if "MPS" in text else "GPU"
            return (f"out of {where} memory while running the model; {_ADVICE}, "
                    f"or --device cpu if the machine has the RAM")
        if isinstance(err, MemoryError) or any(p.search(text) for p in _RAM_PATTERNS):
            return f"out of memory (RAM) while running the model; {_ADVICE}"
        err = err.__cause__ or err.__context__
    return None


def table_rows(plans: Mapping[str, MemoryPlan], budgets_gb: tuple[int, ...] = (8, 16, 24, 32)) -> list[str]:
    """Rows for README's "Memory" table: method, weights, peak, fits in each budget (GB = 1e9)."""
    rows = []
    for m, p in plans.items():
        fits = " ".join("yes" if p.total <= g * GB else "no" for g in budgets_gb)
        rows.append(f"{m:5} weights {_gb(p.weight_bytes):>8} peak {_gb(p.total):>8}  {fits}")
    return rows

