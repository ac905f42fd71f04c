"""The library's entry point: `load()` a checkpoint and get a `VLModel` that prepares
conversations and runs the model. The CLI sits on this and nothing lower.

`quantize=` ("int8", "int4", "nf4"; see quant.py) quantizes the routed experts while loading, one
layer at a time; a folder written by `quantize_folder` (`dsvl2 quantize`) loads quantized as it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import hub, quant
from .config import ModelConfig
from .errors import Dsvl2Error, ModelError
from .language import rope_table
from .model import DeepseekVL2
from .processor import Message, Prepared, Processor, ProcessorSettings, image_token_count
from .quant import QuantSpec
from .tokenizer import Tokenizer
from .weights import TensorReader, check_tensors, expected_tensors, load_into, read_headers, weight_files

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
               quantize: str | None = None) -> DeepseekVL2:
    """Strict-check the checkpoint against `cfg`, then build the model and fill its weights.

    quantize: None (as the folder is: float, or its pre-quantized method), "none", "int8", "int4"
    or "nf4" (routed experts quantized as each layer is read; a pre-quantized folder only loads
    with its own method).
    """
    folder_spec = quant.read_spec(model_dir)
    spec = quant.resolve(quantize, folder_spec, str(model_dir))
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
    try:
        load_into(model, reader, cfg, dtype, device, on_progress, experts=experts)
    finally:
        reader.close()
    lm = cfg.language
    rope_dim = lm.qk_rope_head_dim if lm.use_mla else lm.head_dim
    model.language.rope_angles = rope_table(rope_dim, lm.max_position_embeddings, lm.rope_theta).to(device)
    model.quantization = spec
    return model.eval()


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
        """Bytes of weights by component (see quant.weight_memory)."""
        return quant.weight_memory(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def prepare(self, messages: Sequence[Message], *, system: str | None = None) -> Prepared:
        return self.processor.prepare(messages, system=system)

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
        return self.model.language(self.embed(prepared))[0]


def load(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    download: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    quantize: str | None = None,
) -> VLModel:
    """Load a DeepSeek-VL2 checkpoint from a folder or a Hugging Face id (default: tiny).

    dtype: bfloat16 (default), float16 or float32; device: auto (default), cpu, cuda, mps.
    quantize: routed experts as "int8", "int4" or "nf4" (needs bitsandbytes), quantized while
    loading; "none" keeps them in `dtype`; None (default) loads the folder as it is (a
    pre-quantized folder from `dsvl2 quantize` with its own method).
    """
    quant.parse_method(quantize)  # a typo fails before any download
    resolved = hub.resolve(model, download=download)
    dt, dev = resolve_dtype(dtype), resolve_device(device)
    cfg = ModelConfig.from_dir(resolved.path)
    tokenizer = Tokenizer.from_dir(resolved.path)
    if tokenizer.vocab_size > cfg.language.vocab_size:
        raise ModelError(f"{resolved.path}: tokenizer.json has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {cfg.language.vocab_size}; tokenizer and weights do not belong together")
    processor = Processor(tokenizer, ProcessorSettings.from_model_dir(resolved.path))
    weights = load_model(resolved.path, cfg, dt, dev, on_progress, quantize)
    return VLModel(resolved.name, resolved.path, resolved.source, cfg, weights, tokenizer, processor)


def describe(resolved: hub.ResolvedModel, dtype: str | torch.dtype | None = None,
             device: str | torch.device | None = None) -> dict:
    """What `dsvl2 info` shows: the architecture from config.json and parameter counts from the
    model built on the meta device (sizes without reading any weights). JSON-ready."""
    cfg = ModelConfig.from_dir(resolved.path)
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    with torch.device("meta"):
        model = DeepseekVL2(cfg)

    def count(module) -> int:
        return sum(t.numel() for t in module.parameters())

    lm, vis = cfg.language, cfg.vision
    vision, language = count(model.vision), count(model.language)
    adaptor = count(model.projector) + model.image_newline.numel() + model.view_seperator.numel()
    total = vision + adaptor + language
    idle = 0  # routed experts a token does not use; the embedding table is a lookup, not compute
    for layer in model.language.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            idle += count(experts) * (lm.n_routed_experts - lm.num_experts_per_tok) // lm.n_routed_experts
    active = total - idle - model.language.model.embed_tokens.weight.numel()
    side = cfg.tokens_per_tile_side
    best = max(cfg.candidate_resolutions, key=lambda r: (r[0] // vis.image_size) * (r[1] // vis.image_size))
    moe_layers = sum(lm.is_moe_layer(i) for i in range(lm.num_hidden_layers))
    attention = ({"kind": "mla", "heads": lm.num_attention_heads, "kv_lora_rank": lm.kv_lora_rank,
                  "qk_rope_head_dim": lm.qk_rope_head_dim, "qk_nope_head_dim": lm.qk_nope_head_dim,
                  "v_head_dim": lm.v_head_dim} if lm.use_mla else
                 {"kind": "mha", "heads": lm.num_attention_heads, "head_dim": lm.head_dim})
    experts = {"routed": lm.n_routed_experts, "shared": lm.n_shared_experts or 0, "per_token": lm.num_experts_per_tok,
               "scoring": lm.scoring_func, "topk_method": lm.topk_method, "renormalised": lm.norm_topk_prob,
               "scaling": lm.routed_scaling_factor, "moe_layers": moe_layers} if moe_layers else None
    return {
        "model": resolved.name, "path": str(resolved.path), "source": resolved.source,
        "dtype": str(torch_dtype).removeprefix("torch."), "device": str(dev),
        "architecture": {
            "layers": lm.num_hidden_layers, "hidden_size": lm.hidden_size, "vocab_size": lm.vocab_size,
            "context_tokens": lm.max_position_embeddings, "attention": attention, "experts": experts,
            "vision": {"layers": vis.layers, "width": vis.width, "heads": vis.heads, "image_size": vis.image_size,
                       "patch_size": vis.patch_size, "tokens_per_tile": side * side},
            "max_image_tokens": image_token_count(best[0] // vis.image_size, best[1] // vis.image_size, side),
        },
        "parameters": {"total": total, "active": active, "vision": vision, "adaptor": adaptor,
                       "language": language},
        "cache_bytes_per_token": lm.cache_values_per_token() * lm.num_hidden_layers
        * torch.empty((), dtype=torch_dtype).element_size(),
        "image_tokens_384": image_token_count(1, 1, side),
    }
