"""The quantization methods by name, and what every caller does with one: the portable tensors'
shapes (a model's strict-check table, its planned memory), packing and the reference dequantize.

A method is one `QuantMethod` (int8.py, int4.py, nf4.py), listed here once; its name and help
are in dsvl2_cli/quant_methods.py (no torch, for --help). A name that is not listed is a one-line
QuantizationError naming the known ones, from every function here: never another method's format.
"""

from __future__ import annotations

import torch

from ... import quant_methods
from ...model.config import ModelConfig
from ..loading.weights import expected_tensors
from . import int4, int8, nf4
from .base import QuantMethod
from .format import _EXPERT_NAME, _SAFETENSORS_DTYPES, PARTS, QuantizationError, QuantSpec, group_for

IMPLEMENTATIONS: dict[str, QuantMethod] = {m.name: m for m in (int8.METHOD, int4.METHOD, nf4.METHOD)}
if tuple(IMPLEMENTATIONS) != quant_methods.NAMES:  # the two lists must name the same methods, in order
    raise ImportError(f"quantization methods implemented {tuple(IMPLEMENTATIONS)} differ from those described in "
                      f"dsvl2_cli/quant_methods.py {quant_methods.NAMES}")


def method(name: str | QuantSpec) -> QuantMethod:
    """The method called `name` (or a spec's); QuantizationError naming the known ones else."""
    key = getattr(name, "method", name)
    found = IMPLEMENTATIONS.get(key) if isinstance(key, str) else None
    if found is None:
        raise QuantizationError(quant_methods.unknown(key))
    return found


def packed_shapes(spec: QuantSpec, n_experts: int, n: int, k: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Field -> (shape, dtype) of one part's portable tensors."""
    return method(spec).packed_shapes(n_experts, n, k, group_for(spec, k))


def expected_quantized(cfg: ModelConfig, spec: QuantSpec) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The strict check's table for a pre-quantized folder: name -> shape, and name -> dtype
    for the packed tensors (every other tensor must be floating point)."""
    shapes = {n: s for n, s in expected_tensors(cfg).items() if not _EXPERT_NAME.match(n)}
    dtypes = {}
    lm = cfg.language
    d, m = lm.hidden_size, lm.moe_intermediate_size
    for layer in range(lm.num_hidden_layers):
        if not lm.is_moe_layer(layer):
            continue
        prefix = f"language.model.layers.{layer}.mlp.experts.{spec.method}."
        for part, (n, k) in (("gate_up", (2 * m, d)), ("down", (d, m))):
            for field, (shape, dtype) in packed_shapes(spec, lm.n_routed_experts, n, k).items():
                shapes[prefix + part + "." + field] = shape
                dtypes[prefix + part + "." + field] = _SAFETENSORS_DTYPES[dtype]
    return shapes, dtypes


def pack_experts(gate_up: torch.Tensor, down: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Stacked float experts (E, 2M, D), (E, D, M) -> the portable tensors, keys "<part>.<field>"."""
    return {**pack_part(gate_up, spec, "gate_up"), **pack_part(down, spec, "down")}


def pack_part(w: torch.Tensor, spec: QuantSpec, part: str) -> dict[str, torch.Tensor]:
    """One part's stacked float weights (E, N, K) -> its portable tensors "<part>.<field>".

    Quantized from the values as given (the checkpoint's, in float32 arithmetic), one expert at a
    time, so the temporaries stay at one expert's size.
    """
    e, n, k = w.shape
    quant, g = method(spec), group_for(spec, k)
    fields = {f: torch.empty(s, dtype=dt) for f, (s, dt) in quant.packed_shapes(e, n, k, g).items()}
    for i in range(e):
        for f, t in quant.pack(w[i].float(), g).items():
            fields[f][i] = t.reshape(fields[f].shape[1:])
    return {f"{part}.{f}": t for f, t in fields.items()}


def dequantize_part(name: str, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """One part's portable tensors (qweight and its scales/scales_zeros/absmax) -> float32 (E, N, K)."""
    return method(name).dequantize(qweight, scales)


def dequantize_packed(name: str, packed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pure-PyTorch reference: portable tensors -> float32 gate_up (E, 2M, D), down (E, D, M)."""
    quant = method(name)
    codes, scales = quant.fields
    gate_up, down = (quant.dequantize(packed[f"{p}.{codes}"], packed[f"{p}.{scales}"]) for p in PARTS)
    return gate_up, down
