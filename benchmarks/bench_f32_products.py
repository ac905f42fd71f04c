"""bf16 products in float32 (engine/native/f32_products.py) against torch's bf16 GEMMs, on this CPU.

Meant for a CPU without bf16 dot products (AVX2, AVX512 without BF16), where `auto` picks float32;
on one with them the float32 side is what DSVL2_BF16_PRODUCTS=float32 would cost.

- ops: the products a prefill runs, bf16 (torch) against inside Float32Products: the vision
  MLP's fc1 on one 4-tile batch (2916 x 1152 -> 4304), the patch-embedding convolution of 4
  tiles, and one tiny MoE layer's routed experts for 1024 tokens (64 experts, top-6, 1280 ->
  2 x 896 -> 1280; bf16 torch._grouped_mm against the per-expert loop `install_f32_products`
  sets);
- model: the real-shape synthetic tiny checkpoint with 4 language layers (random bf16 weights),
  loaded with DSVL2_BF16_PRODUCTS=native and =float32: the vision tower on one tile of a
  640x480 photo, and a 512-token text prefill, seconds each; and how far apart the two give
  the prefill's last logits (relative L2: summation order only).
Both sides of each row run in turns in one process (bench_probes.interleaved: medians of
--repeat rounds after a warm-up), so a change in the machine's speed hits both alike. Prints a
table and writes benchmarks/results/f32-products-cpu.json (--out to change).

    python benchmarks/bench_f32_products.py [--repeat 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import dsvl2_cli
from dsvl2_cli import settings
from dsvl2_cli.dev import bench
from dsvl2_cli.dev.bench_probes import interleaved
from dsvl2_cli.engine.native import f32_products, kernels
from dsvl2_cli.engine.prompt.processor import user_message
from dsvl2_cli.model.moe import Experts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vision_int8 import photo  # noqa: E402 - the same synthetic photo


def _in_mode(fn):
    def run():
        with f32_products.Float32Products():
            return fn()
    return run


def ops(repeat: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * 729, 1152, generator=g).bfloat16()
    w = (torch.randn(4304, 1152, generator=g) * 0.03).bfloat16()
    pixels = torch.randn(4, 3, 384, 384, generator=g).bfloat16()
    patch = (torch.randn(1152, 3, 14, 14, generator=g) * 0.05).bfloat16()
    tokens, top = 1024, 6
    grouped = Experts(64, 1280, 896)
    looped = Experts(64, 1280, 896, grouped_mm=False)
    with torch.no_grad():  # the same weights in both
        grouped.gate_up.copy_(torch.randn(grouped.gate_up.shape, generator=g) * 0.03)
        grouped.down.copy_(torch.randn(grouped.down.shape, generator=g) * 0.03)
        looped.load_state_dict(grouped.state_dict())
    grouped, looped = grouped.bfloat16(), looped.bfloat16()
    h = torch.randn(tokens, 1280, generator=g).bfloat16()
    ids = torch.randint(0, 64, (tokens, top), generator=g)
    weights = torch.rand(tokens, top, generator=g)
    rows = {
        "vision fc1": (lambda: F.linear(x, w), 2 * x.shape[0] * 1152 * 4304, lambda: F.linear(x, w)),
        "patch conv": (lambda: F.conv2d(pixels, patch, stride=14), 2 * 4 * 729 * 588 * 1152,
                       lambda: F.conv2d(pixels, patch, stride=14)),
        "experts": (lambda: grouped(h, ids, weights), 2 * tokens * top * 3 * 1280 * 896,
                    lambda: looped(h, ids, weights)),
    }
    out = {}
    with torch.inference_mode():
        for name, (bf16_fn, flop, f32_fn) in rows.items():
            secs = interleaved({"bf16": bf16_fn, "float32": _in_mode(f32_fn)}, repeat)
            a, b = bf16_fn().float(), _in_mode(f32_fn)().float()
            out[name] = {"bf16_s": secs["bf16"], "float32_s": secs["float32"],
                         "bf16_gflop_s": flop / secs["bf16"] / 1e9, "float32_gflop_s": flop / secs["float32"] / 1e9,
                         "speedup": secs["bf16"] / secs["float32"],
                         "rel_diff": ((a - b).norm() / a.norm()).item()}
    return out


def model(path: Path, repeat: int) -> dict:
    vlms = {}
    for choice in ("native", "float32"):
        os.environ["DSVL2_BF16_PRODUCTS"] = choice
        vlms[choice] = dsvl2_cli.load(path, dtype="bfloat16", device="cpu")
    os.environ.pop("DSVL2_BF16_PRODUCTS")
    any_vlm = vlms["native"]
    prepared = any_vlm.prepare([user_message("Describe this photo.", [photo()])])
    tile = prepared.pixel_values()[:1].to(torch.bfloat16)  # the global view
    ids = torch.tensor(bench.text_ids(any_vlm, 512))[None]
    logits = {}

    def prefill(choice):
        vlm = vlms[choice]
        logits[choice] = vlm.forward(vlm.embed_tokens(ids), vlm.new_cache(), last_only=True)[0, -1]

    with torch.inference_mode():
        vision = interleaved({c: (lambda c=c: vlms[c].model.vision(tile)) for c in vlms}, repeat)
        text = interleaved({c: (lambda c=c: prefill(c)) for c in vlms}, repeat)
    a, b = logits["native"], logits["float32"]
    return {"vision_s_per_tile": vision, "vision_speedup": vision["native"] / vision["float32"],
            "prefill_512_s": text, "prefill_speedup": text["native"] / text["float32"],
            "prefill_logits_rel_diff": ((a - b).norm() / a.norm()).item(),
            "layers": any_vlm.config.language.num_hidden_layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "f32-products-cpu.json")
    args = ap.parse_args()
    result = {"benchmark": "bf16 products: torch bf16 GEMMs against float32 products (Float32Products)",
              "threads": torch.get_num_threads(), "kernels": kernels.status(),
              "native_bf16_dot": f32_products.native_bf16_dot(),
              "auto_picks": "native" if f32_products.native_bf16_dot() else "float32",
              "repeat": args.repeat, "machine": bench.machine_description()}
    print(f"threads {result['threads']}, {result['kernels']}, bf16 dot products: {result['native_bf16_dot']} "
          f"(auto: {result['auto_picks']}); medians of {args.repeat} interleaved rounds")
    print(f"{'op':12} {'bf16 s':>8} {'GF/s':>6} {'float32 s':>10} {'GF/s':>6} {'speedup':>8} {'rel diff':>9}")
    result["ops"] = table = ops(args.repeat)
    for name, r in table.items():
        print(f"{name:12} {r['bf16_s']:8.3f} {r['bf16_gflop_s']:6.0f} {r['float32_s']:10.3f} "
              f"{r['float32_gflop_s']:6.0f} {r['speedup']:7.2f}x {r['rel_diff']:9.2e}")
    path = bench.ensure_checkpoint(settings.bench_dir(), "tiny", 4)
    result["checkpoint"] = str(path)
    result["model"] = m = model(path, args.repeat)
    print(f"vision tower, 1 tile: native {m['vision_s_per_tile']['native']:.2f} s, float32 "
          f"{m['vision_s_per_tile']['float32']:.2f} s, {m['vision_speedup']:.2f}x")
    print(f"prefill, 512 tokens, {m['layers']} layers: native {m['prefill_512_s']['native']:.2f} s, float32 "
          f"{m['prefill_512_s']['float32']:.2f} s, {m['prefill_speedup']:.2f}x; last logits "
          f"{m['prefill_logits_rel_diff']:.2e} apart")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
