"""Quantized routed experts: the portable format (format.py), one module per method (int8.py,
int4.py, nf4.py: a `QuantMethod` and its experts module, on base.py), the methods by name and
what is done with one (registry.py), the modules at load (experts.py) and the pre-quantized
folder writer (folder.py). The methods' names and help are in dsvl2_cli/quant_methods.py.

"Pack once, swap modules at load": a layer's float experts are packed into the portable form,
converted once to the layout of the kernel that runs them, and `mlp.experts` is replaced by a
module with the interface of `model.moe.Experts`.
"""

from .base import QuantizedExperts, QuantMethod
from .experts import (KernelLayout, experts_from_packed, kernel_layout, packed_layer_hook, quantize_experts,
                      quantize_layer_hook)
from .folder import quantize_folder
from .format import (CONFIG_KEY, METHODS, QuantizationError, QuantSpec, choose_spec, group_for, parse_method, read_spec,
                     spec_label)
from .int4 import cpu_int4_packing_is_blocked
from .registry import dequantize_packed, expected_quantized, method, pack_experts, packed_shapes

__all__ = [
    "CONFIG_KEY", "METHODS", "KernelLayout", "QuantMethod", "QuantSpec", "QuantizationError", "QuantizedExperts",
    "choose_spec", "cpu_int4_packing_is_blocked", "dequantize_packed", "expected_quantized", "experts_from_packed",
    "group_for", "kernel_layout", "method", "pack_experts", "packed_layer_hook", "packed_shapes", "parse_method",
    "quantize_experts", "quantize_folder", "quantize_layer_hook", "read_spec", "spec_label",
]
