"""Fast modules swapped into a loaded model, as quantization swaps the routed experts.

model/ computes with plain torch. At load (engine/runtime.py) `install` replaces, on CPU:
- the attention hooks (`attend`, `rotate`, MLA's `attend_heads` and `head_matmul`, the vision
  tower's `attend`): the native RoPE pass (bf16, the same roundings as torch's seven ops), a
  few-query attention of two matmuls instead of SDPA for decoding (any dtype: torch's SDPA is
  ~6x slower for one query), the native decode-attention / per-head GEMV
  kernels where they apply (bf16, no mask, few rows), and the native prefill-attention kernel
  for many query rows (bf16; no mask, causal, or causal after a cache; ~3x torch's SDPA);
- with bfloat16 weights and the kernels built: the vision tower's LayerNorms by `FastLayerNorm`
  and MLPs by `FastVisionMLP` (fc1's bias and tanh-GELU in one native pass after a bias-free
  GEMM); attention projections and lm_head by `FastLinear`, the language model's RMSNorms by
  `FastRMSNorm` (one native pass instead of eight ops: decoding runs two a layer on one row),
  dense MLPs by `FastMLP`, float routed experts by `NativeExperts` (native GEMV / fused MoE for
  <= kernels.MAX_ROWS rows; torch's grouped GEMMs above), and for prefill the gated MLPs' and
  experts' `act` hook (silu(gate) * up) and the routed experts' `combine` hook (the weighted sum
  back in token order) by native passes with torch's roundings (0.89-0.92x the time of tiny's
  1024-token prefill, benchmarks/bench_prefill_hooks.py).
On a CPU without bf16 dot products (f32_products.py: AVX2, AVX512 without BF16) a bf16 model's
vision tower, adaptor and many-row language passes also compute their products in float32
(`install_f32_products`), where torch's bf16 GEMMs have no fast kernel.
Each fast path checks at call time that it applies (`kernels.disabled()`, dtype, rows) and falls
back to the plain module's own forward: results never depend on whether a swap happened beyond
bf16 rounding. To add a kernel: a function in kernels.py that returns None when it does not
apply, a subclass (or hook) here that calls it first, and a line in `install`.
"""

from __future__ import annotations

import threading
import weakref
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ...model.attention import (LatentAttention, MultiHeadAttention, RMSNorm, apply_rope, few_query_attention,
                                head_matmul, sdpa_attention)
from ...model.moe import MLP, Experts, silu_gate
from ...model.vision import VisionMLP, VisionTower, merged_attention
from ...model.vlm import DeepseekVL2
from . import f32_products, kernels


class FastLinear(nn.Linear):
    """nn.Linear without bias whose forward runs the native GEMV for a few rows (decode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight)  # falls back to F.linear itself


class FastRMSNorm(RMSNorm):
    """The language model's RMSNorm through the native kernel for bf16 (same roundings as the
    plain module; only the order of the float32 sum of squares differs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = kernels.rms_norm(x, self.weight, self.eps)
        return out if out is not None else super().forward(x)


class FastMLP(MLP):
    """Dense SiLU MLP; a few rows go through the fused MoE kernel as a single "expert"."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= kernels.MAX_ROWS:
            ids, weights = _one_expert(rows)
            gate_up, down = self._as_one_expert()
            out = kernels.moe_experts(x.reshape(rows, x.shape[-1]), ids, weights, gate_up, down)  # (N, D)
            if out is not None:
                return out.view(x.shape)
        return super().forward(x)

    def _as_one_expert(self) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up (1, 2I, D) and down (1, D, I): views of the weights, made once (each view is a
        dispatched op, and a decode step runs 12 of these MLPs), remade if a weight was replaced."""
        kept = getattr(self, "_stacked", None)
        if kept is None or kept[0] is not self.gate_up or kept[1] is not self.down_proj.weight:
            kept = self._stacked = (self.gate_up, self.down_proj.weight, self.gate_up[None],
                                    self.down_proj.weight[None])
        return kept[2], kept[3]


_routes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _one_expert(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing of a dense MLP run as one "expert": ids (rows, 1) all 0, weights (rows, 1) all
    1 (constants, only read by the kernel; kept per row count instead of made per call)."""
    route = _routes.get(rows)
    if route is None:
        route = _routes[rows] = (torch.zeros(rows, 1, dtype=torch.long), torch.ones(rows, 1))
    return route


class NativeExperts(Experts):
    """Float routed experts; a few tokens run all their chosen experts in one native call."""

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        fused = kernels.moe_experts(x, ids, weights, self.gate_up, self.down)  # (N, D) or None
        return fused if fused is not None else super().forward(x, ids, weights)


def few_query(q, k, v, mask, scale: float | None) -> torch.Tensor:
    """Decode attention: the native kernel when it applies (no mask, bf16), else two matmuls."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if mask is None:
        out = kernels.decode_attention(q, k, v, scale)  # (B, H, Tq, dv) or None
        if out is not None:
            return out
    return few_query_attention(q, k, v, mask, scale)


_offsets = threading.local()  # the last mask `causal_offset` looked at, per thread: (weakref, answer)


def causal_offset(mask: torch.Tensor, q_len: int, k_len: int) -> int | None:
    """k_len - q_len when `mask` (B|1, 1, q_len, k_len) is exactly the causal mask of a chunk
    after a cache (query i sees keys 0..k_len-q_len+i, as `attention_mask` builds it without
    padding), else None. One forward pass hands every layer the same mask: the answer is kept
    for it, so the comparison runs once per pass, not once per layer."""
    last = getattr(_offsets, "last", None)
    if last is not None and last[0]() is mask:
        return last[1]
    offset = k_len - q_len
    answer = None
    if (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[0] == 1 and mask.shape[1] == 1
            and mask.shape[2:] == (q_len, k_len) and offset >= 0):
        rows = torch.arange(offset, k_len, device=mask.device)[:, None]  # (Tq, 1) query positions
        answer = offset if torch.equal(mask[0, 0], torch.arange(k_len, device=mask.device)[None, :] <= rows) else None
    _offsets.last = weakref.ref(mask), answer
    return answer


def prefill_attention(q, k, v, mask, scale: float | None, causal: bool = False) -> torch.Tensor:
    """Many-query attention (prefill): the native kernel without a mask, causal, or with the
    causal mask of a chunk after a cache; SDPA otherwise (padding masks, other dtypes)."""
    offset = 0  # causal without a mask: query i sees keys 0..i, as SDPA's is_causal
    if mask is not None:
        offset = causal_offset(mask, q.shape[2], k.shape[2])
    if offset is not None:
        out = kernels.prefill_attention(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale,
                                        causal or mask is not None, offset)
        if out is not None:
            return out
    return sdpa_attention(q, k, v, mask, scale, causal)


def decode_attention(q, k, v, mask, scale: float | None, causal: bool = False) -> torch.Tensor:
    """MHA's hook on CPU: few-query attention for one new token, the prefill kernel for more."""
    if q.shape[2] == 1:  # one query: never causal
        return few_query(q, k, v, mask, scale)
    return prefill_attention(q, k, v, mask, scale, causal)


class FastVisionMLP(VisionMLP):
    """SigLIP's MLP with fc1 as a bias-free GEMM (no bias copied into the output first) and its
    bias and tanh-GELU in one native in-place pass over the result."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1 = self.fc1
        if fc1.bias is None or not kernels.usable(x, fc1.weight, fc1.bias):
            return super().forward(x)
        h = F.linear(x, fc1.weight)
        if kernels.bias_gelu_(h, fc1.bias) is None:  # e.g. a non-contiguous GEMM output
            h = F.gelu(h + fc1.bias, approximate="tanh")
        return self.fc2(h)


class FastLayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last dim through the native kernel (no input clone) for bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) == 1:
            out = kernels.layer_norm(x, self.weight, self.bias, self.eps)
            if out is not None:
                return out
        return super().forward(x)


def install_vision(tower: VisionTower, native: bool) -> None:
    """The vision tower's swaps: the attention hook always (it checks at call time), and with
    `native` (bf16 weights, kernels built) the LayerNorms and MLPs' elementwise kernels."""
    for block in tower.blocks:
        block.attn.attend = vision_attention
        if not native:
            continue
        for name in ("norm1", "norm2"):
            setattr(block, name, _fast_layer_norm(getattr(block, name)))
        if type(block.mlp) is VisionMLP:
            fc1 = block.mlp.fc1
            shape = SimpleNamespace(width=fc1.in_features, mlp_hidden=fc1.out_features)  # what VisionMLP reads
            block.mlp = _rebuilt(FastVisionMLP, block.mlp, shape)
    if native:
        tower.norm = _fast_layer_norm(tower.norm)


def _fast_layer_norm(old: nn.LayerNorm) -> nn.LayerNorm:
    if type(old) is not nn.LayerNorm:
        return old
    return _rebuilt(FastLayerNorm, old, old.normalized_shape, old.eps, old.elementwise_affine, old.bias is not None)


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The vision tower's hook: the native kernel reads q, k, v in place (views of the qkv
    projection) and writes (N, T, W) for the output projection: no copies."""
    out = kernels.prefill_attention(q, k, v, q.shape[-1] ** -0.5, merge_heads=True)
    return out if out is not None else merged_attention(q, k, v)


def fast_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The attention modules' `rotate` hook: the native pass where it applies (bf16), else torch's."""
    out = kernels.rope(x, cos, sin, interleaved)
    return out if out is not None else apply_rope(x, cos, sin, interleaved)


def fast_silu_gate(h: torch.Tensor, inner: int) -> torch.Tensor:
    """The gated MLPs' `act` hook: silu(gate) * up in one native pass where it applies (bf16)."""
    out = kernels.silu_mul(h, inner)
    return out if out is not None else silu_gate(h, inner)


def fast_combine(out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
    """Routed experts' `combine` hook: the native weighted sum back in token order (bf16)."""
    return kernels.moe_combine(out, order, weights)


def fast_head_matmul(x: torch.Tensor, w: torch.Tensor, w_is_kn: bool) -> torch.Tensor:
    out = kernels.head_matmul(x, w, w_is_kn)  # (B, H, T, N) or None
    return out if out is not None else head_matmul(x, w, w_is_kn)


def _rebuilt(cls, old: nn.Module, *args) -> nn.Module:
    """A `cls(*args)` holding `old`'s very tensors (no copy: built on meta, then assigned)."""
    with torch.device("meta"):
        new = cls(*args)
    new.load_state_dict(old.state_dict(), assign=True)
    return new.train(old.training)


def _fast_linear(old: nn.Linear) -> FastLinear:
    return _rebuilt(FastLinear, old, old.in_features, old.out_features, False)


def _fast_rms_norm(old: RMSNorm) -> RMSNorm:
    return _rebuilt(FastRMSNorm, old, old.weight.shape[0], old.eps) if type(old) is RMSNorm else old


def _fast_mlp(old: MLP) -> FastMLP:
    new = _rebuilt(FastMLP, old, old.gate_up.shape[1], old.inner)
    new.act = fast_silu_gate
    return new


def install_f32_products(model: DeepseekVL2) -> None:
    """A CPU without bf16 dot products (f32_products.py): the vision tower, the adaptor and the
    language model's many-row passes compute their products in float32; the routed experts loop
    over experts, so that one expert's weights at a time are converted (not a layer's stack)."""
    f32_products.wrap(model.vision)
    f32_products.wrap(model.projector)
    f32_products.wrap(model.language, rows_arg=0)  # (embeds (B, T, D), cache, last_only)
    for layer in model.language.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if isinstance(experts, Experts):
            experts.grouped_mm = False


def install(model: DeepseekVL2) -> None:
    """Swap the fast paths into `model` where they apply (see the module docstring)."""
    if model.device.type != "cpu":
        return  # GPU/MPS: torch's own kernels (SDPA, cuBLAS) are the fast path
    native = model.dtype == torch.bfloat16 and kernels.available()
    if f32_products.wanted(model.dtype, model.device):
        install_f32_products(model)
    install_vision(model.vision, native)
    lm = model.language
    for layer in lm.model.layers:
        att = layer.self_attn
        if isinstance(att, LatentAttention):
            att.attend, att.attend_heads, att.head_matmul = few_query, prefill_attention, fast_head_matmul
        elif isinstance(att, MultiHeadAttention):
            att.attend = decode_attention
        att.rotate = fast_rope  # checks at call time: torch's for other dtypes and without the kernels
        if not native:
            continue
        for name, child in list(att.named_children()):
            if type(child) is nn.Linear:
                setattr(att, name, _fast_linear(child))
            elif type(child) is RMSNorm:  # MLA's kv_a_layernorm
                setattr(att, name, _fast_rms_norm(child))
        for name in ("input_layernorm", "post_attention_layernorm"):
            setattr(layer, name, _fast_rms_norm(getattr(layer, name)))
        mlp = layer.mlp
        if type(mlp) is MLP:  # layer 0's dense MLP
            layer.mlp = _fast_mlp(mlp)
            continue
        if type(mlp.shared_experts) is MLP:
            mlp.shared_experts = _fast_mlp(mlp.shared_experts)
        if type(mlp.experts) is Experts:  # quantized experts stay as they are
            e = mlp.experts
            mlp.experts = _rebuilt(NativeExperts, e, e.n_experts, e.gate_up.shape[2], e.inner, e.grouped_mm)
            mlp.experts.act, mlp.experts.combine = fast_silu_gate, fast_combine
    if native:
        lm.lm_head = _fast_linear(lm.lm_head)
        lm.model.norm = _fast_rms_norm(lm.model.norm)


__all__ = ["FastLayerNorm", "FastLinear", "FastMLP", "FastRMSNorm", "FastVisionMLP", "NativeExperts", "install",
           "install_f32_products", "install_vision"]
