"""Opt-in int8 linears for the SigLIP vision tower (`load(..., vision_int8=True)`,
DSVL2_VISION_INT8=1, `--vision-int8`).

The tower's four linears per block (attn.qkv, attn.proj, mlp.fc1, mlp.fc2) are ~95% of its
work, and the bf16 GEMM already runs near this CPU's bf16 peak. AVX512-VNNI's u8 x s8 dot
product does twice the multiply-adds per instruction, so with the weights quantized per output
channel at load and each activation row quantized per call (symmetric int8, one scale per row)
the linears run ~2x faster (csrc/cpu_kernels.c, "int8 vision linears"). The cost is accuracy:
two roundings to 8 bits per product, measured in benchmarks/bench_vision_int8.py and the README.

Only the vision tower: the language model's prefill and decode are unchanged, and so is the
projector. The bf16 weights stay as they are (memory-mapped file pages, the fallback path); the
int8 copies are new private memory, about N*K bytes per linear: ~0.4 GB for SigLIP-SO400M.
Where the VNNI kernel is not there (another CPU, another kernel build, `kernels.disabled()`) each
module runs its plain bf16 forward at call time.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..model.vision import VisionMLP, VisionTower
from . import kernels


class Int8Linear(nn.Linear):
    """nn.Linear (bf16 weight and bias kept, untouched) with an int8 copy of the weight for the
    VNNI GEMM; `pack()` makes the copy. forward(x, gelu=True) applies tanh-GELU after the bias."""

    def pack(self) -> bool:
        """Quantize and pack the weight (once, at load); False when the kernels cannot."""
        self.int8 = kernels.pack_int8(self.weight.detach())
        # the epilogue adds a float32 bias (N,): converted once here, not per call
        self.bias_f32 = None if self.bias is None else self.bias.detach().float().contiguous()
        return self.int8 is not None

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        packed = getattr(self, "int8", None)
        if packed is not None:
            out = kernels.int8_linear(x, packed, self.bias_f32, gelu)  # (..., N) bf16 or None
            if out is not None:
                return out
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y, approximate="tanh") if gelu else y


class Int8VisionMLP(VisionMLP):
    """SigLIP's MLP with both linears in int8 and fc1's bias + tanh-GELU in its GEMM's epilogue."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x, gelu=True))


def _int8_linear(old: nn.Module) -> nn.Module:
    """An Int8Linear holding `old`'s very parameters (no copy), packed; `old` itself when it is
    not a plain bf16 nn.Linear the kernels can pack."""
    if type(old) is not nn.Linear:
        return old
    with torch.device("meta"):
        new = Int8Linear(old.in_features, old.out_features, old.bias is not None)
    new.load_state_dict(old.state_dict(), assign=True)
    return new.train(old.training) if new.pack() else old


def install(tower: VisionTower) -> int:
    """Swap every block's qkv, proj, fc1 and fc2 for int8 ones (after fast.install_vision: its
    FastVisionMLPs become Int8VisionMLPs holding the same parameters); returns the bytes of int8
    weights made (0: nothing swapped, no VNNI kernel here)."""
    if not kernels.int8_gemm_available():
        return 0
    made = 0
    for block in tower.blocks:
        attn, mlp = block.attn, block.mlp
        for name in ("qkv", "proj"):
            setattr(attn, name, _int8_linear(getattr(attn, name)))
        if isinstance(mlp, VisionMLP):
            fc1, fc2 = _int8_linear(mlp.fc1), _int8_linear(mlp.fc2)
            if isinstance(fc1, Int8Linear) and isinstance(fc2, Int8Linear):
                shape = SimpleNamespace(width=fc1.in_features, mlp_hidden=fc1.out_features)  # what VisionMLP reads
                with torch.device("meta"):
                    block.mlp = Int8VisionMLP(shape).train(mlp.training)
                block.mlp.fc1, block.mlp.fc2 = fc1, fc2
        made += sum(m.int8.nbytes for m in block.modules() if isinstance(m, Int8Linear))
    return made


def enabled(tower: VisionTower) -> bool:
    """Whether `tower`'s linears were swapped for int8 ones."""
    return any(isinstance(m, Int8Linear) for m in tower.modules())


__all__ = ["Int8Linear", "Int8VisionMLP", "enabled", "install"]
