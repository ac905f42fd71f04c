"""What `dsvl2 info` shows about a model without loading its weights: the architecture from
config.json, parameter counts from the model built on the meta device, and the memory each
quantization would need here (memory_plan.py, fit.py)."""

from __future__ import annotations

import torch

from ...model.config import ModelConfig
from ...model.vlm import DeepseekVL2
from ...quant_methods import AUTO_ORDER
from . import fit, hub, memory
from .. import quant
from .host_memory import available_memory
from .memory_plan import plans_for_folder
from ..prompt.processor import image_token_count
from ..runtime import resolve_device, resolve_dtype


def describe_model(resolved: hub.ResolvedModel, dtype: str | torch.dtype | None = None,
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


def model_info(resolved: hub.ResolvedModel, dtype: str, device: str, quantize: str | None = None) -> dict:
    """`dsvl2 info`'s facts about a resolved model, from its files only: `describe_model`, the
    weight memory it would take loaded with `quantize`, and the memory plan of each method against
    what this process may use.

    {"model", "path", "source", "dtype", "device", "architecture": {...},
     "parameters": {"total", "active", "vision", "adaptor", "language"},
     "cache_bytes_per_token", "image_tokens_384", "quantization", "weight_memory": {...},
     "memory": {"available": {"bytes", "source"}, "method": str,   # the method these options load
                "plans": {method: {"total", "weights", "cache", "activations", "loading",
                                   "overhead", "fits"}}}}   # bytes; fits: total <= available
    The plans: none, int8, int4 (and the --quantize method) for a float folder, a pre-quantized
    folder's own method only; batch 1, the cache at the full context."""
    facts = describe_model(resolved, dtype, device)
    dt, dev = resolve_dtype(facts["dtype"]), facts["device"]
    folder = quant.read_spec(resolved.path)
    auto = quantize is not None and quantize.lower() == "auto"
    requested = None if auto else quant.choose_spec(quantize, folder, str(resolved.path))
    extra = () if requested is None or requested.method in AUTO_ORDER else (requested.method,)
    plans = plans_for_folder(resolved.path, dt, dev, (*AUTO_ORDER, *extra))
    available = available_memory(dev)
    if auto:  # what the model commands would choose; nothing fitting is not an error here
        quantize, _ = fit.choose_quantization(resolved.name, plans, available, allow_paging=True)
    spec = quant.choose_spec(quantize, folder, str(resolved.path))
    cfg = ModelConfig.from_dir(resolved.path)
    facts["quantization"] = quant.spec_label(spec)
    facts["weight_memory"] = memory.planned_weight_memory(cfg, dt, spec)
    facts["memory"] = {
        "available": {"bytes": available.bytes, "source": available.source},
        "method": spec.method if spec else "none",
        "plans": {m: {"total": p.total, "weights": p.weight_bytes, "cache": p.cache,
                      "activations": max(p.vision, p.prefill), "loading": p.loading, "overhead": p.overhead,
                      "fits": p.total <= available.bytes} for m, p in plans.items()},
    }
    return facts
