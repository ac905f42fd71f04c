"""nf4: NormalFloat4 (QLoRA) in blocks of B inputs (default 64), a float32 absmax per block:
w = NF4[q] * absmax, bitsandbytes' format (0.5625 bytes per routed parameter on disk, 0.531 in
memory on AVX512-BF16 CPUs, where absmax is kept as bf16 as bitsandbytes does).

Portable, per part: qweight U8 (E, N, K/2), absmax F32 (E, N*K/B), blocks over the row-major
matrix. Needs bitsandbytes: its AVX512-BF16 CPU GEMV where available, else `bnb.matmul_4bit`
(CUDA; elsewhere it dequantizes per call: slow).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from .base import QuantizedExperts, QuantMethod, _bf16, _convert_each, _inverse_layout, _portable_codes
from .format import PARTS, _TINY, QuantizationError, _pack_nibbles, _unpack_nibbles

# NormalFloat4 code values (QLoRA, appendix E), the table of bitsandbytes' "nf4".
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def _nf4_table() -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.tensor(NF4_VALUES, dtype=torch.float32)
    return values, (values[1:] + values[:-1]) / 2  # code values, decision midpoints


_NF4_BINS = 4096  # finer than the closest midpoints (0.08 apart): at most one midpoint per bin


@functools.lru_cache(maxsize=None)
def _nf4_lookup() -> tuple[torch.Tensor, torch.Tensor]:
    """The code at each bin's lower edge over [-1, 1], and the midpoint above each code."""
    mids = _nf4_table()[1]
    edges = torch.arange(_NF4_BINS, dtype=torch.float32) * (2 / _NF4_BINS) - 1
    return torch.bucketize(edges, mids).to(torch.uint8), torch.cat([mids, torch.tensor([float("inf")])])


def _quantize_nf4(w: torch.Tensor, b: int) -> dict[str, torch.Tensor]:
    """w (N, K) float32 -> nearest NF4 code of w / absmax (ties to the lower code, as
    bitsandbytes), blocks of b over the row-major matrix. A bin lookup then one comparison
    replaces a binary search (bucketize), which is 5x slower here."""
    n, k = w.shape
    blocks = w.reshape(-1, b)
    absmax = blocks.abs().amax(-1)  # (N*K/b,)
    scaled = blocks / absmax.clamp_min(_TINY)[:, None]  # in [-1, 1]
    lut, above = _nf4_lookup()
    bins = scaled.add(1).mul_(_NF4_BINS / 2).floor_().clamp_(0, _NF4_BINS - 1).long()
    q = lut[bins]
    q += scaled > above[q.long()]
    return {"qweight": _pack_nibbles(q.view(n, k)), "absmax": absmax}


def _dequantize(qweight: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    codes = _unpack_nibbles(qweight).long()  # (E, N, K)
    e, n, k = codes.shape
    absmax = absmax.float()  # (E, N*K/B)
    return (_nf4_table()[0][codes].view(e, absmax.shape[1], -1) * absmax[..., None]).view(e, n, k)


class NF4(QuantMethod):
    name = "nf4"
    fields = ("qweight", "absmax")

    @property
    def experts(self) -> type[QuantizedExperts]:
        return NF4Experts

    def packed_shapes(self, e, n, k, g):
        return {"qweight": ((e, n, k // 2), torch.uint8), "absmax": ((e, n * k // g), torch.float32)}

    def pack(self, w, g):
        return _quantize_nf4(w, g)

    def dequantize(self, qweight, scales):
        return _dequantize(qweight, scales)


METHOD = NF4()


class NF4Experts(QuantizedExperts):
    """Layouts: "cpu" (bitsandbytes' AVX512-BF16 GEMV packing, absmax as bf16 (E, K/B, N)) and
    "bnb" (bitsandbytes' flat format through `bnb.matmul_4bit`: CUDA, or other CPUs)."""

    quant = METHOD

    @classmethod
    def _choose_layout(cls, device, packed):
        functional = bitsandbytes().functional
        if device.type != "cpu" or not hasattr(functional, "_convert_weight_packed_for_cpu") \
                or not functional.has_avx512bf16():
            return "bnb"
        # its packing takes rows 32 at a time (blocks never straddle rows: see group_for)
        return "cpu" if all(packed[f"{p}.qweight"].shape[1] % 32 == 0 for p in PARTS) else "bnb"

    def _block(self, part: str) -> int:
        n, k = self.part_shape(part)
        return n * k // getattr(self, part + "_s")[0].numel()

    def _to_kernel(self, part, q, s):
        if self.layout == "bnb":
            return q, s.float()
        (n, k), e = self.part_shape(part), q.shape[0]
        kernel_s = s.view(e, n, -1).transpose(1, 2).to(torch.bfloat16).contiguous()  # (E, K/B, N)
        return _convert_each(q, _nf4_cpu_converter(n, k, n * k // s.shape[1])), kernel_s

    def _to_portable(self, part, q, s):
        if self.layout == "bnb":
            return q, s
        n, k = self.part_shape(part)
        b = self._block(part)
        q = _portable_codes(q, _inverse_layout(("nf4", n, k, b), n, k, _nf4_cpu_converter(n, k, b)), n, k)
        return q, s.transpose(1, 2).reshape(q.shape[0], -1).float()

    def _linear(self, part, e, x):
        n, k = self.part_shape(part)
        q, s = self._weights(part, e)
        if self.layout == "cpu":
            out = torch.ops.bitsandbytes.gemv_4bit.default(_bf16(x), q, [n, k], s, _nf4_code(str(x.device)),
                                                           self._block(part))
            return out.to(x.dtype)
        bnb = bitsandbytes()
        state = bnb.functional.QuantState(absmax=s, shape=torch.Size([n, k]), code=_nf4_code(str(x.device)),
                                          blocksize=self._block(part), quant_type="nf4", dtype=x.dtype)
        return bnb.matmul_4bit(x, q.view(-1, 1).t(), state)


def _nf4_cpu_converter(n: int, k: int, b: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Portable bytes (N, K/2) -> bitsandbytes' CPU GEMV packing (its own converter)."""
    functional = bitsandbytes().functional

    def convert(portable: torch.Tensor) -> torch.Tensor:
        state = functional.QuantState(absmax=torch.ones(n * k // b), shape=torch.Size([n, k]), code=_nf4_code("cpu"),
                                      blocksize=b, quant_type="nf4", dtype=torch.bfloat16)
        return functional._convert_weight_packed_for_cpu(portable.reshape(-1, 1).contiguous(), state)[0]
    return convert


@functools.lru_cache(maxsize=None)
def _nf4_code(device: str) -> torch.Tensor:
    return _nf4_table()[0].to(device)


def bitsandbytes():
    """bitsandbytes, imported on first use. Its CPU backend logs a warning at import about an
    optional kernel package; the GEMV used here does not need it, so that is kept quiet."""
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        raise QuantizationError(f"nf4 needs {METHOD.info.needs}: pip install 'dsvl2[quant]', or use int4, which "
                                "needs nothing extra") from None
    finally:
        log.setLevel(level)
    return bitsandbytes
