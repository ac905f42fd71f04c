"""Optional native CPU kernels for decoding (csrc/cpu_kernels.c), with torch as the fallback: the
library loaded once per process (built, cached and verified by kernel_build.py) and the ctypes
wrappers that call it.

Decoding a token is a chain of matrix-vector products bound by memory traffic, and torch's bf16
GEMV runs at a fraction of the memory bandwidth. The C kernels stream weights at close to it.

Used only where they apply: CPU tensors, bfloat16, a few rows (decode and small batches); and
attention for many query rows (prefill, the vision tower: `prefill_attention`, ~2-3x torch's
SDPA on AVX512-BF16); the vision tower's elementwise passes (`bias_gelu_`, `layer_norm`); opt-in,
the vision tower's linears in int8 (engine/native/int8_kernels.py's wrappers: AVX512-VNNI only). Set
DSVL2_KERNELS=0 to use torch everywhere (results agree within bf16 rounding; see the tests).
"""

from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .kernel_build import ISA_NAMES, probe

MAX_ROWS = 8  # beyond this a GEMM (torch) is faster than repeated GEMVs
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_failure: str | None = None
_off = threading.local()  # per-thread switch for `disabled()`


# ------------------------------------------------------------------ the loaded library

def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _failure
    with _lock:
        if _tried:
            return _lib
        _tried = True
        _lib, why = probe("native")
        _failure = why or None
        return _lib


@contextmanager
def using(variant: str):
    """Make the kernels of `variant` the ones the dispatch functions call (and `status()`
    reports) inside the block, then restore the loaded ones; for tests of every compiled path.
    When the variant cannot be built or loaded the block runs on torch, with the reason in
    `status()`. Yields the library or None. Not for use while other threads decode."""
    global _lib, _tried, _failure
    _load()
    lib, why = probe(variant)
    with _lock:
        saved = _lib, _tried, _failure
        _lib, _tried, _failure = lib, True, (why or None)
    try:
        yield lib
    finally:
        with _lock:
            _lib, _tried, _failure = saved


def status() -> str:
    """One line for `dsvl2 info` and benchmarks: which kernels run decoding."""
    lib = _load()
    if lib is None:
        return f"torch ({_failure})"
    isa = ISA_NAMES.get(lib.dsvl2_kernel_isa(), "unknown")
    return f"native CPU kernels ({isa})"


@contextmanager
def disabled():
    """Run the enclosed code on the torch path (equivalence tests, same-run comparisons)."""
    previous = getattr(_off, "value", False)
    _off.value = True
    try:
        yield
    finally:
        _off.value = previous


def available() -> bool:
    """Whether the native kernels built here (whatever `disabled()` says for this thread)."""
    return _load() is not None


def _enabled() -> bool:
    """Kernels built and not switched off for this thread (`disabled()`)."""
    return not getattr(_off, "value", False) and _load() is not None


def library() -> ctypes.CDLL | None:
    """The loaded kernels for a wrapper outside this module (int8_kernels.py), None where they are
    not built or are `disabled()` for this thread."""
    return _lib if _enabled() else None


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a bf16 kernel can take x with these weights here and now (bf16 CPU tensors, no
    autograd, contiguous weights, kernels built and not `disabled()`)."""
    return _usable(x, *weights)


def _usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and not x.requires_grad
            and all(w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous() for w in weights)
            and _enabled())


_scratch = threading.local()  # one call's scratch, kept per thread between calls (see `scratch`)
SCRATCH_KEPT = 64 << 20  # larger scratch (long MLA prefills) is not kept after the call


def scratch(nbytes: int) -> torch.Tensor:
    """A uint8 buffer of at least `nbytes` for one native call's scratch (the contents are not
    kept; no wrapper holds it past its call), one per thread, reused up to SCRATCH_KEPT: a fresh
    15 MB one per vision layer cost ~3 ms of page faults, a tenth of the prefill kernel's time,
    and decoding would allocate one per kernel call ~70 times a token. Beyond the cap the work
    grows with the square of the length and the faults matter less."""
    buf = getattr(_scratch, "buf", None)
    if buf is not None and buf.numel() >= nbytes:
        return buf
    buf = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)
    if nbytes <= SCRATCH_KEPT:
        _scratch.buf = buf
    return buf


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias; native GEMV when x has at most MAX_ROWS rows."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if rows == 0 or rows > MAX_ROWS or not _usable(x, weight):
        return F.linear(x, weight)
    if not x.is_contiguous():  # (..., K) rows K apart, as the kernel reads them
        x = x.contiguous()
    n, k = weight.shape
    # the output in its final shape: a decode step makes ~50 of these calls, and each reshape or
    # view is one more dispatched op (~5 us) around a GEMV of ~300 us
    out = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    _lib.dsvl2_gemv_bf16(x.data_ptr(), k, rows, weight.data_ptr(), n, k, out.data_ptr(), n, 0,
                         torch.get_num_threads())
    return out


def moe_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor | None:
    """Routed experts for a few tokens in one native call; None when the kernel does not apply.

    x (T, D) bf16, ids (T, k) int64, weights (T, k) float32, gate_up (E, 2M, D), down (E, D, M).
    """
    t, d = x.shape
    if t > MAX_ROWS or not _usable(x, gate_up, down):
        return None
    k, m = ids.shape[1], down.shape[2]
    x = x.contiguous()
    ids = ids.contiguous()
    if weights.dtype != torch.float32:
        weights = weights.float()
    weights = weights.contiguous()
    items = t * k
    work = scratch(4 * (items * (2 * m + d) + (items * m + 1) // 2))
    out = torch.empty(t, d, dtype=torch.bfloat16)
    _lib.dsvl2_moe_bf16(x.data_ptr(), t, d, ids.data_ptr(), weights.data_ptr(), k, gate_up.data_ptr(),
                        down.data_ptr(), m, out.data_ptr(), work.data_ptr(), torch.get_num_threads())
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """softmax(scale * q k^T) v over every cached key, for a few query rows; None when the
    kernel does not apply (then use torch).

    q (B, H, Tq, d); k (B, Hk, L, d) and v (B, Hk, L, dv), Hk dividing H, may be strided views of
    a cache (unit stride along the last dim). No mask: every query row sees every key, which holds
    for one new token per sequence without padding. Returns (B, H, Tq, dv) bf16.
    """
    b, h, tq, d = q.shape
    hk, length, dv = k.shape[1], k.shape[2], v.shape[3]
    if (b * h * tq > 64 * MAX_ROWS or length == 0 or h % hk or not _usable(q)
            or k.dtype != torch.bfloat16 or v.dtype != torch.bfloat16
            or k.stride(-1) != 1 or v.stride(-1) != 1 or k.device.type != "cpu" or v.device.type != "cpu"):
        return None
    q = q.contiguous()  # (B, H, Tq, d) = (B*Hk groups, H/Hk*Tq rows, d): a group's heads are adjacent
    groups, rows = b * hk, (h // hk) * tq
    scores = scratch(4 * groups * rows * length)
    out = torch.empty(b, h, tq, dv, dtype=torch.bfloat16)
    _lib.dsvl2_attn_decode_bf16(q.data_ptr(), groups, rows, d, k.data_ptr(), v.data_ptr(), hk,
                                k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                                dv, length, scale, scores.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


PREFILL_MAX_DIM = 256  # head dims the prefill kernel's scratch is sized for
FAST_PREFILL_ISA = 3  # below AVX512-BF16 the kernel's plain-C loops are slower than torch's SDPA
def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False,
                      offset: int = 0, merge_heads: bool = False, min_isa: int = FAST_PREFILL_ISA
                      ) -> torch.Tensor | None:
    """softmax(scale q k^T) v for many query rows (prefill, the vision tower); None when the
    kernel does not apply (then use torch).

    q (B, H, T, d), k (B, Hk, L, d), v (B, Hk, L, dv), Hk dividing H: any strides with unit
    stride along the last dim (views of a fused qkv projection are read in place). causal: query
    i sits at position offset + i and sees keys 0..offset+i (offset 0 with T == L is ordinary
    causal prefill; L - T for a chunk after a cache); else every query sees every key. No other
    mask. Returns (B, H, T, dv) bf16, or (B, T, H*dv) with `merge_heads` (written in that layout
    directly: the input of the output projection). min_isa: the slowest kernel build used; tests
    lower it to check the portable paths.
    """
    b, h, t, d = q.shape
    hk, length, dv = k.shape[1], k.shape[2], v.shape[3]
    tensors = (q, k, v)
    if (t == 0 or length == 0 or h % hk or k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[3] != d
            or max(d, dv) > PREFILL_MAX_DIM or (causal and offset < 0)
            or any(x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.requires_grad or x.stride(-1) != 1
                   for x in tensors)
            or not _enabled() or _lib.dsvl2_kernel_isa() < min_isa):
        return None
    threads = torch.get_num_threads()
    work = scratch(_lib.dsvl2_attn_prefill_bytes(b * hk, length, d, dv, threads))
    out = torch.empty(b, t, h, dv, dtype=torch.bfloat16) if merge_heads else torch.empty(b, h, t, dv, dtype=torch.bfloat16)
    o_bs, o_hs, o_ts = (out.stride(0), out.stride(2), out.stride(1)) if merge_heads else out.stride()[:3]
    _lib.dsvl2_attn_prefill_bf16(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, h, hk, t, length, d, dv,
                                 *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], o_bs, o_hs, o_ts, scale,
                                 int(causal), offset, work.data_ptr(), threads)
    return out.view(b, t, h * dv) if merge_heads else out


def head_matmul(x: torch.Tensor, w: torch.Tensor, w_is_kn: bool) -> torch.Tensor | None:
    """Per-head products for a few rows: x (B, H, T, K) with w (H, N, K) -> x @ w^T, or with
    w (H, K, N) when `w_is_kn` -> x @ w; (B, H, T, N) bf16. None when the kernel does not apply."""
    b, h, t, k = x.shape
    n = w.shape[2] if w_is_kn else w.shape[1]
    if b * t > MAX_ROWS or (w_is_kn and n > 4096) or not _usable(x, w):
        return None
    rows = x.permute(1, 0, 2, 3).reshape(h, b * t, k).contiguous()  # (H, B*T, K)
    out = torch.empty(h, b * t, n, dtype=torch.bfloat16)
    _lib.dsvl2_head_gemv_bf16(rows.data_ptr(), h, b * t, w.data_ptr(), n, k, int(w_is_kn), out.data_ptr(),
                              torch.get_num_threads())
    return out.view(h, b, t, n).transpose(0, 1)  # (B, H, T, N)


def moe_experts_quant(bits: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                      gate_up: tuple[torch.Tensor, torch.Tensor], down: tuple[torch.Tensor, torch.Tensor]
                      ) -> torch.Tensor | None:
    """Quantized routed experts for a few tokens in one native call; None when it does not apply.

    x (T, D) float (used as bf16, as torch's int4/int8 kernels do), ids (T, k), weights (T, k).
    gate_up and down: (codes, scales) in quant/int4.py's and int8.py's CPU layouts. bits 4: torch's CPU
    int4 packing, which the caller has checked (`quant.cpu_int4_packing_is_blocked`): codes
    (E, N, K/2) uint8, scales and zeros (E, K/G, N, 2) bf16, N a multiple of 64. bits 8: codes
    (E, N, K) int8, scales (E, N) bf16. Returns (T, D) float32, the weighted sum over the k experts.
    """
    t, d = x.shape
    (gq, gs), (dq, ds) = gate_up, down
    m = gq.shape[1] // 2
    if (t > MAX_ROWS or x.device.type != "cpu" or (bits == 4 and (gq.shape[1] % 64 or dq.shape[1] % 64))
            or not _enabled()):
        return None
    g1, g2 = (d // gs.shape[1], m // ds.shape[1]) if bits == 4 else (d, m)
    xb = x.to(torch.bfloat16).contiguous()
    ids = ids.contiguous()
    weights = weights.to(torch.float32).contiguous()
    items = t * ids.shape[1]
    work = scratch(4 * (t * (d + d // g1) + items * (3 * m + m // g2 + d)))  # float32s
    out = torch.empty(t, d, dtype=torch.float32)
    _lib.dsvl2_moe_quant(bits, xb.data_ptr(), t, d, ids.data_ptr(), weights.data_ptr(), ids.shape[1],
                         gq.data_ptr(), gs.data_ptr(), gq[0].numel() * gq.element_size(), gs[0].numel(), g1,
                         dq.data_ptr(), ds.data_ptr(), dq[0].numel() * dq.element_size(), ds[0].numel(), g2, m,
                         int(x.dtype != torch.float32), out.data_ptr(), work.data_ptr(), torch.get_num_threads())
    return out


def _vector_param(p: torch.Tensor | None, n: int) -> bool:
    return p is None or (p.shape == (n,) and p.dtype == torch.bfloat16 and p.device.type == "cpu"
                         and p.is_contiguous())


def bias_gelu_(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """y = gelu_tanh(y + bias) in place (the vision MLP's fc1 after a bias-free GEMM): bf16, float32
    math, one bf16 rounding of the result. y contiguous (..., N), bias (N,) or None. Returns y, or
    None when the kernel does not apply (then y is untouched: use torch)."""
    n = y.shape[-1] if y.dim() else 0
    if (y.numel() == 0 or y.device.type != "cpu" or y.dtype != torch.bfloat16 or y.requires_grad
            or not y.is_contiguous() or not _vector_param(bias, n) or not _enabled()):
        return None
    _lib.dsvl2_bias_gelu_bf16(y.data_ptr(), y.numel() // n, n, n, 0 if bias is None else bias.data_ptr(),
                              torch.get_num_threads())
    return y


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
               ) -> torch.Tensor | None:
    """LayerNorm over the last dim (float32 statistics, bf16 in and out) without torch's input
    copy; x contiguous (..., N), weight and bias (N,) bf16 or None. None when it does not apply."""
    n = x.shape[-1] if x.dim() else 0
    if (x.numel() == 0 or x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.requires_grad
            or not x.is_contiguous() or not _vector_param(weight, n) or not _vector_param(bias, n)
            or not _enabled()):
        return None
    out = torch.empty_like(x)
    _lib.dsvl2_layer_norm_bf16(x.data_ptr(), x.numel() // n, n, n, 0 if weight is None else weight.data_ptr(),
                               0 if bias is None else bias.data_ptr(), eps, out.data_ptr(), torch.get_num_threads())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The language model's RMSNorm (float32 statistics; the normalised row rounded to bf16, then
    times the bf16 weight) in one native pass; x (..., N) bf16 with unit stride along N, weight
    (N,) bf16. None when it does not apply."""
    n = x.shape[-1] if x.dim() else 0
    if (x.numel() == 0 or x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.requires_grad
            or weight is None or not _vector_param(weight, n) or not _enabled()):
        return None
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    _lib.dsvl2_rms_norm_bf16(x.data_ptr(), x.numel() // n, n, n, weight.data_ptr(), eps, out.data_ptr(),
                             torch.get_num_threads())
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor | None:
    """model/attention.py's apply_rope in one native pass with the same three bf16 roundings:
    x (B, H, T, d) bf16, any strides with unit stride along d; cos and sin (B|1, 1, T, d) bf16
    with unit stride along d. Returns a contiguous (B, H, T, d), or None when it does not apply."""
    if (x.dim() != 4 or cos.dim() != 4 or x.numel() == 0 or x.dtype != torch.bfloat16 or x.requires_grad
            or x.device.type != "cpu" or x.shape[-1] % 2 or x.stride(-1) != 1 or not _enabled()):
        return None
    b, h, t, d = x.shape
    for table in (cos, sin):
        if (table.dtype != torch.bfloat16 or table.device.type != "cpu" or table.shape[1] != 1
                or table.shape[0] not in (1, b) or table.shape[2:] != (t, d) or table.stride(-1) != 1):
            return None
    if cos.stride() != sin.stride():
        return None
    cs_b = cos.stride(0) if cos.shape[0] > 1 else 0
    out = torch.empty(b, h, t, d, dtype=torch.bfloat16)
    _lib.dsvl2_rope_bf16(x.data_ptr(), b, h, t, d, x.stride(0), x.stride(1), x.stride(2), cos.data_ptr(),
                         sin.data_ptr(), cs_b, cos.stride(2), int(interleaved), out.data_ptr(), torch.get_num_threads())
    return out


def silu_mul(h: torch.Tensor, inner: int) -> torch.Tensor | None:
    """F.silu(gate) * up for h = gate | up (..., 2 * inner) bf16 with unit stride along the last
    dim, in one native pass with torch's two bf16 roundings: (..., inner). None when it does not
    apply."""
    if (h.dim() < 1 or h.shape[-1] != 2 * inner or h.numel() == 0 or h.dtype != torch.bfloat16
            or h.device.type != "cpu" or h.requires_grad or not _enabled()):
        return None
    if not h.is_contiguous():
        h = h.contiguous()
    out = torch.empty(*h.shape[:-1], inner, dtype=torch.bfloat16)
    _lib.dsvl2_silu_mul_bf16(h.data_ptr(), h.numel() // (2 * inner), inner, 2 * inner, out.data_ptr(),
                             torch.get_num_threads())
    return out


def moe_combine(sorted_out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
    """model/moe.py's combine step natively: sorted_out (N*k, D) bf16 (token copies sorted by
    expert, row i being copy order[i]), weights (N, k) float32 -> (N, D) bf16, each token's
    weighted sum of its k rows in float32. None when it does not apply."""
    n, k = weights.shape
    if (sorted_out.dim() != 2 or sorted_out.shape[0] != n * k or sorted_out.dtype != torch.bfloat16
            or sorted_out.device.type != "cpu" or sorted_out.requires_grad or order.dtype != torch.long
            or order.shape != (n * k,) or weights.dtype != torch.float32 or not _enabled()):
        return None
    sorted_out, order, weights = sorted_out.contiguous(), order.contiguous(), weights.contiguous()
    d = sorted_out.shape[1]
    out = torch.empty(n, d, dtype=torch.bfloat16)
    inv = torch.empty(n * k, dtype=torch.long)
    _lib.dsvl2_moe_combine_bf16(sorted_out.data_ptr(), order.data_ptr(), weights.data_ptr(), n, k, d,
                                inv.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


def stream_read(buf: torch.Tensor, threads: int | None = None) -> int | None:
    """Read every 64-bit word of a contiguous CPU tensor once in the native kernels' way (wide
    loads, one sequential stream per thread); returns the wrapping uint64 sum of the words, or
    None without the kernels. The benchmark times it for its memory bandwidth ceiling."""
    if buf.device.type != "cpu" or not buf.is_contiguous() or _load() is None:
        return None
    return _lib.dsvl2_stream_read(buf.data_ptr(), buf.numel() * buf.element_size(),
                                  threads or torch.get_num_threads())
