"""Quantized routed experts: int8, int4 and nf4 weights for the DeepSeekMoE routed experts.

Routed experts hold most of the parameters (tiny: 2.4B of 3.37B) and decoding streams the chosen
ones from memory for every token, so they are what gets quantized; attention, shared experts,
embeddings and lm_head stay in the compute dtype. "Pack once, swap modules at load": experts are
quantized into a portable packed form (quant_format.py), converted once to the layout of the kernel that
runs them, and the layer's `mlp.experts` module is replaced by a `QuantizedExperts` with the
interface of `moe.Experts` (`forward(x, ids, weights)`, `expert(e, x)`, float32 weighted sum).

Methods ("none" keeps the float experts):
  int8  per output channel, symmetric, bf16 scale: w = q * scale. torch `_weight_int8pack_mm`.
  int4  groups of G inputs (default 128), asymmetric, bf16 scale and zero per group:
        w = (q - 8) * scale + zero. torch `_weight_int4pack_mm_for_cpu` (CUDA: `_weight_int4pack_mm`).
  nf4   NormalFloat4 (QLoRA) in blocks of B inputs (default 64), float32 absmax per block:
        w = NF4[q] * absmax, bitsandbytes' format. bitsandbytes' AVX512-BF16 CPU GEMV where
        available, else `bnb.matmul_4bit` (CUDA; elsewhere it dequantizes per call: slow).
Bytes per routed parameter, scales included: int8 ~1.0, int4 (G=128) 0.531, nf4 (B=64) 0.5625 on
disk and 0.531 in memory on AVX512-BF16 CPUs (absmax kept as bf16 there, as bitsandbytes does).
Decoding on CPU, int4 and int8 run all chosen experts of a layer in one native call
(`kernels.moe_experts_quant`) over the same buffers torch's kernels use for prefill.
"""


from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...model.config import ModelConfig
from ...model.moe import combine_experts, per_expert_loop
from .. import kernels
from ..weights import TensorReader, stack_experts
from .format import (PARTS, QuantizationError, QuantSpec, _fields, _nf4_table, _pack_nibbles, _unpack_nibbles,
                     dequantize_packed, dequantize_part, pack_experts, pack_part, packed_shapes)

# ------------------------------------------------------------------------- kernel modules

class QuantizedExperts(nn.Module):
    """Routed experts held quantized; same interface and float32 weighted sum as `moe.Experts`.

    Per part, buffers `<part>_q` (codes) and `<part>_s` (scales) in the layout of the kernel
    chosen for the device (`layout`). Subclasses implement `_choose_layout(device, packed)`,
    `_to_kernel(part, q, s)` and `_to_portable(part, q, s)` (portable <-> kernel layout, one part),
    and `_linear(part, e, x)` (x @ W_e^T). `packed()` inverts the layout; `dequantize()` is the
    pure-PyTorch reference.
    The CPU kernels take bf16 activations whatever the model dtype (see `_bf16`); outputs come
    back in the input's dtype.
    """

    method = ""

    def __init__(self, n_experts: int, hidden: int, inner: int, spec: QuantSpec, layout: str):
        super().__init__()
        self.n_experts, self.hidden, self.inner = n_experts, hidden, inner
        self.spec, self.layout = spec, layout

    def extra_repr(self) -> str:
        return (f"{self.method}, experts={self.n_experts}, hidden={self.hidden}, inner={self.inner}, "
                f"group_size={self.spec.group_size}, layout={self.layout}")

    def part_shape(self, part: str) -> tuple[int, int]:
        """(N, K) of one expert's matrix."""
        return (2 * self.inner, self.hidden) if part == "gate_up" else (self.hidden, self.inner)

    def _weights(self, part: str, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's codes and scales for `part` (straight from _buffers: this is the hot path)."""
        return self._buffers[part + "_q"][e], self._buffers[part + "_s"][e]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x (n, D) -> (n, D)."""
        gate, up = self._linear("gate_up", e, x).split(self.inner, dim=-1)
        return self._linear("down", e, F.silu(gate) * up)

    def _native_bits(self) -> int:
        """4 or 8 when the native CPU kernel reads this module's layout (decode), else 0."""
        return 0

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, D), ids/weights (N, k) -> sum_k weight * expert(x) as (N, D)."""
        bits = self._native_bits()
        if bits:  # a few tokens on CPU: one native call, no per-expert loop, no host round trip
            out = kernels.moe_experts_quant(bits, x, ids, weights, (self.gate_up_q, self.gate_up_s),
                                            (self.down_q, self.down_s))
            if out is not None:
                return out.to(x.dtype)
        n, k = ids.shape
        if n == 1:  # decoding: the k chosen experts in turn, nothing to sort
            out = torch.cat([self.expert(e, x) for e in ids[0].tolist()])  # (k, D)
            return (out.view(1, k, -1).float() * weights.unsqueeze(-1)).sum(1).to(x.dtype)
        return combine_experts(x, ids, weights, self.n_experts,
                               lambda routed, counts: per_expert_loop(routed, counts, self.expert))

    @classmethod
    def from_packed(cls, packed: dict[str, torch.Tensor], spec: QuantSpec, device: torch.device | str = "cpu",
                    copy: bool = True) -> "QuantizedExperts":
        """Build from portable tensors. With `copy` (the default) the module never shares memory
        with them (they may be a file's mapped pages); copy=False may keep tensors handed over."""
        device = torch.device(device)
        e, n, _ = packed["gate_up.qweight"].shape
        module = cls(e, packed["down.qweight"].shape[1], n // 2, spec, cls._choose_layout(device, packed))
        second = _fields(cls.method)[1]
        for part in PARTS:
            given = [packed[f"{part}.qweight"], packed[f"{part}.{second}"]]
            kernel = module._to_kernel(part, *(t.to(device) for t in given))
            for name, t, g in zip(("_q", "_s"), kernel, given):
                module.register_buffer(part + name, t.clone() if copy and t.data_ptr() == g.data_ptr() else t)
        return module

    def packed(self) -> dict[str, torch.Tensor]:
        """The portable tensors (on CPU): what `pack_experts` made and a folder stores."""
        out = {}
        second = _fields(self.method)[1]
        for part in PARTS:
            q, s = self._to_portable(part, getattr(self, part + "_q").cpu(), getattr(self, part + "_s").cpu())
            out[f"{part}.qweight"], out[f"{part}.{second}"] = q, s
        return out

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference float32 weights gate_up (E, 2M, D), down (E, D, M), computed in plain PyTorch."""
        return dequantize_packed(self.method, self.packed())


class Int8Experts(QuantizedExperts):
    """Layouts: "cpu" (torch's `_weight_int8pack_mm`) and "portable" (other devices: the chosen
    expert dequantized per call)."""

    method = "int8"

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


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """Activations for torch's CPU int8/int4 kernels: only their bf16 path is fast (float32 and
    float16 run 10-30x slower), and bf16 rounding (0.4%) is far below the weights' own error."""
    return x.to(torch.bfloat16).contiguous()


class Int4Experts(QuantizedExperts):
    """Layouts: "cpu" (torch's CPU int4 packing, which depends on the machine), "cuda" (torch's
    tiled int32 packing), both with bf16 activations and scales; "portable" (other devices)."""

    method = "int4"

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
            source = _inverse_layout(("int4", self.layout, n, k), n, k, _int4_converter(self.layout, k))
            q = torch.stack([_pack_nibbles(_from_layout(q[i], source, n, k)) for i in range(q.shape[0])])
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
        return F.linear(x, dequantize_part("int4", q[None], sz[None])[0].to(x.dtype))


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


def _convert_each(q: torch.Tensor, convert: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply a one-matrix layout converter to each expert of (E, ...), into one stacked tensor."""
    first = convert(q[0])
    out = torch.empty((q.shape[0], *first.shape), dtype=first.dtype, device=first.device)
    out[0] = first
    for i in range(1, q.shape[0]):
        out[i] = convert(q[i])
    return out


def _int4_converter(layout: str, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Portable bytes (N, K/2) of one matrix -> the kernel's packed weight."""
    if layout == "cpu":
        return lambda b: torch.ops.aten._convert_weight_to_int4pack_for_cpu(_unpack_nibbles(b).to(torch.int32), 1)
    tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)  # the CUDA kernel's innerKTiles
    return lambda b: torch.ops.aten._convert_weight_to_int4pack(b.contiguous(), tiles)


class NF4Experts(QuantizedExperts):
    """Layouts: "cpu" (bitsandbytes' AVX512-BF16 GEMV packing, absmax as bf16 (E, K/B, N)) and
    "bnb" (bitsandbytes' flat format through `bnb.matmul_4bit`: CUDA, or other CPUs)."""

    method = "nf4"

    @classmethod
    def _choose_layout(cls, device, packed):
        functional = _bitsandbytes().functional
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
        source = _inverse_layout(("nf4", n, k, b), n, k, _nf4_cpu_converter(n, k, b))
        q = torch.stack([_pack_nibbles(_from_layout(q[i], source, n, k)) for i in range(q.shape[0])])
        return q, s.transpose(1, 2).reshape(q.shape[0], -1).float()

    def _linear(self, part, e, x):
        n, k = self.part_shape(part)
        q, s = self._weights(part, e)
        if self.layout == "cpu":
            out = torch.ops.bitsandbytes.gemv_4bit.default(_bf16(x), q, [n, k], s, _nf4_code(str(x.device)),
                                                           self._block(part))
            return out.to(x.dtype)
        bnb = _bitsandbytes()
        state = bnb.functional.QuantState(absmax=s, shape=torch.Size([n, k]), code=_nf4_code(str(x.device)),
                                          blocksize=self._block(part), quant_type="nf4", dtype=x.dtype)
        return bnb.matmul_4bit(x, q.view(-1, 1).t(), state)


def _nf4_cpu_converter(n: int, k: int, b: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Portable bytes (N, K/2) -> bitsandbytes' CPU GEMV packing (its own converter)."""
    functional = _bitsandbytes().functional

    def convert(portable: torch.Tensor) -> torch.Tensor:
        state = functional.QuantState(absmax=torch.ones(n * k // b), shape=torch.Size([n, k]), code=_nf4_code("cpu"),
                                      blocksize=b, quant_type="nf4", dtype=torch.bfloat16)
        return functional._convert_weight_packed_for_cpu(portable.reshape(-1, 1).contiguous(), state)[0]
    return convert


@functools.lru_cache(maxsize=None)
def _nf4_code(device: str) -> torch.Tensor:
    return _nf4_table()[0].to(device)


def _bitsandbytes():
    """bitsandbytes, imported on first use. Its CPU backend logs a warning at import about an
    optional kernel package; the GEMV used here does not need it, so that is kept quiet."""
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        raise QuantizationError("nf4 needs bitsandbytes: pip install 'dsvl2[quant]', or use int4, which needs "
                                "nothing extra") from None
    finally:
        log.setLevel(level)
    return bitsandbytes


def _inverse_layout(key, n: int, k: int, convert: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """For a converter that reorders the 4-bit codes of one (N, K) matrix, the row-major source
    index of each code of its output (bytes in order, low nibble first). Found by converting
    probe matrices whose codes spell out each element's own index, 4 bits at a time."""
    if key not in _LAYOUTS:
        index = torch.arange(n * k, dtype=torch.int64)
        source = torch.zeros(n * k, dtype=torch.int64)
        for shift in range(0, max(1, (n * k - 1).bit_length()), 4):
            probe = ((index >> shift) & 15).to(torch.uint8).view(n, k)
            source |= _nibbles(convert(_pack_nibbles(probe))).long() << shift
        if not torch.equal(source.sort().values, index):
            raise QuantizationError("a kernel's packed layout is not a reordering of 4-bit codes; cannot unpack it")
        _LAYOUTS[key] = source
    return _LAYOUTS[key]


_LAYOUTS: dict[tuple, torch.Tensor] = {}


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    b = packed.contiguous().view(torch.uint8).flatten()
    return torch.stack([b & 15, b >> 4], dim=-1).flatten()


def _from_layout(kernel_q: torch.Tensor, source: torch.Tensor, n: int, k: int) -> torch.Tensor:
    codes = torch.empty(n * k, dtype=torch.uint8)
    codes[source] = _nibbles(kernel_q)
    return codes.view(n, k)


_CLASSES = {"int8": Int8Experts, "int4": Int4Experts, "nf4": NF4Experts}


def quantize_experts(gate_up: torch.Tensor, down: torch.Tensor, method: str, group_size: int | None = None,
                     device: torch.device | str | None = None) -> QuantizedExperts:
    """Float stacked experts (E, 2M, D), (E, D, M) -> a quantized experts module on `device`
    (default: the weights'). It computes in the dtype of the activations it is given."""
    spec = QuantSpec.make(method, group_size)
    packed = pack_experts(gate_up.cpu(), down.cpu(), spec)
    return experts_from_packed(packed, spec, device or gate_up.device, copy=False)


def experts_from_packed(packed: dict[str, torch.Tensor], spec: QuantSpec, device: torch.device | str = "cpu",
                        copy: bool = True) -> QuantizedExperts:
    """Portable tensors ("<part>.<field>", see the module docstring) -> the module for `device`."""
    return _CLASSES[spec.method].from_packed(packed, spec, device, copy)


# ------------------------------------------------------------------------------ loading hooks

def quantize_layer_hook(spec: QuantSpec, cfg: ModelConfig, device: torch.device):
    """For `weights.load_into(experts=...)`: quantize each MoE layer's float experts as it is read."""
    n = cfg.language.n_routed_experts

    def build(module_name: str, reader: TensorReader) -> nn.Module:
        prefix = module_name[: -len("experts")]
        packed = {}
        for part in PARTS:  # one part in float at a time
            w = stack_experts(reader, prefix, n, part)
            reader.close()  # let go of the file pages just read
            packed.update(pack_part(w, spec, part))
            del w
        return experts_from_packed(packed, spec, device, copy=False)
    return build


def packed_layer_hook(spec: QuantSpec, device: torch.device):
    """For `weights.load_into(experts=...)`: read a pre-quantized folder's packed experts."""
    def build(module_name: str, reader: TensorReader) -> nn.Module:
        prefix = f"{module_name}.{spec.method}."
        packed = {f"{part}.{field}": reader.get(prefix + f"{part}.{field}")
                  for part in PARTS for field in _fields(spec.method)}
        return experts_from_packed(packed, spec, device)
    return build


# ------------------------------------------------------------------------------ mapped loading

@dataclass(frozen=True)
class KernelLayout:
    """The buffers of a MoE layer's quantized experts as the kernel for a device holds them:
    what a mapped layout stores in place of the float experts (engine/mapped.py). The CPU
    packings are torch's and bitsandbytes' internal choices (they vary with the CPU and the
    version), so `key` carries a digest of a probe's kernel tensors: another packing, another key."""

    spec: QuantSpec
    layout: str
    n_experts: int
    hidden: int
    inner: int
    buffers: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]  # name, one expert's shape, dtype
    digest: str

    @property
    def key(self) -> str:
        """e.g. "int4g128-cpu-1a2b3c4d5e": part of the entry's name and checked in its record."""
        group = f"g{self.spec.group_size}" if self.spec.group_size else ""
        return f"{self.spec.method}{group}-{self.layout}-{self.digest}"

    def table(self, module_name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Buffer name under the model -> (shape, dtype), for the experts module `module_name`."""
        return {f"{module_name}.{name}": ((self.n_experts, *shape), dt) for name, shape, dt in self.buffers}

    def empty_module(self) -> QuantizedExperts:
        """A module of this layout whose buffers are meta tensors, to be set to mapped views."""
        module = _CLASSES[self.spec.method](self.n_experts, self.hidden, self.inner, self.spec, self.layout)
        for name, shape, dt in self.buffers:
            module.register_buffer(name, torch.empty((self.n_experts, *shape), dtype=dt, device="meta"))
        return module


def kernel_layout(spec: QuantSpec, cfg: ModelConfig, device: torch.device) -> KernelLayout:
    """The kernel layout `experts_from_packed` makes on `device` for this model's experts, found
    by converting one random expert (milliseconds; the shapes per expert do not depend on E)."""
    lm = cfg.language
    d, m = lm.hidden_size, lm.moe_intermediate_size
    gen = torch.Generator().manual_seed(0)
    probe = {}
    for part, (n, k) in (("gate_up", (2 * m, d)), ("down", (d, m))):
        for field, (shape, dt) in packed_shapes(spec, 1, n, k).items():
            if dt.is_floating_point:
                probe[f"{part}.{field}"] = (torch.rand(shape, generator=gen) + 0.5).to(dt)
            else:
                low, high = (-127, 128) if dt == torch.int8 else (0, 256)
                probe[f"{part}.{field}"] = torch.randint(low, high, shape, generator=gen, dtype=dt)
    module = experts_from_packed(probe, spec, device, copy=False)
    h = hashlib.blake2b(digest_size=5)
    buffers = []
    for name, b in module.named_buffers():
        h.update(f"{name}\0{list(b.shape)}\0{b.dtype}\0".encode())
        h.update(b.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        buffers.append((name, tuple(b.shape[1:]), b.dtype))
    return KernelLayout(spec, module.layout, lm.n_routed_experts, d, m, tuple(buffers), h.hexdigest())
