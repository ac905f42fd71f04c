"""The portable format of quantized routed experts: what is quantized and how (`QuantSpec`, and
its entry in a pre-quantized folder's config.json), the packed tensors, and the reference
quantize / dequantize in plain PyTorch. The kernel modules that run them are in quant.py.

Methods: see quant.py. Portable storage, per MoE layer L and part P in {gate_up (E, 2M, D): gate rows then up rows, as
`Experts.gate_up`; down (E, D, M)}, N = output and K = input size of the part, under
`language.model.layers.L.mlp.experts.<method>.P.`:
  int8  qweight I8 (E, N, K)       scales BF16 (E, N)
  int4  qweight U8 (E, N, K/2)     scales_zeros BF16 (E, K/G, N, 2) = (scale, zero) per group
  nf4   qweight U8 (E, N, K/2)     absmax F32 (E, N*K/B)
4-bit codes are two per byte, the even input index in the high nibble. G (and B) is the largest
of group_size, group_size/2, ... (at least 32) that divides K, so it can differ between parts
(the fixtures' K = 32); the stored shapes say which. A pre-quantized folder (`quantize_folder`)
holds these tensors in place of `experts.<e>.{gate,up,down}_proj.weight`, the other tensors
unchanged, and its config.json says so under "dsvl2_quantization" ({"method", "group_size",
"modules": "routed_experts", "format_version": 1}). The CPU kernels' own layouts depend on the
machine, so they are made at load time and never stored.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import Dsvl2Error, ModelError
from ...model.config import ModelConfig
from ..weights import expected_tensors

METHODS = ("none", "int8", "int4", "nf4")
DEFAULT_GROUP_SIZE = {"int8": None, "int4": 128, "nf4": 64}
CONFIG_KEY = "dsvl2_quantization"
FORMAT_VERSION = 1
PARTS = ("gate_up", "down")
_INT4_GROUPS = (256, 128, 64, 32)  # what the int4 kernels accept
# NormalFloat4 code values (QLoRA, appendix E), the table of bitsandbytes' "nf4".
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
_SAFETENSORS_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.bfloat16: "BF16", torch.float32: "F32"}


class QuantizationError(Dsvl2Error):
    """A quantization method or option that cannot be used here."""


# ------------------------------------------------------------------------------------ spec

@dataclass(frozen=True)
class QuantSpec:
    """What is quantized and how; `group_size` is None for int8 (one scale per output channel)."""

    method: str
    group_size: int | None = None

    @classmethod
    def make(cls, method: str, group_size: int | None = None) -> "QuantSpec":
        method = str(method).lower()
        if method not in METHODS or method == "none":
            raise QuantizationError(f"quantization method {method!r} cannot be used here; use int8, int4 or nf4")
        if method == "int8":
            return cls(method, None)
        size = DEFAULT_GROUP_SIZE[method] if group_size is None else group_size
        allowed = _INT4_GROUPS if method == "int4" else tuple(2**i for i in range(5, 13))
        if size not in allowed:
            raise QuantizationError(f"{method} group size must be one of {', '.join(map(str, sorted(allowed)))}, "
                                    f"got {size!r}")
        return cls(method, int(size))

    def as_config(self) -> dict:
        return {"method": self.method, "group_size": self.group_size, "modules": "routed_experts",
                "format_version": FORMAT_VERSION}


def read_spec(model_dir: str | os.PathLike) -> QuantSpec | None:
    """The quantization a model folder's config.json declares (None for a float checkpoint)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():  # the same messages as ModelConfig.from_dir, whichever reads it first
        raise ModelError(f"{path}: not found; a DeepSeek-VL2 model folder needs its config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelError(f"{path}: not valid JSON ({err}); re-download the model") from None
    entry = raw.get(CONFIG_KEY) if isinstance(raw, dict) else None
    if entry is None:
        return None
    if not isinstance(entry, dict) or entry.get("modules") != "routed_experts":
        raise ModelError(f"{path}: '{CONFIG_KEY}' is malformed; re-create the folder with `dsvl2 quantize`")
    if entry.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path}: quantized with format version {entry.get('format_version')!r}; this dsvl2 reads "
                         f"version {FORMAT_VERSION}: update dsvl2 or re-create the folder with `dsvl2 quantize`")
    try:
        return QuantSpec.make(entry.get("method"), entry.get("group_size"))
    except QuantizationError as err:
        raise ModelError(f"{path}: {err}") from None


def parse_method(quantize: str | None) -> str | None:
    """A `quantize=` value, checked and lower-cased (None stays None: "as the folder is")."""
    if quantize is None:
        return None
    method = str(quantize).lower()
    if method not in METHODS:
        raise QuantizationError(f"quantization method {quantize!r} is not known; use one of {', '.join(METHODS)}")
    return method


def choose_spec(quantize: str | None, folder: QuantSpec | None, where: str) -> QuantSpec | None:
    """The quantization to load with: the folder's when `quantize` is None; an error when a
    pre-quantized folder is asked for another method (its float experts no longer exist)."""
    quantize = parse_method(quantize)
    if folder is not None:
        if quantize is not None and quantize != folder.method:
            raise QuantizationError(
                f"{where} holds {folder.method}-quantized routed experts (written by `dsvl2 quantize`) and cannot be "
                f"loaded as {quantize!r}; leave --quantize unset, or quantize the original checkpoint instead")
        return folder
    if quantize is None or quantize == "none":
        return None
    return QuantSpec.make(quantize)


def group_for(spec: QuantSpec, k: int) -> int | None:
    """The group (int4) or block (nf4) size used for a part with K inputs: the largest power of
    two up to `group_size` that divides K, so that groups never straddle rows."""
    if spec.method == "int8":
        return None
    g = spec.group_size
    while g >= 32:
        if k % g == 0:
            return g
        g //= 2
    raise QuantizationError(f"{spec.method} needs input sizes that are multiples of 32; this model has {k}")


def packed_shapes(spec: QuantSpec, n_experts: int, n: int, k: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Field -> (shape, dtype) of one part's portable tensors."""
    e, g = n_experts, group_for(spec, k)
    if spec.method == "int8":
        return {"qweight": ((e, n, k), torch.int8), "scales": ((e, n), torch.bfloat16)}
    if spec.method == "int4":
        return {"qweight": ((e, n, k // 2), torch.uint8), "scales_zeros": ((e, k // g, n, 2), torch.bfloat16)}
    return {"qweight": ((e, n, k // 2), torch.uint8), "absmax": ((e, n * k // g), torch.float32)}


def expected_quantized(cfg: ModelConfig, spec: QuantSpec) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The strict check's table for a pre-quantized folder: name -> shape, and name -> dtype
    for the packed tensors (every other tensor must be floating point)."""
    shapes = {n: s for n, s in expected_tensors(cfg).items() if not _EXPERT_NAME.match(n)}
    dtypes = {}
    lm = cfg.language
    d, m = lm.hidden_size, lm.moe_intermediate_size
    for layer in range(lm.num_hidden_layers):
        if not lm.is_moe_layer(layer):
            continue
        prefix = f"language.model.layers.{layer}.mlp.experts.{spec.method}."
        for part, (n, k) in (("gate_up", (2 * m, d)), ("down", (d, m))):
            for field, (shape, dtype) in packed_shapes(spec, lm.n_routed_experts, n, k).items():
                shapes[prefix + part + "." + field] = shape
                dtypes[prefix + part + "." + field] = _SAFETENSORS_DTYPES[dtype]
    return shapes, dtypes


_EXPERT_NAME = re.compile(r"(.*\.mlp\.)experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_SAFETENSORS_SIZES = {"I8": 1, "U8": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}


# ------------------------------------------------------------------------ quantize (portable)

def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """codes (..., K) in 0..15 -> bytes (..., K/2), even index in the high nibble."""
    return (q[..., ::2] << 4 | q[..., 1::2]).to(torch.uint8)


def _unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    return torch.stack([b >> 4, b & 15], dim=-1).flatten(-2)  # (..., K)


_TINY = torch.finfo(torch.float32).tiny


def _quantize_int8(w: torch.Tensor, _: int | None) -> dict[str, torch.Tensor]:
    """w (N, K) float32 -> symmetric per-row int8 (-127..127) with the bf16 scale it was made with."""
    scale = (w.abs().amax(-1) / 127).to(torch.bfloat16)  # (N,)
    q = (w / scale.float().clamp_min(_TINY)[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return {"qweight": q, "scales": scale}


def _quantize_int4(w: torch.Tensor, g: int) -> dict[str, torch.Tensor]:
    """w (N, K) float32 -> asymmetric 4-bit per group of g inputs; zero is the value of code 8."""
    n, k = w.shape
    wg = w.view(n, k // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)  # (N, K/g)
    scale = ((hi - lo) / 15).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)  # rounded first, so codes use the stored values
    q = (wg - zero.float()[..., None]).div_(scale.float().clamp_min(_TINY)[..., None]).add_(8)
    q = q.round_().clamp_(0, 15).to(torch.uint8).view(n, k)
    return {"qweight": _pack_nibbles(q), "scales_zeros": torch.stack([scale, zero], -1).transpose(0, 1).contiguous()}


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


_QUANTIZERS = {"int8": _quantize_int8, "int4": _quantize_int4, "nf4": _quantize_nf4}


def pack_experts(gate_up: torch.Tensor, down: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Stacked float experts (E, 2M, D), (E, D, M) -> the portable tensors, keys "<part>.<field>"."""
    return {**pack_part(gate_up, spec, "gate_up"), **pack_part(down, spec, "down")}


def pack_part(w: torch.Tensor, spec: QuantSpec, part: str) -> dict[str, torch.Tensor]:
    """One part's stacked float weights (E, N, K) -> its portable tensors "<part>.<field>".

    Quantized from the values as given (the checkpoint's, in float32 arithmetic), one expert at a
    time, so the temporaries stay at one expert's size.
    """
    e, n, k = w.shape
    fields = {f: torch.empty(s, dtype=dt) for f, (s, dt) in packed_shapes(spec, e, n, k).items()}
    for i in range(e):
        for f, t in _QUANTIZERS[spec.method](w[i].float(), group_for(spec, k)).items():
            fields[f][i] = t.reshape(fields[f].shape[1:])
    return {f"{part}.{f}": t for f, t in fields.items()}


def dequantize_part(method: str, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """One part's portable tensors (qweight and its scales/scales_zeros/absmax) -> float32 (E, N, K)."""
    if method == "int8":
        return qweight.float() * scales.float()[..., None]
    codes = _unpack_nibbles(qweight).long()  # (E, N, K)
    e, n, k = codes.shape
    if method == "int4":
        sz = scales.float()  # (E, K/G, N, 2)
        g = k // sz.shape[1]
        scale, zero = (sz[..., i].transpose(1, 2).repeat_interleave(g, dim=-1) for i in (0, 1))  # (E, N, K)
        return (codes - 8) * scale + zero
    absmax = scales.float()  # (E, N*K/B)
    return (_nf4_table()[0][codes].view(e, absmax.shape[1], -1) * absmax[..., None]).view(e, n, k)


def dequantize_packed(method: str, packed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pure-PyTorch reference: portable tensors -> float32 gate_up (E, 2M, D), down (E, D, M)."""
    second = _fields(method)[1]
    gate_up, down = (dequantize_part(method, packed[f"{p}.qweight"], packed[f"{p}.{second}"]) for p in PARTS)
    return gate_up, down


def _fields(method: str) -> tuple[str, str]:
    return {"int8": ("qweight", "scales"), "int4": ("qweight", "scales_zeros"), "nf4": ("qweight", "absmax")}[method]


def spec_label(spec: QuantSpec | None) -> str:
    """One line for `dsvl2 info`."""
    if spec is None:
        return "none (all weights in the compute dtype)"
    group = f", group size {spec.group_size}" if spec.group_size else ", per-channel scales"
    return f"{spec.method} routed experts{group}; everything else in the compute dtype"
