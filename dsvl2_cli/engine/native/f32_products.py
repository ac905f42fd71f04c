"""bf16 matrix products in float32 on CPUs without bf16 dot products (AVX2, AVX512 without BF16).

There torch's bf16 GEMMs have no fast kernel: on a 2-core AMD EPYC (Zen 3, AVX2) the vision
MLP's fc1 ran at 16 GFLOP/s in bf16 against 88 in float32, the routed experts' grouped GEMMs at
16 against 55 for a per-expert float32 loop, the patch-embedding convolution 28x slower
(benchmarks/bench_f32_products.py: the tower 4.4x faster in float32, a prefill 3.3x). So on such
a CPU the vision tower, the adaptor and every prefill pass of a bf16 model compute their products
in float32 from the bf16 weights (converted per call: the weights stay bf16, memory-mapped and
shared) and round the result back to bf16.
bf16 x bf16 products are exact in float32 and torch's bf16 GEMMs accumulate in float32 too, so
the results differ from the bf16 path by summation order only (tested at logit level).

Decode is not touched: its few rows go through the native GEMV kernels, which read bf16 and
accumulate in float32 on every ISA. `DSVL2_BF16_PRODUCTS` overrides the choice (auto, native,
float32).
"""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from ... import settings

# The products the model computes through torch (nn.Linear and nn.Conv2d call the F functions;
# the routed experts' torch._grouped_mm is avoided: `install` makes them loop over experts, so
# that one expert's weights are converted at a time, not all of a layer's).
PRODUCTS = frozenset({F.linear, F.conv2d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
                      torch.bmm, torch.addmm, torch.baddbmm, torch.einsum})
# Converting a weight costs about what 5 rows of its bf16 GEMM do here: fewer rows stay in bf16.
OP_MIN_ROWS = 4
# Passes with fewer rows (decode steps) are left alone: the native kernels take up to
# kernels.MAX_ROWS rows in bf16, and converting every weight of the model per step would cost more.
PASS_MIN_ROWS = 16


def native_bf16_dot() -> bool:
    """Whether this CPU has bf16 dot-product instructions torch's GEMMs use (x86 AVX512-BF16 or
    AMX, Arm's BF16 extension). Unknown (not Linux): assumed yes, the bf16 path as before."""
    flags = _cpu_flags()
    if flags is None:
        return True
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return None if platform.system() != "Linux" else frozenset()


def wanted(model_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a model of this dtype on this device computes its products in float32."""
    if model_dtype != torch.bfloat16 or device.type != "cpu":
        return False
    choice = settings.bf16_products()
    return choice == "float32" or (choice == "auto" and not native_bf16_dot())


def _rows(x) -> int:
    return x.numel() // max(x.shape[-1], 1) if isinstance(x, torch.Tensor) and x.dim() >= 2 else 0


class Float32Products(TorchFunctionMode):
    """Inside it, a product with a bf16 CPU tensor among its inputs runs in float32 and gives
    bf16; everything else runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS and _worth_it(func, args):
            out = func(*tree_map(_up, args), **tree_map(_up, kwargs))
            return out.to(torch.bfloat16)
        return func(*args, **kwargs)


def _operands(func, args) -> list[torch.Tensor]:
    if func is torch.einsum:  # (equation, *operands) or (equation, [operands])
        args = args[1][:] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    return [a for a in args if isinstance(a, torch.Tensor)]


def _worth_it(func, args) -> bool:
    tensors = _operands(func, args)
    if not any(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors):
        return False
    return func is F.conv2d or _rows(tensors[0]) >= OP_MIN_ROWS


def _up(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x


def wrap(module: nn.Module, rows_arg: int | None = None) -> None:
    """Run `module`'s forward inside Float32Products (when its positional argument `rows_arg`
    has at least PASS_MIN_ROWS rows; None: always). An instance attribute: the class stays."""
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if rows_arg is not None and _rows(args[rows_arg]) < PASS_MIN_ROWS:
            return inner(*args, **kwargs)
        with Float32Products():
            return inner(*args, **kwargs)

    module.forward = forward
    module.f32_products = True


def installed(module: nn.Module) -> bool:
    return bool(getattr(module, "f32_products", False))


__all__ = ["Float32Products", "installed", "native_bf16_dot", "wanted", "wrap"]
