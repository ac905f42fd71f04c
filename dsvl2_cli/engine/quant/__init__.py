"""Quantized routed experts: the portable format (format.py), the modules that compute with it
(experts.py) and the pre-quantized folder writer (folder.py).

"Pack once, swap modules at load": a layer's float experts are packed into the portable form,
converted once to the layout of the kernel that runs them, and `mlp.experts` is replaced by a
module with the interface of `model.moe.Experts`.
"""

from .experts import (KernelLayout, QuantizedExperts, cpu_int4_packing_is_blocked, experts_from_packed, kernel_layout,
                      packed_layer_hook, quantize_experts, quantize_layer_hook)
from .folder import quantize_folder
from .format import (CONFIG_KEY, METHODS, QuantizationError, QuantSpec, choose_spec, dequantize_packed,
                     expected_quantized, group_for, pack_experts, packed_shapes, parse_method, read_spec, spec_label)

__all__ = [
    "CONFIG_KEY", "METHODS", "KernelLayout", "QuantSpec", "QuantizationError", "QuantizedExperts", "choose_spec",
    "cpu_int4_packing_is_blocked", "dequantize_packed", "expected_quantized", "experts_from_packed", "group_for",
    "kernel_layout", "pack_experts", "packed_layer_hook", "packed_shapes", "parse_method", "quantize_experts",
    "quantize_folder", "quantize_layer_hook", "read_spec", "spec_label",
]
