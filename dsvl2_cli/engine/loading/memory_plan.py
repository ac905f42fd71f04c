"""The memory plan of a model before loading: bytes it needs, from config.json alone (no weight
is read), for one compute dtype and quantization, batch 1:
  weights     by component, as `memory.planned_weight_memory` (the tensor table of the config);
  cache       the KV (MHA) or latent (MLA) cache at the full context (max_position_embeddings);
  vision      the peak of encoding one batch of TILE_BATCH tiles through SigLIP and the projector;
  prefill     the peak of one prefill chunk of DEFAULT_PREFILL_CHUNK positions at the full context;
  loading     the transient while the weights are read (mapped file pages + one stacked part);
  overhead    torch, Python, the tokenizer and the allocator's slack (RUNTIME_OVERHEAD, measured).
total = weights + overhead + max(cache + max(vision, prefill), loading): the cache and the
activations live together while generating; loading happens before either exists.
fit.py sets it against what this process may use (host_memory.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ...model.config import ModelConfig
from ...quant_methods import AUTO_ORDER
from ..native import f32_products
from ..events import DEFAULT_PREFILL_CHUNK
from .host_memory import GB, gb
from .memory import planned_weight_memory
from ..quant.format import QuantSpec, choose_spec, parse_method, read_spec
from ..vlmodel import TILE_BATCH
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
        return (f"{gb(self.total)} in {self.label()}: weights {gb(self.weight_bytes)} ({parts}), "
                f"cache {gb(self.cache)} at {self.context} positions, vision {self.vision / GB:.2f} GB, "
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
    """The memory of the opt-in int8 vision tower's packed weights (engine/native/vision_int8.py): each block's
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
