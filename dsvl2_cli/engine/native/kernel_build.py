"""Building the native CPU kernels (csrc/cpu_kernels.c) and loading them: compiled with the system C
compiler on first use (-O3 -march=native -fopenmp, about a second), cached under
~/.cache/dsvl2/kernels keyed by source, compiler and CPU, with a record of each library's size and
sha256 checked before every load (a damaged copy is rebuilt, never mapped), and opened with
ctypes: no Python extension ABI, no torch headers. The library links the same libgomp as torch,
so both share one thread pool. kernels.py holds the loaded library and the wrappers that call it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ... import files, settings

_SOURCE = Path(__file__).parents[2] / "csrc" / "cpu_kernels.c"


# Compile variants: name -> (flags added after -march=native, the dsvl2_kernel_isa() it must
# report). Flags only take features away from what the CPU has, so every variant runs wherever
# the native build does. "native" is the build decoding uses; the others keep the AVX512F, AVX2
# and plain-C paths tested on a machine that would never pick them (tests/test_kernel_build.py).
VARIANTS: dict[str, tuple[tuple[str, ...], int | None]] = {
    "native": ((), None),
    "avx512": (("-mno-avx512bf16",), 2),
    "avx2": (("-mno-avx512f",), 1),
    "portable": (("-mno-avx512f", "-mno-avx2"), 0),
}
ISA_NAMES = {3: "AVX512-BF16", 2: "AVX512", 1: "AVX2", 0: "portable C"}


class KernelBuildError(Exception):
    """The kernels cannot be built or loaded here; the message is one line for `status()`."""


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


def _compiler() -> list[str]:
    """The C compiler as an argument list: $CC split like a shell would ("ccache gcc"), else cc/gcc."""
    given = settings.c_compiler()
    if given:
        try:
            cmd = shlex.split(given)
        except ValueError as err:
            raise KernelBuildError(f"cannot parse CC={given!r} ({err})") from None
        if cmd:
            return cmd
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise KernelBuildError("no C compiler found (install gcc to enable the fast CPU kernels)")
    return [cc]


def _flags(variant: str) -> list[str]:
    return ["-O3", "-march=native", *VARIANTS[variant][0], "-fopenmp", "-shared", "-fPIC"]


def _compile(cc: list[str], out: Path, variant: str = "native") -> None:
    torch_lib = Path(torch.__file__).parent / "lib"
    cmd = [*cc, *_flags(variant), str(_SOURCE), "-o", str(out), "-lm"]
    if (torch_lib / "libgomp.so.1").exists():
        # resolve OpenMP to torch's copy at run time: one runtime, one thread pool
        cmd += [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}"]
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise KernelBuildError(f"compiling the CPU kernels failed: {cc[0]} not found") from None
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelBuildError(f"compiling the CPU kernels failed ({type(err).__name__}: {err})") from None
    if done.returncode != 0 or not out.is_file() or out.stat().st_size == 0:  # `out` was made empty beforehand
        first = next((line.strip() for line in (done.stderr or "").splitlines() if line.strip()), "no message")
        raise KernelBuildError(f"compiling the CPU kernels failed: {' '.join(cc)} exited with status "
                               f"{done.returncode}: {first[:200]}")


def _sha256(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _verified(target: Path) -> bool | None:
    """Whether the cached library matches the size and sha256 recorded when it was built:
    True, False (damaged: truncated, overwritten), or None when there is no file or no record
    (not built yet, or built by an older dsvl2)."""
    side = _sidecar(target)
    if not target.exists() or not side.exists():
        return None
    try:
        size, digest = side.read_text().split()
        return _sha256(target) == (int(size), digest)
    except (OSError, ValueError):
        return False


def _build_into(cc: list[str], variant: str, target: Path) -> None:
    """Compile beside `target`, then move the library and its record into place atomically
    (library first): a reader sees complete files or none."""
    with files.Replacement(target, prefix=".build-", suffix=".so", executable=True) as built:
        _compile(cc, built.tmp, variant)
        size, digest = _sha256(built.tmp)
    files.write_atomic(_sidecar(target), f"{size} {digest}\n".encode(), prefix=".build-", suffix=".sha256",
                       fsync=False, normal_mode=True)


_warned: set[Path] = set()


def build(variant: str = "native") -> Path:
    """Compile the kernels for `variant` (see VARIANTS), or find them in the cache, verified
    against their size and sha256; returns the library's path. A damaged cached copy is rebuilt
    (with one warning line on stderr). When the cache folder cannot be written the library is
    built in a temporary folder instead (the caller may delete it once loaded). Raises
    KernelBuildError with a one-line reason."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown kernel variant {variant!r}; one of {', '.join(VARIANTS)}")
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise KernelBuildError(f"no kernels for {sys.platform}/{platform.machine()} yet")
    cc = _compiler()
    try:
        version = subprocess.run([*cc, "--version"], check=False, capture_output=True, text=True,
                                 timeout=30).stdout
    except FileNotFoundError:
        raise KernelBuildError(f"C compiler {cc[0]} not found (CC={settings.c_compiler()!r})") from None
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelBuildError(f"cannot run the C compiler {cc[0]} ({type(err).__name__})") from None
    parts = [_SOURCE.read_bytes(), version.encode(), _cpu_signature().encode(), torch.__version__.encode()]
    if variant != "native":  # the native build keeps the key it always had
        parts.append(" ".join(_flags(variant)).encode())
    if len(cc) > 1:
        parts.append(" ".join(cc).encode())
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
    name = f"cpu_kernels-{key}.so" if variant == "native" else f"cpu_kernels-{variant}-{key}.so"
    target = _cache_dir() / name
    state = _verified(target)
    if state:
        return target
    if state is False and target not in _warned:
        _warned.add(target)
        print(f"dsvl2: warning: the cached CPU kernels {target} are damaged (size or sha256 differs "
              f"from when they were built); rebuilding them", file=sys.stderr)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _build_into(cc, variant, target)
        return target
    except OSError as err:
        cache_error = err
    # the cache cannot be written (read-only home, a file in the way): build for this run only
    try:
        tmp = Path(tempfile.mkdtemp(prefix="dsvl2-kernels-"))
    except OSError:
        raise KernelBuildError(f"cannot write the kernel cache {target.parent} "
                               f"({cache_error.strerror or cache_error}) nor a temporary folder") from None
    try:
        _build_into(cc, variant, tmp / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp / name


def open_library(path: str | os.PathLike) -> ctypes.CDLL:
    """Load a library `build` made, with the argument types of its functions declared."""
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.dsvl2_gemv_bf16.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, i64, ctypes.c_int, ctypes.c_int]
    lib.dsvl2_gemv_bf16.restype = None
    lib.dsvl2_moe_bf16.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ptr, i64, ptr, ptr, ctypes.c_int]
    lib.dsvl2_moe_bf16.restype = None
    lib.dsvl2_attn_decode_bf16.argtypes = [ptr, i64, i64, i64, ptr, ptr] + [i64] * 9 + [
        ctypes.c_float, ptr, ptr, ctypes.c_int]
    lib.dsvl2_attn_decode_bf16.restype = None
    lib.dsvl2_attn_prefill_bf16.argtypes = [ptr] * 4 + [i64] * 19 + [ctypes.c_float, ctypes.c_int, i64, ptr,
                                                                      ctypes.c_int]
    lib.dsvl2_attn_prefill_bf16.restype = None
    lib.dsvl2_attn_prefill_bytes.argtypes = [i64, i64, i64, i64, ctypes.c_int]
    lib.dsvl2_attn_prefill_bytes.restype = i64
    lib.dsvl2_head_gemv_bf16.argtypes = [ptr, i64, i64, ptr, i64, i64, ctypes.c_int, ptr, ctypes.c_int]
    lib.dsvl2_head_gemv_bf16.restype = None
    lib.dsvl2_moe_quant.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ptr, i64, ptr, ptr, i64, i64, i64, ptr, ptr,
                                    i64, i64, i64, i64, ctypes.c_int, ptr, ptr, ctypes.c_int]
    lib.dsvl2_moe_quant.restype = None
    lib.dsvl2_kernel_isa.restype = ctypes.c_int
    lib.dsvl2_bias_gelu_bf16.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_int]
    lib.dsvl2_bias_gelu_bf16.restype = None
    lib.dsvl2_layer_norm_bf16.argtypes = [ptr, i64, i64, i64, ptr, ptr, ctypes.c_float, ptr, ctypes.c_int]
    lib.dsvl2_layer_norm_bf16.restype = None
    lib.dsvl2_rms_norm_bf16.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_float, ptr, ctypes.c_int]
    lib.dsvl2_rms_norm_bf16.restype = None
    lib.dsvl2_rope_bf16.argtypes = [ptr, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, i64, i64, ctypes.c_int,
                                    ptr, ctypes.c_int]
    lib.dsvl2_rope_bf16.restype = None
    lib.dsvl2_silu_mul_bf16.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_int]
    lib.dsvl2_silu_mul_bf16.restype = None
    lib.dsvl2_moe_combine_bf16.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, ptr, ctypes.c_int]
    lib.dsvl2_moe_combine_bf16.restype = None
    lib.dsvl2_stream_read.argtypes = [ptr, i64, ctypes.c_int]
    lib.dsvl2_stream_read.restype = ctypes.c_uint64
    lib.dsvl2_int8_vnni.restype = ctypes.c_int
    lib.dsvl2_int8_pack_weights.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.dsvl2_int8_pack_weights.restype = None
    lib.dsvl2_int8_quantize_rows.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ctypes.c_int]
    lib.dsvl2_int8_quantize_rows.restype = None
    lib.dsvl2_int8_gemm.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_int, ptr, i64,
                                    ctypes.c_int]
    lib.dsvl2_int8_gemm.restype = ctypes.c_int
    return lib


def probe(variant: str = "native") -> tuple[ctypes.CDLL | None, str]:
    """Build (or find) and load one variant: (library, "") or (None, the one-line reason).
    A variant other than "native" must report its ISA level (VARIANTS), else it is refused."""
    if not settings.kernels_enabled():
        return None, "disabled by DSVL2_KERNELS=0"
    try:
        path = build(variant)
        try:
            lib = open_library(path)
        finally:
            if path.parent != _cache_dir():  # built for this run only: the loaded mapping outlives the file
                shutil.rmtree(path.parent, ignore_errors=True)
    except KernelBuildError as err:
        return None, str(err)
    except (OSError, AttributeError) as err:
        return None, f"loading the CPU kernels failed ({type(err).__name__}: {err}); using torch"
    want, got = VARIANTS[variant][1], lib.dsvl2_kernel_isa()
    if want is not None and got != want:
        return None, f"the {variant} build reports {ISA_NAMES.get(got, got)}, not {ISA_NAMES[want]}"
    return lib, ""
