"""The int8 GEMM's wrappers (csrc/cpu_kernels.c, "int8 vision linears"; opt-in, AVX512-VNNI):
weight packing, row quantization and the u8 x s8 GEMM, for engine/native/vision_int8.py. Like every
wrapper in kernels.py (which holds the loaded library; kernel_build.py builds it and declares these
functions' signatures), each returns None where it does not apply, and the caller keeps its bf16
path."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels

INT8_PANEL = 64  # output columns per packed panel (I8_NR in cpu_kernels.c)


def int8_gemm_available() -> bool:
    """Whether the loaded kernels have the AVX512-VNNI int8 GEMM (and are not `disabled()` for
    this thread). Other builds compile it as a stub: the callers keep their bf16 path."""
    lib = kernels.library()
    return lib is not None and bool(lib.dsvl2_int8_vnni())


@dataclass(frozen=True)
class Int8Weight:
    """An (N, K) weight quantized per output channel and packed for `int8_linear`.

    packed (Np/64, Kp/4, 64, 4) int8 (Np = N up to a multiple of 64, Kp = K up to 4, zero padded),
    scales (Np,) float32 (dequantized w = q * scale), corr (Np,) int32 = 128 * sum_k q (the
    activations' +128 offset, taken off after the integer product)."""

    packed: torch.Tensor
    scales: torch.Tensor
    corr: torch.Tensor
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.corr))

    def codes(self) -> torch.Tensor:
        """The (N, K) int8 codes in nn.Linear's layout (for tests and accuracy checks)."""
        np_, kp = self.packed.shape[0] * INT8_PANEL, self.packed.shape[1] * 4
        return self.packed.permute(0, 2, 1, 3).reshape(np_, kp)[: self.n, : self.k]


def pack_int8(weight: torch.Tensor) -> Int8Weight | None:
    """Quantize a bf16 (N, K) CPU weight to symmetric int8 per output channel (round half to
    even of w * 127 / amax) and pack it for the VNNI GEMM; None when the kernels are not built.
    The result is new private memory (N * K bytes and change); `weight` is only read."""
    lib = kernels.library()
    if (lib is None or weight.dim() != 2 or weight.dtype != torch.bfloat16 or weight.device.type != "cpu"
            or not weight.is_contiguous() or weight.numel() == 0):
        return None
    n, k = weight.shape
    np_, kp = -(-n // INT8_PANEL) * INT8_PANEL, -(-k // 4) * 4
    packed = torch.empty(np_ // INT8_PANEL, kp // 4, INT8_PANEL, 4, dtype=torch.int8)
    scales = torch.empty(np_, dtype=torch.float32)
    corr = torch.empty(np_, dtype=torch.int32)
    lib.dsvl2_int8_pack_weights(weight.data_ptr(), n, k, packed.data_ptr(), scales.data_ptr(), corr.data_ptr(),
                                torch.get_num_threads())
    return Int8Weight(packed, scales, corr, n, k)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x (M, K) bf16 -> (codes (M, Kp) uint8 = round(x * 127 / amax_row) + 128, padded with 128
    to a multiple of 4; scales (M,) float32 = amax_row / 127); None without the kernels."""
    lib = kernels.library()
    if lib is None or x.dim() != 2 or x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.stride(-1) != 1:
        return None
    m, k = x.shape
    kp = -(-k // 4) * 4
    q = torch.empty(m, kp, dtype=torch.uint8)
    scales = torch.empty(m, dtype=torch.float32)
    lib.dsvl2_int8_quantize_rows(x.data_ptr(), m, k, x.stride(0), q.data_ptr(), kp, scales.data_ptr(),
                                 torch.get_num_threads())
    return q, scales


def int8_linear(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None, gelu: bool = False
                ) -> torch.Tensor | None:
    """y = x W^T + bias (then tanh-GELU with `gelu`) with x quantized per row to int8 and W the
    packed int8 `w`: x (..., K) bf16 CPU -> (..., N) bf16; bias (N,) float32 or None. None when it
    does not apply (no VNNI build, kernels disabled, wrong dtype or shape): use the bf16 path."""
    if (x.dim() == 0 or x.shape[-1] != w.k or x.dtype != torch.bfloat16 or x.device.type != "cpu"
            or x.requires_grad or x.numel() == 0 or not int8_gemm_available()
            or (bias is not None and (bias.shape != (w.n,) or bias.dtype != torch.float32
                                      or not bias.is_contiguous()))):
        return None
    rows = x.reshape(-1, w.k)  # (M, K): a view for the tower's contiguous activations
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m, kp = rows.shape[0], w.packed.shape[1] * 4
    # the quantized activations (up to 12.5 MB for fc2 of 4 tiles) in the per-thread scratch:
    # a fresh buffer per call cost page faults every layer (codes, then the row scales)
    need = m * kp + 4 * m
    buf = kernels.scratch(need)
    codes, scales = buf[: m * kp], buf[m * kp: need].view(torch.float32)
    threads, lib = torch.get_num_threads(), kernels.library()
    lib.dsvl2_int8_quantize_rows(rows.data_ptr(), m, w.k, rows.stride(0), codes.data_ptr(), kp, scales.data_ptr(),
                                 threads)
    out = torch.empty(m, w.n, dtype=torch.bfloat16)
    done = lib.dsvl2_int8_gemm(codes.data_ptr(), kp, scales.data_ptr(), m, w.packed.data_ptr(), w.scales.data_ptr(),
                               w.corr.data_ptr(), 0 if bias is None else bias.data_ptr(), w.n, kp, int(gelu),
                               out.data_ptr(), w.n, threads)
    if done != 0:
        return None
    return out.view(*x.shape[:-1], w.n)
