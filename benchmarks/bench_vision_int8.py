"""The opt-in int8 vision tower (load(..., vision_int8=True)) against the bf16 one: speed and
accuracy on the real-shape synthetic tiny checkpoint (SigLIP-SO400M: 27 blocks, width 1152,
MLP 4304; random bf16 weights), and the four linears' GEMMs alone.

- gemm: each of qkv (1152 -> 3456), proj (1152 -> 1152), fc1 (1152 -> 4304, bias + tanh-GELU in
  the int8 epilogue; the bf16 side as the bf16 tower runs it: a bias-free GEMM, then the native
  bias + GELU pass), fc2 (4304 -> 1152) on one 4-tile batch (2916 rows): torch's bf16 F.linear
  against int8_kernels.int8_linear (activation quantization included); GOP/s counts 2 M N K.
- tower: one batch of 4 tiles of a 640x480 synthetic photo (a gradient with shapes; its global
  view and first local tiles as the processor makes them) through the vision tower, bf16 and
  int8, seconds per tile; and their accuracy per tile: cosine similarity (mean and min over the
  729 patch rows) and relative L2 error of the vision features and of the projector's output
  (the image embeddings the language model reads).
Both sides of each row run interleaved in one process, medians of --repeat rounds (three times
as many for the GEMMs) after a warm-up (other work shares the CPU: compare the ratios of one
run). Random weights lack the outlier channels of a trained SigLIP, which are what per-row /
per-channel int8 handles worst: the accuracy cost on the real model is likely larger than here.
Prints a table and writes benchmarks/results/vision-int8-cpu.json (--out to change).

    python benchmarks/bench_vision_int8.py [--repeat 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import dsvl2_cli
from dsvl2_cli import settings
from dsvl2_cli.dev import bench
from dsvl2_cli.dev.bench_probes import interleaved
from dsvl2_cli.engine.native import int8_kernels, kernels
from dsvl2_cli.engine.prompt.processor import user_message
from dsvl2_cli.engine.runtime import TILE_BATCH

GEMMS = {"qkv": (3456, 1152), "proj": (1152, 1152), "fc1": (4304, 1152), "fc2": (1152, 4304)}  # (N, K)
ROWS = 4 * 729  # one batch of TILE_BATCH tiles


def photo(width: int = 640, height: int = 480) -> Image.Image:
    """A deterministic 'photo': a colour gradient with a few filled shapes and lines."""
    x = torch.linspace(0, 1, width)[None, :, None]
    y = torch.linspace(0, 1, height)[:, None, None]
    rgb = torch.cat([x.expand(height, width, 1), y.expand(height, width, 1),
                     (1 - x * y).expand(height, width, 1)], dim=2)  # (H, W, 3)
    img = Image.fromarray((rgb * 255).to(torch.uint8).numpy(), "RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse((80, 60, 300, 260), fill=(220, 40, 40))
    draw.rectangle((360, 200, 600, 420), fill=(30, 160, 60), outline=(0, 0, 0), width=6)
    draw.polygon([(200, 440), (330, 300), (460, 440)], fill=(250, 220, 30))
    for i in range(0, width, 40):
        draw.line((i, 0, width - i, height), fill=(255, 255, 255), width=2)
    return img


def gemms(repeat: int) -> dict:
    out = {}
    g = torch.Generator().manual_seed(0)
    for name, (n, k) in GEMMS.items():
        x = torch.randn(ROWS, k, generator=g).bfloat16()
        w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
        b = (torch.randn(n, generator=g) * 0.02).bfloat16()
        packed, bf = int8_kernels.pack_int8(w), b.float()
        gelu = name == "fc1"
        with torch.inference_mode():
            def plain():
                if gelu:  # FastVisionMLP's fc1
                    return kernels.bias_gelu_(F.linear(x, w), b)
                return F.linear(x, w, b)

            secs = interleaved({"bf16": plain, "int8": lambda: int8_kernels.int8_linear(x, packed, bf, gelu)}, repeat)
            want, got = plain().float(), int8_kernels.int8_linear(x, packed, bf, gelu).float()
        ops = 2 * ROWS * n * k
        out[name] = {"m": ROWS, "n": n, "k": k, "bf16_ms": secs["bf16"] * 1e3, "int8_ms": secs["int8"] * 1e3,
                     "bf16_gflops": ops / secs["bf16"] / 1e9, "int8_gops": ops / secs["int8"] / 1e9,
                     "speedup": secs["bf16"] / secs["int8"],
                     "rel_err": ((got - want).norm() / want.norm()).item()}
    return out


def _accuracy(got: torch.Tensor, want: torch.Tensor) -> list[dict]:
    """Per tile: cosine similarity of each row (mean, min) and relative L2 error of the tile."""
    rows = []
    for a, b in zip(got.float(), want.float()):  # (T, C) each
        cos = F.cosine_similarity(a, b, dim=-1)
        rows.append({"cos_mean": cos.mean().item(), "cos_min": cos.min().item(),
                     "rel_l2": ((a - b).norm() / b.norm()).item()})
    return rows


def tower(path: Path, repeat: int) -> dict:
    t0 = time.perf_counter()
    plain = dsvl2_cli.load(path, dtype="bfloat16", device="cpu", vision_int8=False)
    t1 = time.perf_counter()
    int8 = dsvl2_cli.load(path, dtype="bfloat16", device="cpu", vision_int8=True)
    t2 = time.perf_counter()
    if not int8.vision_int8:
        sys.exit("the int8 vision tower is not available here (see the warning above)")
    prepared = plain.prepare([user_message("Describe this photo.", [photo()])])
    # the global view and the first local tiles: one batch of TILE_BATCH tiles, as the runtime
    # encodes them (all of the photo's tiles would double the run for the same figures)
    pixels = prepared.pixel_values()[:TILE_BATCH].to(torch.bfloat16)  # (tiles, 3, 384, 384)
    tiles = pixels.shape[0]
    feats = {}

    def encode(name, vlm):
        feats[name] = vlm.model.vision(pixels)  # (tiles, 729, 1152): the last round's are compared

    with torch.inference_mode():
        secs = interleaved({"bf16": lambda: encode("bf16", plain), "int8": lambda: encode("int8", int8)}, repeat)
        f_bf, f_i8 = feats["bf16"], feats["int8"]
        p_bf, p_i8 = plain.model.projector(f_bf), int8.model.projector(f_i8)  # (tiles, 196, D)
    int8_bytes = sum(m.int8.nbytes for m in int8.model.vision.modules() if hasattr(m, "int8"))
    return {"image": "640x480 synthetic (gradient, shapes, lines)", "tiles_of_image": prepared.pixel_values().shape[0],
            "tiles": tiles,
            "bf16_s_per_tile": secs["bf16"] / tiles, "int8_s_per_tile": secs["int8"] / tiles,
            "speedup": secs["bf16"] / secs["int8"], "load_bf16_s": t1 - t0, "load_int8_s": t2 - t1,
            "int8_weight_bytes": int8_bytes,
            "features": _accuracy(f_i8, f_bf), "projector": _accuracy(p_i8, p_bf)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "vision-int8-cpu.json")
    args = ap.parse_args()
    if not int8_kernels.int8_gemm_available():
        sys.exit(f"no AVX512-VNNI int8 kernel here ({kernels.status()})")
    result = {"benchmark": "int8 vision tower vs bf16, real SigLIP-SO400M shapes, synthetic bf16 weights",
              "threads": torch.get_num_threads(), "kernels": kernels.status(), "repeat": args.repeat,
              "note": "random weights lack a trained model's outlier channels: the accuracy cost on the real model "
                      "is likely larger"}
    print(f"threads {result['threads']}, {result['kernels']}, medians of {args.repeat} interleaved rounds "
          f"({3 * args.repeat} for the GEMMs)")
    print(f"{'gemm':6} {'M x N x K':18} {'bf16 ms':>8} {'GF/s':>6} {'int8 ms':>8} {'GOP/s':>6} {'speedup':>8} "
          f"{'rel err':>8}")
    result["gemm"] = gm = gemms(3 * args.repeat)  # a tenth of a second each: more rounds, steadier medians
    for name, r in gm.items():
        shape = f"{r['m']}x{r['n']}x{r['k']}"
        print(f"{name:6} {shape:18} {r['bf16_ms']:8.1f} {r['bf16_gflops']:6.0f} "
              f"{r['int8_ms']:8.1f} {r['int8_gops']:6.0f} {r['speedup']:7.2f}x {r['rel_err']:8.4f}")
    path = bench.ensure_checkpoint(settings.bench_dir(), "tiny", None)
    result["checkpoint"] = str(path)
    result["tower"] = tw = tower(path, args.repeat)
    print(f"tower  {tw['tiles']} of the {tw['tiles_of_image']} tiles of a 640x480 photo: "
          f"bf16 {tw['bf16_s_per_tile']:.2f} s/tile, int8 {tw['int8_s_per_tile']:.2f} s/tile, {tw['speedup']:.2f}x "
          f"(load {tw['load_bf16_s']:.1f} s bf16, {tw['load_int8_s']:.1f} s with int8 packing; "
          f"{tw['int8_weight_bytes'] / 1e9:.2f} GB int8 weights)")
    print(f"{'tile':>4} {'features cos mean/min':>22} {'rel L2':>7} {'projector cos mean/min':>23} {'rel L2':>7}")
    for i, (f, p) in enumerate(zip(tw["features"], tw["projector"])):
        print(f"{i:4} {f['cos_mean']:13.5f}/{f['cos_min']:.5f} {f['rel_l2']:7.4f} "
              f"{p['cos_mean']:14.5f}/{p['cos_min']:.5f} {p['rel_l2']:7.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
