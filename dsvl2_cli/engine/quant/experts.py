"""Quantized experts at load: the module of a spec's method built from portable tensors
(`experts_from_packed`), each MoE layer quantized as it is read or read pre-quantized (the
loading hooks), and the layout a device's kernel holds them in (`KernelLayout`: what a mapped
layout stores). The methods themselves are in int8.py, int4.py and nf4.py (registry.py).
"""


from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from ...model.config import ModelConfig
from ..loading.weights import TensorReader, stack_experts
from .base import QuantizedExperts
from .format import PARTS, QuantSpec
from . import registry
from .registry import pack_experts, pack_part, packed_shapes


def quantize_experts(gate_up: torch.Tensor, down: torch.Tensor, method: str, group_size: int | None = None,
                     device: torch.device | str | None = None) -> QuantizedExperts:
    """Float stacked experts (E, 2M, D), (E, D, M) -> a quantized experts module on `device`
    (default: the weights'). It computes in the dtype of the activations it is given."""
    spec = QuantSpec.make(method, group_size)
    packed = pack_experts(gate_up.cpu(), down.cpu(), spec)
    return experts_from_packed(packed, spec, device or gate_up.device, copy=False)


def experts_from_packed(packed: dict[str, torch.Tensor], spec: QuantSpec, device: torch.device | str = "cpu",
                        copy: bool = True) -> QuantizedExperts:
    """Portable tensors ("<part>.<field>", see format.py) -> the module for `device`."""
    return registry.method(spec).experts.from_packed(packed, spec, device, copy)


# ------------------------------------------------------------------------------ loading hooks

def quantize_layer_hook(spec: QuantSpec, cfg: ModelConfig, device: torch.device):
    """For `weights.load_into(experts=...)`: quantize each MoE layer's float experts as it is read."""
    n = cfg.language.n_routed_experts

    def build(module_name: str, reader: TensorReader) -> nn.Module:
        prefix = module_name[: -len("experts")]
        packed = {}
        for part in PARTS:  # one part in float at a time
            w = stack_experts(reader, prefix, n, part)
            reader.close()  # let go of the file pages just read
            packed.update(pack_part(w, spec, part))
            del w
        return experts_from_packed(packed, spec, device, copy=False)
    return build


def packed_layer_hook(spec: QuantSpec, device: torch.device):
    """For `weights.load_into(experts=...)`: read a pre-quantized folder's packed experts."""
    fields = registry.method(spec).fields

    def build(module_name: str, reader: TensorReader) -> nn.Module:
        prefix = f"{module_name}.{spec.method}."
        packed = {f"{part}.{field}": reader.get(prefix + f"{part}.{field}")
                  for part in PARTS for field in fields}
        return experts_from_packed(packed, spec, device)
    return build


# ------------------------------------------------------------------------------ mapped loading

@dataclass(frozen=True)
class KernelLayout:
    """The buffers of a MoE layer's quantized experts as the kernel for a device holds them:
    what a mapped layout stores in place of the float experts (engine/loading/mapped.py). The CPU
    packings are torch's and bitsandbytes' internal choices (they vary with the CPU and the
    version), so `key` carries a digest of a probe's kernel tensors: another packing, another key."""

    spec: QuantSpec
    layout: str
    n_experts: int
    hidden: int
    inner: int
    buffers: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]  # name, one expert's shape, dtype
    digest: str

    @property
    def key(self) -> str:
        """e.g. "int4g128-cpu-1a2b3c4d5e": part of the entry's name and checked in its record."""
        group = f"g{self.spec.group_size}" if self.spec.group_size else ""
        return f"{self.spec.method}{group}-{self.layout}-{self.digest}"

    def table(self, module_name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Buffer name under the model -> (shape, dtype), for the experts module `module_name`."""
        return {f"{module_name}.{name}": ((self.n_experts, *shape), dt) for name, shape, dt in self.buffers}

    def empty_module(self) -> QuantizedExperts:
        """A module of this layout whose buffers are meta tensors, to be set to mapped views."""
        module = registry.method(self.spec).experts(self.n_experts, self.hidden, self.inner, self.spec, self.layout)
        for name, shape, dt in self.buffers:
            module.register_buffer(name, torch.empty((self.n_experts, *shape), dtype=dt, device="meta"))
        return module


def kernel_layout(spec: QuantSpec, cfg: ModelConfig, device: torch.device) -> KernelLayout:
    """The kernel layout `experts_from_packed` makes on `device` for this model's experts, found
    by converting one random expert (milliseconds; the shapes per expert do not depend on E)."""
    lm = cfg.language
    d, m = lm.hidden_size, lm.moe_intermediate_size
    gen = torch.Generator().manual_seed(0)
    probe = {}
    for part, (n, k) in (("gate_up", (2 * m, d)), ("down", (d, m))):
        for field, (shape, dt) in packed_shapes(spec, 1, n, k).items():
            if dt.is_floating_point:
                probe[f"{part}.{field}"] = (torch.rand(shape, generator=gen) + 0.5).to(dt)
            else:
                low, high = (-127, 128) if dt == torch.int8 else (0, 256)
                probe[f"{part}.{field}"] = torch.randint(low, high, shape, generator=gen, dtype=dt)
    module = experts_from_packed(probe, spec, device, copy=False)
    h = hashlib.blake2b(digest_size=5)
    buffers = []
    for name, b in module.named_buffers():
        h.update(f"{name}\0{list(b.shape)}\0{b.dtype}\0".encode())
        h.update(b.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        buffers.append((name, tuple(b.shape[1:]), b.dtype))
    return KernelLayout(spec, module.layout, lm.n_routed_experts, d, m, tuple(buffers), h.hexdigest())
