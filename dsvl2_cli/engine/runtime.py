"""The library's entry point: `load()` a checkpoint and get a `VLModel` that prepares
conversations and runs the model. The CLI sits on this and nothing lower.

`quantize=` ("int8", "int4", "nf4"; see quant.py) quantizes the routed experts while loading, one
layer at a time; a folder written by `quantize_folder` (`dsvl2 quantize`) loads quantized as it is.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import settings
from ..errors import Dsvl2Error, ModelError
from ..model.config import ModelConfig
from ..model.language import rope_table
from ..model.vlm import DeepseekVL2
from . import f32_products as f32_products_module
from . import fast, hub, int8_kernels, kernels, mapped, memory, quant
from . import vision_int8 as vision_int8_module
from .cache import ModelCache, new_model_cache
from .processor import Message, Prepared, PreparedImage, Processor, ProcessorSettings
from .quant import QuantSpec
from .tokenizer import Tokenizer
from .weights import TensorReader, check_tensors, expected_tensors, load_into, read_headers, weight_files

if TYPE_CHECKING:  # fit imports this module (TILE_BATCH); load() imports it when called
    from .fit import Fit

# Tiles through the vision tower per batch: 4 x 729 rows keep its matmuls efficient while a
# 10-tile page does not hold all of its activations at once.
TILE_BATCH = 4

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise Dsvl2Error(f"dtype {dtype} is not supported; use bfloat16, float16 or float32")
        return dtype
    name = (dtype or "bfloat16").lower()
    if name not in DTYPES:
        raise Dsvl2Error(f"dtype {dtype!r} is not supported; use bfloat16, float16 or float32")
    return DTYPES[name]


def resolve_device(device: str | torch.device | None) -> torch.device:
    name = str(device or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise Dsvl2Error(f"device {device!r} is not valid; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Dsvl2Error("device cuda asked for, but this PyTorch has no usable CUDA GPU; use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise Dsvl2Error("device mps asked for, but it is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise Dsvl2Error(f"device {device!r} is not supported; use auto, cpu, cuda or mps")
    return dev


def load_model(model_dir: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
               on_progress: Callable[[int, int], None] | None = None,
               quantize: str | None = None, mmap: bool | None = None, vision_int8: bool = False) -> DeepseekVL2:
    """Strict-check the checkpoint against `cfg`, then build the model and fill its weights.

    quantize: None (as the folder is: float, or its pre-quantized method), "none", "int8", "int4"
    or "nf4" (routed experts quantized as each layer is read; a pre-quantized folder only loads
    with its own method).
    mmap: None (settings: DSVL2_MMAP, on by default) or a bool. On CPU the weights (quantized
    experts too, in their kernel's layout) are views of a memory-mapped converted layout
    (engine/mapped.py); otherwise copied.
    vision_int8: the vision tower's linears in int8 (engine/vision_int8.py) where the CPU kernel
    is there, else a one-line warning and the dtype's path; `model.vision_int8` says which runs.
    """
    folder_spec = quant.read_spec(model_dir)
    spec = quant.choose_spec(quantize, folder_spec, str(model_dir))
    infos = read_headers(weight_files(model_dir))
    if folder_spec is not None:
        expected, dtypes = quant.expected_quantized(cfg, folder_spec)
        check_tensors(infos, expected, str(model_dir), dtypes)
        experts = quant.packed_layer_hook(folder_spec, device)
    else:
        check_tensors(infos, expected_tensors(cfg), str(model_dir))
        experts = quant.quantize_layer_hook(spec, cfg, device) if spec is not None else None
    with torch.device("meta"):
        model = DeepseekVL2(cfg)
    reader = TensorReader(infos)
    use_mmap = (settings.mmap_enabled() if mmap is None else mmap) and device.type == "cpu"
    try:
        # Quantized experts are mapped in their CPU kernel's layout (quant.kernel_layout), built once.
        layout = quant.kernel_layout(spec, cfg, device) if use_mmap and spec is not None else None
        if not (use_mmap and mapped.load_mapped(model, model_dir, reader, cfg, dtype, on_progress,
                                                experts=experts, layout=layout)):
            load_into(model, reader, cfg, dtype, device, on_progress, experts=experts)
    finally:
        reader.close()
    lm = cfg.language
    rope_dim = lm.qk_rope_head_dim if lm.use_mla else lm.head_dim
    model.language.rope_angles = rope_table(rope_dim, lm.max_position_embeddings, lm.rope_theta).to(device)
    model.quantization = spec
    fast.install(model)  # CPU: native decode kernels and few-query attention (see fast.py)
    model.vision_int8 = False
    if vision_int8:
        why = vision_int8_unavailable(dtype, device)
        if why:
            warnings.warn(f"int8 vision is not available here ({why}); the vision tower runs in {_dtype_name(dtype)}",
                          stacklevel=2)
        else:
            model.vision_int8 = vision_int8_module.install(model.vision, model_dir if use_mmap else None) > 0
    return model.eval()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def vision_int8_unavailable(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the int8 vision tower cannot run with this dtype and device here (None: it can)."""
    if device.type != "cpu":
        return f"it runs on CPU, this model is on {device.type}"
    if dtype != torch.bfloat16:
        return f"it needs bfloat16 weights, not {_dtype_name(dtype)}"
    if not kernels.available():
        return f"no native CPU kernels: {kernels.status().removeprefix('torch (').removesuffix(')')}"
    if not int8_kernels.int8_gemm_available():
        return "this CPU or kernel build has no AVX512-VNNI"
    return None


@dataclass
class VLModel:
    """A loaded checkpoint: config, weights, tokenizer and processor on one device and dtype."""

    name: str
    path: Path
    source: str
    config: ModelConfig
    model: DeepseekVL2
    tokenizer: Tokenizer
    processor: Processor

    @property
    def quantization(self) -> QuantSpec | None:
        """How the routed experts are stored (None: in the compute dtype)."""
        return getattr(self.model, "quantization", None)

    def weight_memory(self) -> dict[str, int]:
        """Bytes of weights by component (see memory.weight_memory)."""
        return memory.weight_memory(self.model)

    @property
    def vision_int8(self) -> bool:
        """Whether the vision tower's linears run in int8 (load(..., vision_int8=True) where available)."""
        return bool(getattr(self.model, "vision_int8", False))

    @property
    def f32_products(self) -> bool:
        """Whether bf16 prefill and vision products run in float32 (engine/f32_products.py: a
        CPU without bf16 dot products, or DSVL2_BF16_PRODUCTS=float32)."""
        return f32_products_module.installed(self.model.language)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def prepare(self, messages: Sequence[Message], *, system: str | None = None,
                max_tiles: int | Sequence[int | None] | None = None) -> Prepared:
        return self.processor.prepare(messages, system=system, max_tiles=max_tiles)

    def new_cache(self, batch: int = 1, pad: torch.Tensor | None = None) -> ModelCache:
        """An empty cache for `batch` rows; pad (B,) int64: left-padding positions per row."""
        return new_model_cache(self.config.language, batch, pad, self.dtype, self.device)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> embeddings (B, T, D), no images (decode steps)."""
        return self.model.embed(ids)

    def embed_prompt(self, ids: torch.Tensor, image_mask: torch.Tensor,
                     images: Sequence[PreparedImage] = ()) -> torch.Tensor:
        """Prompt ids (B, T) and image mask (B, T) -> embeddings (B, T, D) with `images` (in
        row-major prompt order) encoded, TILE_BATCH tiles at a time, and laid out."""
        pixels = torch.cat([img.pixel_values for img in images]) if images else None
        return self.model.embed(ids, image_mask, pixels, [img.grid for img in images], tile_batch=TILE_BATCH)

    def forward(self, embeds: torch.Tensor, cache: ModelCache | None = None, last_only: bool = False) -> torch.Tensor:
        """embeds (B, T, D) -> logits (B, T, V) float32 ((B, 1, V) with last_only); with a cache
        the positions follow what it holds, and it grows by T."""
        return self.model.language(embeds, cache, last_only)

    @torch.inference_mode()
    def embed(self, prepared: Prepared) -> torch.Tensor:
        """Prompt embeddings (1, T, D) with the images encoded and laid out."""
        return self.model.embed(
            prepared.input_ids[None], prepared.image_mask[None], prepared.pixel_values(),
            [img.grid for img in prepared.images],
        )

    @torch.inference_mode()
    def logits(self, prepared: Prepared) -> torch.Tensor:
        """Full uncached forward pass: logits (T, V) float32 for every prompt position."""
        return self.forward(self.embed(prepared))[0]


def load(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    download: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    quantize: str | None = None,
    memory_check: bool = True,
    allow_paging: bool = False,
    on_fit: Callable[[Fit], None] | None = None,
    mmap: bool | None = None,
    vision_int8: bool | None = None,
) -> VLModel:
    """Load a DeepSeek-VL2 checkpoint from a folder or a Hugging Face id (default: tiny).

    dtype: bfloat16 (default), float16 or float32; device: auto (default), cpu, cuda, mps.
    quantize: routed experts as "int8", "int4" or "nf4" (needs bitsandbytes), quantized while
    loading; "none" keeps them in `dtype`; None (default) loads the folder as it is (a
    pre-quantized folder from `dsvl2 quantize` with its own method); "auto" the first of none,
    int8, int4 that fits in memory (a pre-quantized folder keeps its own).

    Before any weight is read the memory plan (engine/fit.py) is checked against what this
    process may use: too big raises MemoryFitError naming the quantizations that would fit.
    allow_paging=True loads anyway (memory-mapped weights paged from disk: slow) with a warning;
    memory_check=False skips the check ("auto" still plans, and never refuses). on_fit receives
    the verdict (fit.Fit: the plan, its note and warning); without it a warning goes to
    `warnings.warn`.
    mmap: on CPU, use the weights in place from a memory-mapped converted layout, written once per
    model and dtype (None: DSVL2_MMAP, default on); False copies them out of the files.
    vision_int8: run the vision tower's linears in int8 (None: DSVL2_VISION_INT8, default off):
    on CPU with bfloat16 weights and an AVX512-VNNI CPU, ~2x faster linears (the tower 1.7-1.9x)
    for a small accuracy cost (README, "Performance"); elsewhere a one-line warning and the
    usual path. The packed int8 weights (~0.4 GB for SigLIP-SO400M, on top of the bf16 ones,
    kept as the fallback) are made by the first such load and mapped from the mapped folder by
    the later ones (packed into private memory each time without mapping). The prompt cache keeps
    int8 and bf16 image prefixes apart.
    """
    auto = quantize is not None and str(quantize).lower() == "auto"
    if not auto:
        quant.parse_method(quantize)  # a typo fails before any download
    resolved = hub.resolve(model, download=download)
    dt, dev = resolve_dtype(dtype), resolve_device(device)
    cfg = ModelConfig.from_dir(resolved.path)
    int8 = settings.vision_int8() if vision_int8 is None else bool(vision_int8)
    if memory_check or auto:
        from .fit import check_load  # not at the top: fit imports this module

        verdict = check_load(resolved.path, resolved.name, dt, dev, quantize,
                             allow_paging=allow_paging or not memory_check, vision_int8=int8)
        quantize = verdict.quantize
        if on_fit is not None:
            on_fit(verdict)
        elif verdict.warning:
            warnings.warn(verdict.warning, stacklevel=2)
    tokenizer = Tokenizer.from_dir(resolved.path)
    if tokenizer.vocab_size > cfg.language.vocab_size:
        raise ModelError(f"{resolved.path}: tokenizer.json has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {cfg.language.vocab_size}; tokenizer and weights do not belong together")
    processor = Processor(tokenizer, ProcessorSettings.from_model_dir(resolved.path))
    weights = load_model(resolved.path, cfg, dt, dev, on_progress, quantize, mmap, vision_int8=int8)
    return VLModel(resolved.name, resolved.path, resolved.source, cfg, weights, tokenizer, processor)
