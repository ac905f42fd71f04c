"""Opt-in int8 linears for the SigLIP vision tower (`load(..., vision_int8=True)`,
DSVL2_VISION_INT8=1, `--vision-int8`).

The tower's four linears per block (attn.qkv, attn.proj, mlp.fc1, mlp.fc2) are ~95% of its
work, and the bf16 GEMM already runs near this CPU's bf16 peak. AVX512-VNNI's u8 x s8 dot
product does twice the multiply-adds per instruction, so with the weights quantized per output
channel at load and each activation row quantized per call (symmetric int8, one scale per row)
the linears run ~2x faster (csrc/cpu_kernels.c, "int8 vision linears"). The cost is accuracy:
two roundings to 8 bits per product, measured in benchmarks/bench_vision_int8.py and the README.

Only the vision tower: the language model's prefill and decode are unchanged, and so is the
projector. The bf16 weights stay as they are (memory-mapped file pages, the fallback path). The
packed int8 weights (~N*K bytes per linear: 0.41 GB for SigLIP-SO400M) are made once per model
and kept as an entry of the mapped folder (engine/loading/mapped.py's format and checks, the quant key
QUANT_KEY, listed and pruned by `dsvl2 cache` like the other layouts): later loads map them
instead of packing (~0.4 s) and share their pages between processes. Without DSVL2_MMAP, or when
the folder cannot be written, they are packed into private memory at every load.
Where the VNNI kernel is not there (another CPU, another kernel build, `kernels.disabled()`) each
module runs its plain bf16 forward at call time.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ... import settings
from ...model.vision import VisionMLP, VisionTower
from . import int8_kernels, kernels
from ..loading import mapped, mapped_store
from ..prompt_store import model_fingerprint

# the packing's version and panel width: a change to int8_kernels.pack_int8's layout must change it
QUANT_KEY = f"vision-int8-v1-p{int8_kernels.INT8_PANEL}"


class Int8Linear(nn.Linear):
    """nn.Linear (bf16 weight and bias kept, untouched) with an int8 copy of the weight for the
    VNNI GEMM; `pack()` makes the copy. forward(x, gelu=True) applies tanh-GELU after the bias."""

    def pack(self, packed: int8_kernels.Int8Weight | None = None) -> bool:
        """Quantize and pack the weight (once, at load), or take `packed` (mapped from the cache);
        False when the kernels cannot."""
        self.int8 = packed if packed is not None else int8_kernels.pack_int8(self.weight.detach())
        # the epilogue adds a float32 bias (N,): converted once here, not per call
        self.bias_f32 = None if self.bias is None else self.bias.detach().float().contiguous()
        return self.int8 is not None

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        packed = getattr(self, "int8", None)
        if packed is not None:
            out = int8_kernels.int8_linear(x, packed, self.bias_f32, gelu)  # (..., N) bf16 or None
            if out is not None:
                return out
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y, approximate="tanh") if gelu else y


class Int8VisionMLP(VisionMLP):
    """SigLIP's MLP with both linears in int8 and fc1's bias + tanh-GELU in its GEMM's epilogue."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x, gelu=True))


def _int8_linear(old: nn.Module, packed: int8_kernels.Int8Weight | None = None) -> nn.Module:
    """An Int8Linear holding `old`'s very parameters (no copy), packed (or given `packed`); `old`
    itself when it is not a plain bf16 nn.Linear the kernels can pack."""
    if type(old) is not nn.Linear:
        return old
    with torch.device("meta"):
        new = Int8Linear(old.in_features, old.out_features, old.bias is not None)
    new.load_state_dict(old.state_dict(), assign=True)
    return new.train(old.training) if new.pack(packed) else old


def _linears(tower: VisionTower) -> dict[str, nn.Linear]:
    """The linears the int8 tower replaces, by name in the tower: qkv, proj, fc1, fc2 per block."""
    return {name: m for name, m in tower.named_modules()
            if type(m) is nn.Linear and name.rsplit(".", 1)[-1] in ("qkv", "proj", "fc1", "fc2")}


def _table(linears: dict[str, nn.Linear]) -> mapped.Table:
    """The cache entry's tensors: each linear's packed codes, scales and corrections."""
    table: mapped.Table = {}
    for name, lin in linears.items():
        n, k = lin.weight.shape
        np_, kp = -(-n // int8_kernels.INT8_PANEL) * int8_kernels.INT8_PANEL, -(-k // 4) * 4
        table[f"{name}.packed"] = ((np_ // int8_kernels.INT8_PANEL, kp // 4, int8_kernels.INT8_PANEL, 4), torch.int8)
        table[f"{name}.scales"] = ((np_,), torch.float32)
        table[f"{name}.corr"] = ((np_,), torch.int32)
    return table


def _entry_paths(fingerprint: str) -> tuple[Path, Path]:
    stem = f"{fingerprint}-bf16-{QUANT_KEY}"
    folder = settings.mapped_dir()
    return folder / f"{stem}{mapped_store.DATA_SUFFIX}", folder / f"{stem}{mapped_store.RECORD_SUFFIX}"


def _cached(model_dir: Path, linears: dict[str, nn.Linear]) -> dict[str, int8_kernels.Int8Weight] | None:
    """The packed weights of `linears`, mapped from the cache (written first when missing or
    unsound); None when the cache cannot be used (then the caller packs into memory)."""
    fingerprint = model_fingerprint(model_dir)
    data_path, record_path = _entry_paths(fingerprint)
    source, table = str(Path(model_dir).resolve()), _table(linears)
    checked = mapped.check_entry(data_path, record_path, table, source, torch.bfloat16, QUANT_KEY)
    if isinstance(checked, str):
        if checked != "missing":
            warnings.warn(f"{data_path}: int8 vision cache not used ({checked}); packing it again", stacklevel=3)
        for p in (record_path, data_path):  # the record first: a half-removed entry is never "complete"
            with contextlib.suppress(OSError):
                p.unlink()

        def packed():
            for name, lin in linears.items():
                w = int8_kernels.pack_int8(lin.weight.detach())
                yield from ((f"{name}.packed", w.packed), (f"{name}.scales", w.scales), (f"{name}.corr", w.corr))

        try:
            mapped.write_tensors(data_path, record_path, table, packed(), source, torch.bfloat16, QUANT_KEY,
                                 fingerprint)
        except OSError as err:
            warnings.warn(f"{data_path.parent}: cannot write the int8 vision cache ({err.strerror or err}); "
                          "packing into memory instead", stacklevel=3)
            return None
        checked = mapped.check_entry(data_path, record_path, table, source, torch.bfloat16, QUANT_KEY)
        if isinstance(checked, str):
            return None
    try:
        tensors = mapped.map_tensors(data_path, *checked, table)
    except (OSError, RuntimeError):  # removed by `dsvl2 cache clear` between the check and the map
        return None
    out = {}
    for name, lin in linears.items():
        n, k = lin.weight.shape
        out[name] = int8_kernels.Int8Weight(tensors[f"{name}.packed"], tensors[f"{name}.scales"],
                                       tensors[f"{name}.corr"], n, k)
    return out


def unavailable(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the int8 vision tower cannot run with this dtype and device here (None: it can)."""
    if device.type != "cpu":
        return f"it runs on CPU, this model is on {device.type}"
    if dtype != torch.bfloat16:
        return f"it needs bfloat16 weights, not {str(dtype).removeprefix('torch.')}"
    if not kernels.available():
        return f"no native CPU kernels: {kernels.status().removeprefix('torch (').removesuffix(')')}"
    if not int8_kernels.int8_gemm_available():
        return "this CPU or kernel build has no AVX512-VNNI"
    return None


def install(tower: VisionTower, model_dir: Path | None = None) -> int:
    """Swap every block's qkv, proj, fc1 and fc2 for int8 ones (after fast.install_vision: its
    FastVisionMLPs become Int8VisionMLPs holding the same parameters); returns the bytes of int8
    weights in use (0: nothing swapped, no VNNI kernel here). With `model_dir` (the loader passes
    it when it maps the weights) the packed ones come from the mapped cache (module docstring)."""
    if not int8_kernels.int8_gemm_available():
        return 0
    linears = _linears(tower)
    given = (_cached(Path(model_dir), linears) if model_dir is not None else None) or {}
    made = 0
    for i, block in enumerate(tower.blocks):
        attn, mlp = block.attn, block.mlp
        for name in ("qkv", "proj"):
            setattr(attn, name, _int8_linear(getattr(attn, name), given.get(f"blocks.{i}.attn.{name}")))
        if isinstance(mlp, VisionMLP):
            fc1 = _int8_linear(mlp.fc1, given.get(f"blocks.{i}.mlp.fc1"))
            fc2 = _int8_linear(mlp.fc2, given.get(f"blocks.{i}.mlp.fc2"))
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


__all__ = ["Int8Linear", "Int8VisionMLP", "enabled", "install", "unavailable"]
