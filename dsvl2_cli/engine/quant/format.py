"""The portable format of quantized routed experts, whatever the method: what is quantized and how
(`QuantSpec`, and its entry in a pre-quantized folder's config.json), the group size of a part,
and the 4-bit code packing two methods share. Each method's own tensors, packing and modules
are in its module (int8.py, int4.py, nf4.py), found by name through registry.py.

Portable storage, per MoE layer L and part P in {gate_up (E, 2M, D): gate rows then up rows, as
`Experts.gate_up`; down (E, D, M)}, N = output and K = input size of the part, under
`language.model.layers.L.mlp.experts.<method>.P.`: "qweight" (the codes) and one tensor of
scales, named and shaped by the method (its `packed_shapes`). 4-bit codes are two per byte, the
even input index in the high nibble. The group G of a part is the largest of group_size,
group_size/2, ... (at least 32) that divides K, so it can differ between parts (the fixtures'
K = 32); the stored shapes say which. A pre-quantized folder (`quantize_folder`) holds these
tensors in place of `experts.<e>.{gate,up,down}_proj.weight`, the other tensors unchanged, and
its config.json says so under "dsvl2_quantization" ({"method", "group_size", "modules":
"routed_experts", "format_version": 1}). The CPU kernels' own layouts depend on the machine, so
they are made at load time and never stored.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import quant_methods
from ...errors import Dsvl2Error, ModelError

METHODS = ("none", *quant_methods.NAMES)
CONFIG_KEY = "dsvl2_quantization"
FORMAT_VERSION = 1
PARTS = ("gate_up", "down")
_SAFETENSORS_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.bfloat16: "BF16", torch.float32: "F32"}


class QuantizationError(Dsvl2Error):
    """A quantization method or option that cannot be used here."""


# ------------------------------------------------------------------------------------ spec

@dataclass(frozen=True)
class QuantSpec:
    """What is quantized and how; `group_size` is None for int8 (one scale per output channel)."""

    method: str
    group_size: int | None = None

    def __post_init__(self):
        if quant_methods.get(self.method) is None:  # never a spec of a method nobody implements
            raise QuantizationError(quant_methods.unknown(self.method))

    @classmethod
    def make(cls, method: str, group_size: int | None = None) -> "QuantSpec":
        method = str(method).lower()
        info = quant_methods.get(method)
        if info is None:
            raise QuantizationError(f"quantization method {method!r} cannot be used here; use {quant_methods.known()}")
        if not info.group_sizes:
            return cls(method, None)
        size = info.default_group if group_size is None else group_size
        if size not in info.group_sizes:
            allowed = ", ".join(map(str, sorted(info.group_sizes)))
            raise QuantizationError(f"{method} group size must be one of {allowed}, got {size!r}")
        return cls(method, int(size))

    def as_config(self) -> dict:
        return {"method": self.method, "group_size": self.group_size, "modules": "routed_experts",
                "format_version": FORMAT_VERSION}


def method_info(name: str) -> quant_methods.Method:
    """The torch-free description of method `name`; QuantizationError naming the known ones else."""
    info = quant_methods.get(name)
    if info is None:
        raise QuantizationError(quant_methods.unknown(name))
    return info


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
    if not method_info(spec.method).group_sizes:
        return None
    g = spec.group_size
    while g >= 32:
        if k % g == 0:
            return g
        g //= 2
    raise QuantizationError(f"{spec.method} needs input sizes that are multiples of 32; this model has {k}")


_EXPERT_NAME = re.compile(r"(.*\.mlp\.)experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_SAFETENSORS_SIZES = {"I8": 1, "U8": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}


# ------------------------------------------------------------------------ 4-bit codes

def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """codes (..., K) in 0..15 -> bytes (..., K/2), even index in the high nibble."""
    return (q[..., ::2] << 4 | q[..., 1::2]).to(torch.uint8)


def _unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    return torch.stack([b >> 4, b & 15], dim=-1).flatten(-2)  # (..., K)


_TINY = torch.finfo(torch.float32).tiny  # scales are clamped to it before dividing


def spec_label(spec: QuantSpec | None) -> str:
    """One line for `dsvl2 info`."""
    if spec is None:
        return "none (all weights in the compute dtype)"
    group = f", group size {spec.group_size}" if spec.group_size else ", per-channel scales"
    return f"{spec.method} routed experts{group}; everything else in the compute dtype"
