"""int8: per output channel, symmetric, a bf16 scale: w = q * scale (~1.0 byte per routed parameter).

Portable, per part: qweight I8 (E, N, K), scales BF16 (E, N). On CPU torch's
`_weight_int8pack_mm` (prefill) and, decoding, the native kernel (`kernels.moe_experts_quant`);
elsewhere the chosen expert is dequantized per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import QuantizedExperts, QuantMethod, _bf16
from .format import _TINY


def _quantize(w: torch.Tensor, _: int | None) -> dict[str, torch.Tensor]:
    """w (N, K) float32 -> symmetric per-row int8 (-127..127) with the bf16 scale it was made with."""
    scale = (w.abs().amax(-1) / 127).to(torch.bfloat16)  # (N,)
    q = (w / scale.float().clamp_min(_TINY)[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return {"qweight": q, "scales": scale}


class Int8(QuantMethod):
    name = "int8"
    fields = ("qweight", "scales")

    @property
    def experts(self) -> type[QuantizedExperts]:
        return Int8Experts

    def packed_shapes(self, e, n, k, g):
        return {"qweight": ((e, n, k), torch.int8), "scales": ((e, n), torch.bfloat16)}

    def pack(self, w, g):
        return _quantize(w, g)

    def dequantize(self, qweight, scales):
        return qweight.float() * scales.float()[..., None]


METHOD = Int8()


class Int8Experts(QuantizedExperts):
    """Layouts: "cpu" (torch's `_weight_int8pack_mm`) and "portable" (other devices: the chosen
    expert dequantized per call)."""

    quant = METHOD

    @classmethod
    def _choose_layout(cls, device, packed):
        return "cpu" if device.type == "cpu" else "portable"

    def _to_kernel(self, part, q, s):
        return q, s

    def _to_portable(self, part, q, s):
        return q, s

    def _native_bits(self) -> int:
        return 8 if self.layout == "cpu" else 0

    def _linear(self, part, e, x):
        q, s = self._weights(part, e)
        if self.layout == "cpu" and q.shape[1] % 16 == 0:  # torch 2.13's kernel gives inf/garbage otherwise
            return torch.ops.aten._weight_int8pack_mm(_bf16(x), q, s).to(x.dtype)
        return F.linear(x, (q.to(x.dtype) * s[:, None].to(x.dtype)))
