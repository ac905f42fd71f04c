"""What every quantization method provides (`QuantMethod`, one object per method, as gpt-fast's
QuantHandler) and the experts module they all share (`QuantizedExperts`), with the helpers that
turn a kernel's packed 4-bit layout back into the portable one.

Routed experts hold most of the parameters (tiny: 2.4B of 3.37B) and decoding streams the chosen
ones from memory for every token, so they are what gets quantized; attention, shared experts,
embeddings and lm_head stay in the compute dtype. "Pack once, swap modules at load": experts are
quantized into a portable packed form (format.py; the method's `pack`), converted once to the
layout of the kernel that runs them, and the layer's `mlp.experts` module is replaced by the
method's `QuantizedExperts` subclass, with the interface of `moe.Experts` (`forward(x, ids,
weights)`, `expert(e, x)`, float32 weighted sum).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ... import quant_methods
from ...model.moe import combine_experts, per_expert_loop
from ..native import kernels
from .format import PARTS, QuantizationError, QuantSpec, _pack_nibbles, method_info


class QuantMethod:
    """One quantization method: its packed tensors, its reference quantize and dequantize in plain
    PyTorch, and its experts module. One subclass per method (int8.py, int4.py, nf4.py), listed in
    registry.py; its name, help note and group sizes are in dsvl2_cli/quant_methods.py.

    `fields` name the two portable tensors of a part: the codes ("qweight"), then the scales."""

    name = ""
    fields: tuple[str, str] = ("qweight", "")

    @property
    def info(self) -> quant_methods.Method:
        """The torch-free description: help note, group sizes, what it needs."""
        return method_info(self.name)

    @property
    def experts(self) -> type[QuantizedExperts]:
        """The module that computes with this method's weights (its `quant` is this object)."""
        raise NotImplementedError

    def packed_shapes(self, e: int, n: int, k: int, g: int | None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Field -> (shape, dtype) of one part's portable tensors: E experts of (N, K) in groups of g."""
        raise NotImplementedError

    def pack(self, w: torch.Tensor, g: int | None) -> dict[str, torch.Tensor]:
        """One expert's float32 weight (N, K) -> its portable tensors, by field."""
        raise NotImplementedError

    def dequantize(self, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """One part's portable tensors (E experts) -> float32 (E, N, K)."""
        raise NotImplementedError


class QuantizedExperts(nn.Module):
    """Routed experts held quantized; same interface and float32 weighted sum as `moe.Experts`.

    Per part, buffers `<part>_q` (codes) and `<part>_s` (scales) in the layout of the kernel
    chosen for the device (`layout`). Subclasses implement `_choose_layout(device, packed)`,
    `_to_kernel(part, q, s)` and `_to_portable(part, q, s)` (portable <-> kernel layout, one part),
    and `_linear(part, e, x)` (x @ W_e^T). `packed()` inverts the layout; `dequantize()` is the
    pure-PyTorch reference.
    The CPU kernels take bf16 activations whatever the model dtype (see `_bf16`); outputs come
    back in the input's dtype.
    """

    quant: QuantMethod  # the method whose weights it holds (each subclass sets it)

    def __init__(self, n_experts: int, hidden: int, inner: int, spec: QuantSpec, layout: str):
        super().__init__()
        self.n_experts, self.hidden, self.inner = n_experts, hidden, inner
        self.spec, self.layout = spec, layout

    @property
    def method(self) -> str:
        return self.quant.name

    def extra_repr(self) -> str:
        return (f"{self.method}, experts={self.n_experts}, hidden={self.hidden}, inner={self.inner}, "
                f"group_size={self.spec.group_size}, layout={self.layout}")

    def part_shape(self, part: str) -> tuple[int, int]:
        """(N, K) of one expert's matrix."""
        return (2 * self.inner, self.hidden) if part == "gate_up" else (self.hidden, self.inner)

    def _weights(self, part: str, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's codes and scales for `part` (straight from _buffers: this is the hot path)."""
        return self._buffers[part + "_q"][e], self._buffers[part + "_s"][e]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x (n, D) -> (n, D)."""
        gate, up = self._linear("gate_up", e, x).split(self.inner, dim=-1)
        return self._linear("down", e, F.silu(gate) * up)

    def _native_bits(self) -> int:
        """4 or 8 when the native CPU kernel reads this module's layout (decode), else 0."""
        return 0

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, D), ids/weights (N, k) -> sum_k weight * expert(x) as (N, D)."""
        bits = self._native_bits()
        if bits:  # a few tokens on CPU: one native call, no per-expert loop, no host round trip
            out = kernels.moe_experts_quant(bits, x, ids, weights, (self.gate_up_q, self.gate_up_s),
                                            (self.down_q, self.down_s))
            if out is not None:
                return out.to(x.dtype)
        n, k = ids.shape
        if n == 1:  # decoding: the k chosen experts in turn, nothing to sort
            out = torch.cat([self.expert(e, x) for e in ids[0].tolist()])  # (k, D)
            return (out.view(1, k, -1).float() * weights.unsqueeze(-1)).sum(1).to(x.dtype)
        return combine_experts(x, ids, weights, self.n_experts,
                               lambda routed, counts: per_expert_loop(routed, counts, self.expert))

    @classmethod
    def from_packed(cls, packed: dict[str, torch.Tensor], spec: QuantSpec, device: torch.device | str = "cpu",
                    copy: bool = True) -> QuantizedExperts:
        """Build from portable tensors. With `copy` (the default) the module never shares memory
        with them (they may be a file's mapped pages); copy=False may keep tensors handed over."""
        device = torch.device(device)
        e, n, _ = packed["gate_up.qweight"].shape
        module = cls(e, packed["down.qweight"].shape[1], n // 2, spec, cls._choose_layout(device, packed))
        for part in PARTS:
            given = [packed[f"{part}.{field}"] for field in cls.quant.fields]
            kernel = module._to_kernel(part, *(t.to(device) for t in given))
            for name, t, g in zip(("_q", "_s"), kernel, given):
                module.register_buffer(part + name, t.clone() if copy and t.data_ptr() == g.data_ptr() else t)
        return module

    def packed(self) -> dict[str, torch.Tensor]:
        """The portable tensors (on CPU): what `pack_experts` made and a folder stores."""
        out = {}
        codes, scales = self.quant.fields
        for part in PARTS:
            q, s = self._to_portable(part, getattr(self, part + "_q").cpu(), getattr(self, part + "_s").cpu())
            out[f"{part}.{codes}"], out[f"{part}.{scales}"] = q, s
        return out

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference float32 weights gate_up (E, 2M, D), down (E, D, M), computed in plain PyTorch."""
        packed, (codes, scales) = self.packed(), self.quant.fields
        gate_up, down = (self.quant.dequantize(packed[f"{p}.{codes}"], packed[f"{p}.{scales}"]) for p in PARTS)
        return gate_up, down


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """Activations for torch's CPU int8/int4 kernels: only their bf16 path is fast (float32 and
    float16 run 10-30x slower), and bf16 rounding (0.4%) is far below the weights' own error."""
    return x.to(torch.bfloat16).contiguous()


# ------------------------------------------------------------------ kernel layouts of 4-bit codes

def _convert_each(q: torch.Tensor, convert: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply a one-matrix layout converter to each expert of (E, ...), into one stacked tensor."""
    first = convert(q[0])
    out = torch.empty((q.shape[0], *first.shape), dtype=first.dtype, device=first.device)
    out[0] = first
    for i in range(1, q.shape[0]):
        out[i] = convert(q[i])
    return out


def _inverse_layout(key, n: int, k: int, convert: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """For a converter that reorders the 4-bit codes of one (N, K) matrix, the row-major source
    index of each code of its output (bytes in order, low nibble first). Found by converting
    probe matrices whose codes spell out each element's own index, 4 bits at a time."""
    if key not in _LAYOUTS:
        index = torch.arange(n * k, dtype=torch.int64)
        source = torch.zeros(n * k, dtype=torch.int64)
        for shift in range(0, max(1, (n * k - 1).bit_length()), 4):
            probe = ((index >> shift) & 15).to(torch.uint8).view(n, k)
            source |= _nibbles(convert(_pack_nibbles(probe))).long() << shift
        if not torch.equal(source.sort().values, index):
            raise QuantizationError("a kernel's packed layout is not a reordering of 4-bit codes; cannot unpack it")
        _LAYOUTS[key] = source
    return _LAYOUTS[key]


_LAYOUTS: dict[tuple, torch.Tensor] = {}


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    b = packed.contiguous().view(torch.uint8).flatten()
    return torch.stack([b & 15, b >> 4], dim=-1).flatten()


def _from_layout(kernel_q: torch.Tensor, source: torch.Tensor, n: int, k: int) -> torch.Tensor:
    codes = torch.empty(n * k, dtype=torch.uint8)
    codes[source] = _nibbles(kernel_q)
    return codes.view(n, k)


def _portable_codes(q: torch.Tensor, source: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Kernel-layout codes of E experts -> their portable bytes (E, N, K/2)."""
    return torch.stack([_pack_nibbles(_from_layout(q[i], source, n, k)) for i in range(q.shape[0])])
