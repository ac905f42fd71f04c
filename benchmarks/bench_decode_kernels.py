"""Decode-step kernels against their floors: attention over a long cache, and the RMSNorm swap.

Rows (bf16, CPU, tiny's shapes: 12 layers, 10 heads of 128):
- attention: one decode step's attention over `--context` cached positions in every layer
  (kernels.decode_attention) as GB/s of cache read, against the native streaming-read probe
  taken right before and after it, and torch's few-query path (two matmuls, kernels off);
- rms_norm: the language model's RMSNorm on one row (decode) and on 1024 rows (a prefill
  chunk), the native pass (kernels.rms_norm) against the plain module's eight torch ops;
- decode step: with `--ckpt` or the bench's tiny checkpoint, whole decode steps with the native
  RMSNorm swapped in (engine/fast.FastRMSNorm) and with the plain forward, interleaved.
Both sides of each row run interleaved in one process; medians of --repeat rounds. Prints a
table and one JSON line; writes benchmarks/results/decode-kernels-cpu.json.

    python benchmarks/bench_decode_kernels.py [--repeat 7] [--context 2000] [--no-step]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dsvl2_cli.engine.native import kernels  # noqa: E402
from dsvl2_cli.model.attention import RMSNorm, few_query_attention  # noqa: E402

LAYERS, HEADS, HEAD_DIM, HIDDEN = 12, 10, 128, 1280


def seconds(fn, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def attention_row(probe, context: int, repeat: int) -> dict:
    cap = context + 256  # spare capacity, as a growing cache has: k and v are strided views
    caches = [(torch.randn(1, HEADS, cap, HEAD_DIM).bfloat16(), torch.randn(1, HEADS, cap, HEAD_DIM).bfloat16())
              for _ in range(LAYERS)]
    views = [(k[:, :, :context], v[:, :, :context]) for k, v in caches]
    q = torch.randn(1, HEADS, 1, HEAD_DIM).bfloat16()
    scale = HEAD_DIM**-0.5
    nbytes = LAYERS * 2 * HEADS * context * HEAD_DIM * 2
    rounds = []
    for _ in range(repeat):
        before = probe.gb_s()
        native = seconds(lambda: [kernels.decode_attention(q, k, v, scale) for k, v in views])
        after = probe.gb_s()
        with kernels.disabled():
            plain = seconds(lambda: [few_query_attention(q, k, v, None, scale) for k, v in views], 3)
        rounds.append({"native_s": native, "torch_s": plain, "probe_gb_s": max(before, after)})
    native = statistics.median(r["native_s"] for r in rounds)
    fraction = statistics.median(nbytes / r["native_s"] / 1e9 / r["probe_gb_s"] for r in rounds)
    return {"context": context, "layers": LAYERS, "cache_bytes": nbytes, "native_ms": native * 1e3,
            "torch_ms": statistics.median(r["torch_s"] for r in rounds) * 1e3,
            "native_gb_s": nbytes / native / 1e9, "fraction_of_probe": fraction,
            "probe_gb_s": statistics.median(r["probe_gb_s"] for r in rounds), "floor_wrong": fraction > 1.0}


def rms_norm_row(rows: int, repeat: int) -> dict:
    norm = RMSNorm(HIDDEN, 1e-6).bfloat16()
    x = torch.randn(rows, HIDDEN).bfloat16()
    w = norm.weight.detach()
    native, plain = [], []
    with torch.inference_mode():
        for _ in range(repeat):
            native.append(seconds(lambda: kernels.rms_norm(x, w, norm.eps), 50))
            plain.append(seconds(lambda: norm(x), 50))
    n, p = statistics.median(native), statistics.median(plain)
    return {"rows": rows, "native_us": n * 1e6, "torch_us": p * 1e6, "speedup": p / n}


def decode_step_row(ckpt: Path | None, repeat: int) -> dict:
    import dsvl2_cli
    from dsvl2_cli import settings
    from dsvl2_cli.dev import bench, bench_probes
    from dsvl2_cli.engine.native import fast

    path = ckpt or bench.ensure_checkpoint(settings.bench_dir(), "tiny", None)
    vlm = dsvl2_cli.load(path, dtype="bfloat16", device="cpu")
    bench_probes.warm_page_cache(path)
    ids = bench.text_ids(vlm, 10)
    swapped = fast.FastRMSNorm.forward
    ms = {"native": [], "torch": []}
    try:
        for _ in range(repeat):
            for name, forward in (("torch", RMSNorm.forward), ("native", swapped)):
                fast.FastRMSNorm.forward = forward
                ms[name].append(bench.decode_rate(vlm, ids, 12)[0] * 1e3)
    finally:
        fast.FastRMSNorm.forward = swapped
    ratio = statistics.median(n / t for n, t in zip(ms["native"], ms["torch"]))
    return {"checkpoint": str(path), "native_rms_norm_ms": statistics.median(ms["native"]),
            "torch_rms_norm_ms": statistics.median(ms["torch"]), "native_over_torch": ratio}


def main(argv=None) -> int:
    from dsvl2_cli.dev import bench
    from dsvl2_cli.dev.bench_probes import BandwidthProbe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--context", type=int, default=2000)
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--no-step", action="store_true", help="skip the whole-decode-step row")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode-kernels-cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if not kernels.available():
        print("the native kernels are not available here: nothing to measure", file=sys.stderr)
        return 1
    probe = BandwidthProbe()
    att = attention_row(probe, args.context, args.repeat)
    print(f"attention, {att['context']} cached x {LAYERS} layers: native {att['native_ms']:.2f} ms "
          f"({att['native_gb_s']:.1f} GB/s, {att['fraction_of_probe']:.0%} of the probe's "
          f"{att['probe_gb_s']:.1f}), torch {att['torch_ms']:.2f} ms", flush=True)
    norms = [rms_norm_row(rows, args.repeat) for rows in (1, 1024)]
    for r in norms:
        print(f"rms_norm, {r['rows']:>4} x {HIDDEN}: native {r['native_us']:8.1f} us, torch {r['torch_us']:8.1f} us "
              f"({r['speedup']:.2f}x)", flush=True)
    report = {"machine": bench.machine_description(), "attention": att, "rms_norm": norms}
    if not args.no_step:
        step = decode_step_row(args.ckpt, args.repeat)
        print(f"decode step: {step['native_rms_norm_ms']:.1f} ms with the native RMSNorm, "
              f"{step['torch_rms_norm_ms']:.1f} ms with torch's ({step['native_over_torch']:.3f}x)")
        report["decode_step"] = step
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
