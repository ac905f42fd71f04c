"""Optional native CPU kernels for decoding (csrc/cpu_kernels.c), with torch as the fallback.

Decoding a token is a chain of matrix-vector products bound by memory traffic, and torch's bf16
GEMV runs at a fraction of the memory bandwidth. The C kernels stream weights at close to it.
They are compiled with the system C compiler on first use (-O3 -march=native -fopenmp, about a
second), cached under ~/.cache/dsvl2/kernels keyed by source, compiler and CPU, and loaded with
ctypes: no Python extension ABI, no torch headers. The library links the same libgomp as torch,
so both share one thread pool.

Used only where they apply: CPU tensors, bfloat16, a few rows (decode and small batches). Set
DSVL2_KERNELS=0 to use torch everywhere (results agree within bf16 rounding; see the tests).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import settings

MAX_ROWS = 8  # beyond this a GEMM (torch) is faster than repeated GEMVs
_SOURCE = Path(__file__).parents[1] / "csrc" / "cpu_kernels.c"
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_failure: str | None = None
_off = threading.local()  # per-thread switch for `disabled()`


def _cache_dir() -> Path:
    return settings.cache_dir() / "kernels"


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(cc: str, out: Path) -> None:
    torch_lib = Path(torch.__file__).parent / "lib"
    cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(_SOURCE), "-o", str(out), "-lm"]
    if (torch_lib / "libgomp.so.1").exists():
        # resolve OpenMP to torch's copy at run time: one runtime, one thread pool
        cmd += [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _failure
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if not settings.kernels_enabled():
            _failure = "disabled by DSVL2_KERNELS=0"
            return None
        if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
            _failure = f"no kernels for {sys.platform}/{platform.machine()} yet"
            return None
        cc = settings.c_compiler() or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            _failure = "no C compiler found (install gcc to enable the fast CPU kernels)"
            return None
        try:
            version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
            key = hashlib.sha256(b"\0".join([
                _SOURCE.read_bytes(), version.encode(), _cpu_signature().encode(), torch.__version__.encode(),
            ])).hexdigest()[:20]
            target = _cache_dir() / f"cpu_kernels-{key}.so"
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                    built = Path(tmp) / "k.so"
                    _compile(cc, built)
                    os.replace(built, target)  # atomic: concurrent first runs never see half a file
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as err:
            _failure = f"compiling the CPU kernels failed ({type(err).__name__}); using torch"
            return None
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.dsvl2_gemv_bf16.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, i64, ctypes.c_int, ctypes.c_int]
        lib.dsvl2_gemv_bf16.restype = None
        lib.dsvl2_moe_bf16.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ptr, i64, ptr, ptr, ctypes.c_int]
        lib.dsvl2_moe_bf16.restype = None
        lib.dsvl2_attn_decode_bf16.argtypes = [ptr, i64, i64, i64, ptr, ptr] + [i64] * 9 + [
            ctypes.c_float, ptr, ptr, ctypes.c_int]
        lib.dsvl2_attn_decode_bf16.restype = None
        lib.dsvl2_head_gemv_bf16.argtypes = [ptr, i64, i64, ptr, i64, i64, ctypes.c_int, ptr, ctypes.c_int]
        lib.dsvl2_head_gemv_bf16.restype = None
        lib.dsvl2_moe_quant.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ptr, i64, ptr, ptr, i64, i64, i64, ptr, ptr,
                                        i64, i64, i64, i64, ctypes.c_int, ptr, ptr, ctypes.c_int]
        lib.dsvl2_moe_quant.restype = None
        lib.dsvl2_kernel_isa.restype = ctypes.c_int
        _lib = lib
        return lib


def status() -> str:
    """One line for `dsvl2 info` and benchmarks: which kernels run decoding."""
    lib = _load()
    if lib is None:
        return f"torch ({_failure})"
    isa = {3: "AVX512-BF16", 2: "AVX512", 1: "AVX2", 0: "portable C"}[lib.dsvl2_kernel_isa()]
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


def _usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and not x.requires_grad
            and all(w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous() for w in weights)
            and _enabled())


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias; native GEMV when x has at most MAX_ROWS rows."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if rows == 0 or rows > MAX_ROWS or not _usable(x, weight):
        return F.linear(x, weight)
    x2 = x.reshape(rows, x.shape[-1]).contiguous()  # (M, K)
    n, k = weight.shape
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    _lib.dsvl2_gemv_bf16(x2.data_ptr(), k, rows, weight.data_ptr(), n, k, out.data_ptr(), n, 0,
                         torch.get_num_threads())
    return out.view(*x.shape[:-1], n)


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
    weights = weights.to(torch.float32).contiguous()
    items = t * k
    scratch = torch.empty(items * (2 * m + d) + (items * m + 1) // 2, dtype=torch.float32)
    out = torch.empty(t, d, dtype=torch.bfloat16)
    _lib.dsvl2_moe_bf16(x.data_ptr(), t, d, ids.data_ptr(), weights.data_ptr(), k, gate_up.data_ptr(),
                        down.data_ptr(), m, out.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
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
    scores = torch.empty(groups * rows * length, dtype=torch.float32)
    out = torch.empty(b, h, tq, dv, dtype=torch.bfloat16)
    _lib.dsvl2_attn_decode_bf16(q.data_ptr(), groups, rows, d, k.data_ptr(), v.data_ptr(), hk,
                                k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                                dv, length, scale, scores.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


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
    gate_up and down: (codes, scales) of quant.py's kernel layouts on CPU. bits 4: torch's CPU
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
    scratch = torch.empty(t * (d + d // g1) + items * (3 * m + m // g2 + d), dtype=torch.float32)
    out = torch.empty(t, d, dtype=torch.float32)
    _lib.dsvl2_moe_quant(bits, xb.data_ptr(), t, d, ids.data_ptr(), weights.data_ptr(), ids.shape[1],
                         gq.data_ptr(), gs.data_ptr(), gq[0].numel() * gq.element_size(), gs[0].numel(), g1,
                         dq.data_ptr(), ds.data_ptr(), dq[0].numel() * dq.element_size(), ds[0].numel(), g2, m,
                         int(x.dtype != torch.float32), out.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
    return out
