"""The library's entry point, and the one loading path: `plan_load()` decides everything before a
weight is read, each thing once (the quantization name, the model resolved by hub.py, dtype and
device, the memory check of fit.py), `LoadPlan.load()` builds the model and fills its weights
(`load_model`), and `load()` does both and returns a `VLModel` (vlmodel.py). The CLI
(app/terminal/cli.py's open_model) and the server load through `plan_load` too.

`quantize=` (a method of dsvl2_cli/quant_methods.py: int8, int4, nf4) quantizes the routed experts
while loading, one layer at a time; a folder written by `quantize_folder` (`dsvl2 quantize`) loads
quantized as it is.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import settings
from ..errors import Dsvl2Error, ModelError
from ..model.config import ModelConfig
from ..model.language import rope_table
from ..model.vlm import DeepseekVL2
from .native import fast
from .loading import fit, hub, mapped
from . import quant
from .native import vision_int8 as vision_int8_module
from .prompt.processor import Processor, ProcessorSettings
from .prompt.tokenizer import Tokenizer
from .vlmodel import TILE_BATCH, VLModel  # noqa: F401  (their old home: the public API imports VLModel here)
from .loading.weights import TensorReader, check_tensors, expected_tensors, load_into, read_headers, weight_files

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
    (engine/loading/mapped.py); otherwise copied.
    vision_int8: the vision tower's linears in int8 (engine/native/vision_int8.py) where the CPU kernel
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
        why = vision_int8_module.unavailable(dtype, device)
        if why:
            warnings.warn(f"int8 vision is not available here ({why}); the vision tower runs in {_dtype_name(dtype)}",
                          stacklevel=2)
        else:
            model.vision_int8 = vision_int8_module.install(model.vision, model_dir if use_mmap else None) > 0
    return model.eval()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class LoadPlan:
    """What a load will do, decided before any weight is read (`plan_load`): the model resolved,
    the dtype and device, the quantization to load with ("auto" replaced by its choice) and the
    memory verdict (fit.Fit: the plan, and a note or warning to show; None when not checked).
    `load()` reads the weights."""

    model: hub.ResolvedModel
    config: ModelConfig
    dtype: torch.dtype
    device: torch.device
    quantize: str | None
    vision_int8: bool
    verdict: fit.Fit | None = None

    @property
    def path(self) -> Path:
        return self.model.path

    @property
    def note(self) -> str | None:
        """--quantize auto: what it chose, one line."""
        return self.verdict.note if self.verdict else None

    @property
    def warning(self) -> str | None:
        """allow_paging: the refusal the check would have made, as one line."""
        return self.verdict.warning if self.verdict else None

    def load(self, on_progress: Callable[[int, int], None] | None = None, mmap: bool | None = None) -> VLModel:
        """Read the tokenizer and the weights (load_model); on_progress(done, total) as they are read."""
        tokenizer = Tokenizer.from_dir(self.path)
        if tokenizer.vocab_size > self.config.language.vocab_size:
            raise ModelError(f"{self.path}: tokenizer.json has {tokenizer.vocab_size} tokens but the model's "
                             f"vocab_size is {self.config.language.vocab_size}; tokenizer and weights do not belong "
                             "together")
        processor = Processor(tokenizer, ProcessorSettings.from_model_dir(self.path))
        weights = load_model(self.path, self.config, self.dtype, self.device, on_progress, self.quantize, mmap,
                             vision_int8=self.vision_int8)
        return VLModel(self.model.name, self.path, self.model.source, self.config, weights, tokenizer, processor)


def plan_load(
    model: str | os.PathLike | hub.ResolvedModel | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    download: bool = True,
    quantize: str | None = None,
    memory_check: bool = True,
    allow_paging: bool = False,
    vision_int8: bool | None = None,
) -> LoadPlan:
    """Everything `load` decides before reading a weight, each once: the quantization name checked
    (a typo fails before any download), the model resolved (`hub.resolve`, which may download;
    a `hub.ResolvedModel` is taken as it is), dtype and device, config.json, and the memory check
    (`fit.check_load`: MemoryFitError when the plan does not fit). The arguments are `load`'s."""
    auto = quantize is not None and str(quantize).lower() == "auto"
    if not auto:
        quant.parse_method(quantize)  # a typo fails before any download
    resolved = model if isinstance(model, hub.ResolvedModel) else hub.resolve(model, download=download)
    dt, dev = resolve_dtype(dtype), resolve_device(device)
    cfg = ModelConfig.from_dir(resolved.path)
    int8 = settings.vision_int8() if vision_int8 is None else bool(vision_int8)
    verdict = None
    if memory_check or auto:
        verdict = fit.check_load(resolved.path, resolved.name, dt, dev, quantize,
                                 allow_paging=allow_paging or not memory_check, vision_int8=int8)
        quantize = verdict.quantize
    return LoadPlan(resolved, cfg, dt, dev, quantize, int8, verdict)


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
    on_fit: Callable[[fit.Fit], None] | None = None,
    mmap: bool | None = None,
    vision_int8: bool | None = None,
) -> VLModel:
    """Load a DeepSeek-VL2 checkpoint from a folder or a Hugging Face id (default: tiny).

    dtype: bfloat16 (default), float16 or float32; device: auto (default), cpu, cuda, mps.
    quantize: routed experts as "int8", "int4" or "nf4" (needs bitsandbytes), quantized while
    loading; "none" keeps them in `dtype`; None (default) loads the folder as it is (a
    pre-quantized folder from `dsvl2 quantize` with its own method); "auto" the first of none,
    int8, int4 that fits in memory (a pre-quantized folder keeps its own).

    Before any weight is read (`plan_load`) the memory plan (engine/loading/fit.py) is checked against
    what this process may use: too big raises MemoryFitError naming the quantizations that fit.
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
    plan = plan_load(model, device=device, dtype=dtype, download=download, quantize=quantize,
                     memory_check=memory_check, allow_paging=allow_paging, vision_int8=vision_int8)
    if plan.verdict is not None:
        if on_fit is not None:
            on_fit(plan.verdict)
        elif plan.warning:
            warnings.warn(plan.warning, stacklevel=2)
    return plan.load(on_progress, mmap)
