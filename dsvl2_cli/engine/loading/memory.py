"""Weight memory by component: of a loaded model, and planned from config.json before loading."""


from __future__ import annotations

import math
import re

import torch
from torch import nn

from ...model.config import ModelConfig
from ..quant.base import QuantizedExperts
from ..quant.format import _SAFETENSORS_SIZES, QuantSpec
from ..quant.registry import expected_quantized
from .weights import expected_tensors

# -------------------------------------------------------------------------------- accounting

COMPONENTS = ("vision", "projector", "embeddings", "attention", "dense_mlp", "shared_experts", "routed_experts",
              "router", "lm_head", "norms_other")


_COMPONENT_RULES = tuple((re.compile(pattern), name) for pattern, name in (
    (r"vision\.", "vision"), (r"projector\.", "projector"), (r"language\.model\.embed_tokens\.", "embeddings"),
    (r"language\.lm_head\.", "lm_head"), (r".*\.self_attn\.", "attention"),
    (r".*\.mlp\.shared_experts\.", "shared_experts"), (r".*\.mlp\.experts\.", "routed_experts"),
    (r".*\.mlp\.gate\.", "router"), (r".*\.mlp\.", "dense_mlp")))  # first match wins


def _component(name: str) -> str:
    return next((c for pattern, c in _COMPONENT_RULES if pattern.match(name)), "norms_other")


def _tensors(model: nn.Module):
    """Every parameter and persistent buffer, each storage counted once."""
    seen = set()
    for mod_name, module in model.named_modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        items = list(module._parameters.items()) + [(n, b) for n, b in module._buffers.items() if n not in skip]
        for n, t in items:
            if t is None or t.is_meta or (t.data_ptr(), t.numel()) in seen:
                continue
            seen.add((t.data_ptr(), t.numel()))
            yield f"{mod_name}.{n}" if mod_name else n, t


def weight_memory(model: nn.Module) -> dict[str, int]:
    """Bytes of weights by component (keys COMPONENTS, plus "total"); scales count as weights."""
    out = dict.fromkeys(COMPONENTS, 0)
    for name, t in _tensors(model):
        out[_component(name)] += t.numel() * t.element_size()
    out["total"] = sum(out.values())
    return out


def planned_weight_memory(cfg: ModelConfig, dtype: torch.dtype, spec: QuantSpec | None) -> dict[str, int]:
    """`weight_memory` of a model not loaded: from the tensor table of its config (`dsvl2 info`).
    Routers stay float32; with a spec the routed experts take their packed size."""
    out = dict.fromkeys(COMPONENTS, 0)
    size = torch.empty((), dtype=dtype).element_size()
    if spec is None:
        shapes, dtypes = expected_tensors(cfg), {}
    else:
        shapes, dtypes = expected_quantized(cfg, spec)
    for name, shape in shapes.items():
        if name in dtypes:
            bytes_each = _SAFETENSORS_SIZES[dtypes[name]]
        elif name.endswith((".mlp.gate.weight", "e_score_correction_bias")):
            bytes_each = 4
        else:
            bytes_each = size
        out[_component(name)] += math.prod(shape) * bytes_each
    out["total"] = sum(out.values())
    return out


def quantization_summary(model: nn.Module) -> dict:
    """How the routed experts are stored: method, group size, parameters, bytes, bytes/param."""
    params = nbytes = 0
    method, group = "none", None
    for name, module in model.named_modules():
        if isinstance(module, QuantizedExperts):
            method, group = module.method, module.spec.group_size
            params += module.n_experts * 3 * module.hidden * module.inner
            nbytes += sum(t.numel() * t.element_size() for t in module.buffers())
        elif name.endswith(".mlp.experts"):
            tensors = list(module.parameters())
            params += sum(t.numel() for t in tensors)
            nbytes += sum(t.numel() * t.element_size() for t in tensors)
    return {"method": method, "group_size": group, "routed_params": params, "routed_bytes": nbytes,
            "bytes_per_param": round(nbytes / params, 4) if params else 0.0}
