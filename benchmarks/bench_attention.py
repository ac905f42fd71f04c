"""Prefill attention: torch's SDPA against the native kernel (kernels.prefill_attention), and the
SigLIP vision tower with and without it.

Shapes (bf16, CPU):
- vision: (4, 16, 729, 72) non-causal, q/k/v as strided views of one qkv projection (4 tiles);
- tiny: (1, 10, 1024, 128) causal (MHA prefill);
- mla: (1, 16, 1024, 192) keys / 128 values, causal (small/27B decompressed prefill);
- elementwise: the tower's tanh-GELU (with fc1's bias), fc1 + GELU and LayerNorm on one 4-tile
  batch, torch against the native passes (kernels.bias_gelu_, kernels.layer_norm);
- tower: the 27-block SigLIP-SO400M tower on 4 tiles, random bf16 weights, torch (kernels
  disabled: SDPA, addmm, gelu, layer_norm) against the native swaps engine/fast.install makes.
Both sides of each row run interleaved in one process (others share the CPU: compare the
ratios of one run). FLOPs: 2 T L (d + dv) per head, half when causal. Median of --repeat runs.
Prints a table and one JSON line.

    python benchmarks/bench_attention.py [--repeat 7] [--no-tower]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from dsvl2_cli.dev.bench_probes import interleaved
from dsvl2_cli.engine.native import kernels
from dsvl2_cli.engine.native.fast import install_vision
from dsvl2_cli.model.config import VisionConfig
from dsvl2_cli.model.vision import VisionTower

CASES = {  # name: (B, H, T, d, dv, causal)
    "vision": (4, 16, 729, 72, 72, False),
    "tiny": (1, 10, 1024, 128, 128, True),
    "mla": (1, 16, 1024, 192, 128, True),
}


def inputs(b, h, t, d, dv):
    g = torch.Generator().manual_seed(0)
    if d == dv:  # the vision tower's layout: views of (B, T, 3, H, d)
        qkv = torch.randn(b, t, 3, h, d, generator=g).bfloat16()
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return (torch.randn(b, h, t, d, generator=g).bfloat16(), torch.randn(b, h, t, d, generator=g).bfloat16(),
            torch.randn(b, h, t, dv, generator=g).bfloat16())


def attention_times(qkv, causal: bool, repeat: int) -> dict:
    q, k, v = qkv
    return interleaved({
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        "kernel": lambda: kernels.prefill_attention(q, k, v, q.shape[-1] ** -0.5, causal),
    }, repeat)


def tower(repeat: int) -> dict:
    cfg = VisionConfig("siglip_so400m_patch14_384", 384, 14, 1152, 27, 16, 3.7362)
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model = VisionTower(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model = model.bfloat16().eval()
    install_vision(model, native=True)  # as engine/fast.install does: attention, LayerNorm, bias + GELU
    pixels = torch.rand(4, 3, 384, 384, generator=g).bfloat16() * 2 - 1

    def run(native: bool):
        with torch.inference_mode():
            if native:
                return model(pixels)
            with kernels.disabled():  # every swapped module falls back to torch (SDPA, addmm, gelu, layer_norm)
                return model(pixels)

    secs = interleaved({"sdpa": lambda: run(False), "kernel": lambda: run(True)}, max(3, repeat // 2))
    diff = (run(True).float() - run(False).float()).norm() / run(False).float().norm()
    return {"sdpa_s": secs["sdpa"], "kernel_s": secs["kernel"], "speedup": secs["sdpa"] / secs["kernel"],
            "rel_diff": diff.item()}


def elementwise(repeat: int) -> dict:
    """The tower's elementwise ops on one 4-tile batch (2916 rows), torch against the kernels:
    tanh-GELU of fc1's output (4304 wide; torch's gelu alone, the kernel adds the bias too), fc1
    with it (torch: addmm with the bias, then gelu; native: bias-free GEMM, then the fused pass),
    and LayerNorm (1152 wide; torch on a row-major input and on the transposed layout the
    residual stream had before the patch embedding's copy)."""
    g = torch.Generator().manual_seed(1)
    rows, width, hidden = 4 * 729, 1152, 4304
    x = torch.randn(rows, width, generator=g).bfloat16()
    w1 = (torch.randn(hidden, width, generator=g) * 0.03).bfloat16()
    b1 = torch.randn(hidden, generator=g).bfloat16()
    h = F.linear(x, w1)
    lw, lb = torch.randn(width, generator=g).bfloat16(), torch.randn(width, generator=g).bfloat16()
    xt = x.view(4, 729, width).transpose(1, 2).contiguous().transpose(1, 2)  # (4, 729, W), transposed strides
    out = {}
    with torch.inference_mode():
        out["gelu"] = interleaved({"torch": lambda: F.gelu(h, approximate="tanh"),
                                   "kernel": lambda: kernels.bias_gelu_(h.clone(), b1)}, repeat)
        out["gelu"]["kernel"] -= interleaved({"clone": lambda: h.clone()}, repeat)["clone"]  # not the pass's
        out["fc1_gelu"] = interleaved({"torch": lambda: F.gelu(F.linear(x, w1, b1), approximate="tanh"),
                                       "kernel": lambda: kernels.bias_gelu_(F.linear(x, w1), b1)}, repeat)
        out["layer_norm"] = interleaved({"torch": lambda: F.layer_norm(x, (width,), lw, lb, 1e-6),
                                         "torch_transposed": lambda: F.layer_norm(xt, (width,), lw, lb, 1e-6),
                                         "kernel": lambda: kernels.layer_norm(x, lw, lb, 1e-6)}, repeat)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--no-tower", action="store_true", help="skip the vision tower timing")
    args = ap.parse_args()
    if kernels.available() is False or kernels.prefill_attention(*inputs(1, 1, 2, 16, 16), 0.25) is None:
        sys.exit(f"the prefill kernel does not run here: {kernels.status()}")
    result = {"threads": torch.get_num_threads(), "kernels": kernels.status(), "cases": {}}
    print(f"threads {result['threads']}, {result['kernels']}")
    print(f"{'case':8} {'shape':28} {'sdpa ms':>9} {'GF/s':>6} {'kernel ms':>10} {'GF/s':>6} {'speedup':>8}")
    for name, (b, h, t, d, dv, causal) in CASES.items():
        flops = 2 * b * h * t * t * (d + dv) * (0.5 if causal else 1.0)
        secs = attention_times(inputs(b, h, t, d, dv), causal, args.repeat)
        row = {"shape": [b, h, t, d, dv], "causal": causal, "sdpa_ms": secs["sdpa"] * 1e3,
               "kernel_ms": secs["kernel"] * 1e3, "sdpa_gflops": flops / secs["sdpa"] / 1e9,
               "kernel_gflops": flops / secs["kernel"] / 1e9, "speedup": secs["sdpa"] / secs["kernel"]}
        result["cases"][name] = row
        shape = f"{(b, h, t, d)}/{dv}{' causal' if causal else ''}"
        print(f"{name:8} {shape:28} {row['sdpa_ms']:9.1f} {row['sdpa_gflops']:6.0f} {row['kernel_ms']:10.1f} "
              f"{row['kernel_gflops']:6.0f} {row['speedup']:7.2f}x")
    result["elementwise"] = ew = elementwise(args.repeat)
    for name, secs in ew.items():
        extra = (f"  (torch, transposed input: {secs['torch_transposed'] * 1e3:.1f} ms)"
                 if "torch_transposed" in secs else "")
        print(f"{name:10} {'2916 rows':26} {secs['torch'] * 1e3:9.1f} {'':6} {secs['kernel'] * 1e3:10.1f} {'':6} "
              f"{secs['torch'] / secs['kernel']:7.2f}x{extra}")
    if not args.no_tower:
        result["tower"] = tw = tower(args.repeat)
        print(f"{'tower':8} {'27 blocks, 4 tiles':28} {tw['sdpa_s'] * 1e3:9.0f} {'':6} {tw['kernel_s'] * 1e3:10.0f} "
              f"{'':6} {tw['speedup']:7.2f}x  (output rel. diff {tw['rel_diff']:.1e})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
