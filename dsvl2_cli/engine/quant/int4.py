"""int4: groups of G inputs (default 128), asymmetric, a bf16 scale and zero per group:
w = (q - 8) * scale + zero (0.531 bytes per routed parameter at G = 128).

Portable, per part: qweight U8 (E, N, K/2), scales_zeros BF16 (E, K/G, N, 2) = (scale, zero) per
group. On CPU torch's `_weight_int4pack_mm_for_cpu` (prefill) and, decoding, the native kernel
(`kernels.moe_experts_quant`) where torch's packing is the blocked one it reads; CUDA torch's
`_weight_int4pack_mm`; elsewhere the chosen expert is dequantized per call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .base import QuantizedExperts, QuantMethod, _bf16, _convert_each, _inverse_layout, _portable_codes
from .format import _TINY, QuantizationError, _pack_nibbles, _unpack_nibbles


def _quantize(w: torch.Tensor, g: int) -> dict[str, torch.Tensor]:
    """w (N, K) float32 -> asymmetric 4-bit per group of g inputs; zero is the value of code 8."""
    n, k = w.shape
    wg = w.view(n, k // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)  # (N, K/g)
    scale = ((hi - lo) / 15).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)  # rounded first, so codes use the stored values
    q = (wg - zero.float()[..., None]).div_(scale.float().clamp_min(_TINY)[..., None]).add_(8)
    q = q.round_().clamp_(0, 15).to(torch.uint8).view(n, k)
    return {"qweight": _pack_nibbles(q), "scales_zeros": torch.stack([scale, zero], -1).transpose(0, 1).contiguous()}


def _dequantize(qweight: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    codes = _unpack_nibbles(qweight).long()  # (E, N, K)
    k = codes.shape[-1]
    sz = scales_zeros.float()  # (E, K/G, N, 2)
    g = k // sz.shape[1]
    scale, zero = (sz[..., i].transpose(1, 2).repeat_interleave(g, dim=-1) for i in (0, 1))  # (E, N, K)
    return (codes - 8) * scale + zero


class Int4(QuantMethod):
    name = "int4"
    fields = ("qweight", "scales_zeros")

    @property
    def experts(self) -> type[QuantizedExperts]:
        return Int4Experts

    def packed_shapes(self, e, n, k, g):
        return {"qweight": ((e, n, k // 2), torch.uint8), "scales_zeros": ((e, k // g, n, 2), torch.bfloat16)}

    def pack(self, w, g):
        return _quantize(w, g)

    def dequantize(self, qweight, scales):
        return _dequantize(qweight, scales)


METHOD = Int4()


class Int4Experts(QuantizedExperts):
    """Layouts: "cpu" (torch's CPU int4 packing, which depends on the machine), "cuda" (torch's
    tiled int32 packing), both with bf16 activations and scales; "portable" (other devices)."""

    quant = METHOD

    @classmethod
    def _choose_layout(cls, device, packed):
        if device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return "cpu"
        return "cuda" if device.type == "cuda" else "portable"

    def _to_kernel(self, part, q, s):
        if self.layout == "portable":
            return q, s
        return _convert_each(q, _int4_converter(self.layout, self.part_shape(part)[1])), s

    def _to_portable(self, part, q, s):
        if self.layout != "portable":
            n, k = self.part_shape(part)
            q = _portable_codes(q, _inverse_layout(("int4", self.layout, n, k), n, k, _int4_converter(self.layout, k)),
                                n, k)
        return q, s

    def _native_bits(self) -> int:
        return 4 if self.layout == "cpu" and cpu_int4_packing_is_blocked() else 0

    def _linear(self, part, e, x):
        q, sz = self._weights(part, e)  # sz (K/G, N, 2)
        g = self.part_shape(part)[1] // sz.shape[0]
        if self.layout == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(_bf16(x), q, g, sz).to(x.dtype)
        if self.layout == "cuda":
            return torch.ops.aten._weight_int4pack_mm(_bf16(x), q, g, sz).to(x.dtype)
        return F.linear(x, _dequantize(q[None], sz[None])[0].to(x.dtype))


@functools.cache
def cpu_int4_packing_is_blocked() -> bool:
    """Whether this torch packs CPU int4 weights as the native kernel reads them: per block of
    64 output rows, 32 bytes per input, byte j = row j (low nibble) and row j + 32 (high). The
    packing is torch's internal choice (it varies with the CPU), so it is probed, not assumed."""
    n, k = 128, 64
    try:
        source = _inverse_layout(("int4", "cpu", n, k), n, k, _int4_converter("cpu", k))
    except (RuntimeError, QuantizationError):
        return False
    block, kk, j, high = torch.meshgrid(torch.arange(n // 64), torch.arange(k), torch.arange(32), torch.arange(2),
                                        indexing="ij")
    expected = (block * 64 + j + 32 * high) * k + kk  # source index of each nibble, low first
    return torch.equal(source, expected.flatten())


def _int4_converter(layout: str, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Portable bytes (N, K/2) of one matrix -> the kernel's packed weight."""
    if layout == "cpu":
        return lambda b: torch.ops.aten._convert_weight_to_int4pack_for_cpu(_unpack_nibbles(b).to(torch.int32), 1)
    tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)  # the CUDA kernel's innerKTiles
    return lambda b: torch.ops.aten._convert_weight_to_int4pack(b.contiguous(), tiles)
