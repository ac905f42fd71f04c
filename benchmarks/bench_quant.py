"""Quantized routed experts at the real tiny shapes (synthetic weights): memory, speed, error.

For each method (none / int8 / nf4 / int4), in a fresh subprocess so that peak RSS is that
method's own: load a bf16 real-shape tiny checkpoint quantizing while loading (peak RSS while
loading), count weight bytes, prefill a short text prompt, decode greedily (median ms per token
over the steps after a warm-up), prefill a 512-token prompt (peak RSS while generating covers
all three), and compare the short prompt's logits with the bf16 run's (saved by the `none` run).
Then, as memory bandwidth on shared machines drifts, decode speed once more with bf16, int4 and
nf4 loaded side by side in one process and their steps interleaved (same-run ratios). Prints a
table (GB = 1e9 bytes) and writes benchmarks/results/quant-cpu.json.

    python benchmarks/bench_quant.py [--ckpt DIR] [--tokens 32] [--methods none,int8,nf4,int4]

The checkpoint (6.7 GB, ~1 min to write) is reused when present. Peak RSS comes from the kernel
(VmHWM, reset between phases through /proc/self/clear_refs). Memory bandwidth on shared machines
varies between runs: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CKPT = ROOT / "bench-out" / "tiny-bf16"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quant-cpu.json"
PROMPT = "Describe the history of the printing press and how it changed the spread of ideas in Europe."
WARMUP = 3
LONG_PROMPT_TOKENS = 512  # a second prefill, where the experts see many rows each
DISTURBED, RETRIES = 0.1, 2  # others' share of the CPU above which a method's run is repeated
RETRY_UNTIL_S = 420  # ... while the whole benchmark has run for less than this


# ------------------------------------------------------------------------------ measuring

def _status() -> dict[str, int]:
    """kB values of this process's memory counters."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def _cpu_ticks() -> tuple[int, int, int]:
    """(all CPUs' busy ticks including steal, all ticks, this process's ticks)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    own = sum(int(v) for v in Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:13])
    return sum(fields[:8]) - idle, sum(fields[:8]), own


def _others_share(start: tuple[int, int, int]) -> float:
    """Share of the machine's CPU time that went to other processes (or the hypervisor's other
    guests, 'steal') since `start`: above ~0.1 the timings are disturbed."""
    busy, total, own = (b - a for a, b in zip(start, _cpu_ticks()))
    return round(max(0, busy - own) / max(1, total), 3)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def worker(method: str, ckpt: Path, tokens: int, ref_path: Path, threads: int) -> dict:
    """One method in this process. method "<m>@folder": load `ckpt`, a pre-quantized folder, as it is."""
    import torch

    torch.set_num_threads(threads)
    from dsvl2_cli.engine.loading import memory
    from dsvl2_cli.engine.prompt.processor import user_message
    from dsvl2_cli.engine.runtime import load

    _reset_peak()
    base = _status()["VmRSS"]
    t0 = time.perf_counter()
    vlm = load(ckpt, device="cpu", dtype="bfloat16", quantize=None if "@" in method else method)
    load_s = time.perf_counter() - t0
    after_load = _status()
    memory = memory.weight_memory(vlm.model)
    summary = memory.quantization_summary(vlm.model)
    model = vlm.model

    prepared = vlm.prepare([user_message(PROMPT)])
    _reset_peak()
    ticks = _cpu_ticks()
    with torch.inference_mode():
        logits = vlm.logits(prepared)  # (T, V) float32, uncached: the error reference
        cache = model.language.new_cache(1)
        cache.reserve(prepared.input_ids.numel() + tokens + 1)
        t = time.perf_counter()
        last = model.language(vlm.embed(prepared), cache, last_only=True)[:, -1]
        prefill_s = time.perf_counter() - t
        ids, steps = [], []
        for _ in range(tokens):
            ids.append(int(last.argmax()))
            t = time.perf_counter()
            last = model.language(model.embed(torch.tensor([[ids[-1]]])), cache)[:, -1]
            steps.append(time.perf_counter() - t)
        long_ids = prepared.input_ids.repeat(LONG_PROMPT_TOKENS // prepared.input_ids.numel() + 1)[:LONG_PROMPT_TOKENS]
        t = time.perf_counter()
        model.language(model.embed(long_ids[None]), model.language.new_cache(1), last_only=True)
        long_prefill_s = time.perf_counter() - t
    after_gen = _status()

    result = {
        "method": method,
        "load_s": round(load_s, 1),
        "rss_before_load_bytes": base * 1024,
        "peak_rss_load_bytes": after_load["VmHWM"] * 1024,
        "rss_after_load_bytes": after_load["VmRSS"] * 1024,
        "peak_rss_generate_bytes": after_gen["VmHWM"] * 1024,
        "weight_bytes": memory,
        "routed": summary,
        "prompt_tokens": int(prepared.input_ids.numel()),
        "prefill_tok_s": round(prepared.input_ids.numel() / prefill_s, 1),
        f"prefill_{LONG_PROMPT_TOKENS}_tok_s": round(LONG_PROMPT_TOKENS / long_prefill_s, 1),
        "decode_ms_per_token": round(1000 * statistics.median(steps[WARMUP:]), 2),
        "decode_tok_s": round(1 / statistics.median(steps[WARMUP:]), 2),
        "tokens": ids,
        "others_cpu_share": _others_share(ticks),
    }
    if method == "none":  # the bf16 reference for the others
        torch.save({"logits": logits, "tokens": ids}, ref_path)
    elif ref_path.is_file():
        ref = torch.load(ref_path)
        f = ref["logits"]
        result["logits_rel_err"] = round(((logits - f).norm() / f.norm()).item(), 4)
        result["last_logits_rel_err"] = round(((logits[-1] - f[-1]).norm() / f[-1].norm()).item(), 4)
        result["top1_agreement"] = round((logits.argmax(-1) == f.argmax(-1)).float().mean().item(), 3)
        same = 0
        for a, b in zip(ids, ref["tokens"]):
            if a != b:
                break
            same += 1
        result["greedy_tokens_same_as_bf16"] = same
    return result


def paired(methods: list[str], ckpt: Path, tokens: int, threads: int) -> dict:
    """Decode speed with the models loaded side by side in one process, one step of each in turn:
    memory bandwidth on a shared machine drifts by 2x within minutes, and this way every method
    sees the same drift. Returns each method's median ms per step and, per method, the median
    over rounds of (bf16 step time / its step time) in the same round."""
    import torch

    torch.set_num_threads(threads)
    from dsvl2_cli.engine.prompt.processor import user_message
    from dsvl2_cli.engine.runtime import load

    runs = {}
    for method in methods:
        vlm = load(ckpt, device="cpu", dtype="bfloat16", quantize=method)
        with torch.inference_mode():
            cache = vlm.model.language.new_cache(1)
            cache.reserve(128 + 2 * tokens)
            last = vlm.model.language(vlm.embed(vlm.prepare([user_message(PROMPT)])), cache, last_only=True)[:, -1]
        runs[method] = [vlm.model, cache, last]
    times = {m: [] for m in methods}
    with torch.inference_mode():
        for _ in range(WARMUP + 2 * tokens):
            for method, run in runs.items():
                model, cache, last = run
                step = torch.tensor([[int(last.argmax())]])
                t = time.perf_counter()
                run[2] = model.language(model.embed(step), cache)[:, -1]
                times[method].append(time.perf_counter() - t)
    times = {m: v[WARMUP:] for m, v in times.items()}
    return {
        "rounds": len(times[methods[0]]),
        "decode_ms_per_token": {m: round(1000 * statistics.median(v), 2) for m, v in times.items()},
        "speed_vs_bf16": {m: round(statistics.median(a / b for a, b in zip(times["none"], v)), 3)
                          for m, v in times.items()},
    }


# ---------------------------------------------------------------------------------- driver

def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Flags"):
                value = value.strip()
                if key.strip() == "Flags":
                    value = " ".join(f for f in value.split() if f.startswith(("avx512", "avx2", "amx")))
                info[key.strip()] = value
    except (OSError, subprocess.SubprocessError):
        info["Model name"] = platform.processor()
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    try:
        import bitsandbytes
        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    try:
        from dsvl2_cli.engine.native import kernels
        info["bf16_kernels"] = kernels.status()
    except ImportError:
        pass
    return info


def table(results: list[dict]) -> str:
    bf16 = next((r for r in results if r["method"] == "none"), None)
    head = ("method", "weights GB", "% of bf16", "routed B/param", "peak RSS load GB", "peak RSS gen GB",
            "decode tok/s", "x bf16", "prefill tok/s", f"prefill {LONG_PROMPT_TOKENS} tok/s", "logit rel err",
            "top-1 agree", "greedy same", "others' CPU")
    rows = [head]
    for r in results:
        total = r["weight_bytes"]["total"]
        rows.append((
            r["method"],
            f"{total / 1e9:.2f}",
            f"{100 * total / bf16['weight_bytes']['total']:.0f}%" if bf16 else "-",
            f"{r['routed']['bytes_per_param']:.3f}",
            f"{r['peak_rss_load_bytes'] / 1e9:.2f}",
            f"{r['peak_rss_generate_bytes'] / 1e9:.2f}",
            f"{r['decode_tok_s']:.1f}",
            f"{r['decode_tok_s'] / bf16['decode_tok_s']:.2f}" if bf16 else "-",
            f"{r['prefill_tok_s']:.0f}",
            f"{r[f'prefill_{LONG_PROMPT_TOKENS}_tok_s']:.0f}",
            f"{r.get('logits_rel_err', 0.0):.4f}",
            f"{r.get('top1_agreement', 1.0):.3f}",
            f"{r.get('greedy_tokens_same_as_bf16', len(r['tokens']))}/{len(r['tokens'])}",
            f"{r['others_cpu_share']:.2f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--methods", default="none,int8,nf4,int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--prequantized", default="int4", help="also load this method from a pre-quantized folder "
                    "(written next to the checkpoint); '' to skip")
    ap.add_argument("--paired", default="none,int4,nf4", help="methods whose decode speed is also measured "
                    "side by side in one process, steps interleaved; '' to skip")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ref", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    ref_path = args.ref or args.ckpt.parent / f"{args.ckpt.name}-bf16-logits.pt"

    if args.worker == "paired":
        print("RESULT " + json.dumps(paired(args.paired.split(","), args.ckpt, args.tokens, args.threads)))
        return
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.ckpt, args.tokens, ref_path, args.threads)))
        return

    if not (args.ckpt / "config.json").is_file():
        import torch

        from dsvl2_cli.dev.synthetic import write_checkpoint
        print(f"writing the real-shape tiny checkpoint to {args.ckpt} ...", file=sys.stderr)
        write_checkpoint(args.ckpt, "tiny", dtype=torch.bfloat16, shards=1)
    methods = args.methods.split(",")
    if "none" in methods:
        methods = ["none"] + [m for m in methods if m != "none"]  # the bf16 reference first
    results = []
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    folder_s = None
    if args.prequantized:
        # the same method from a folder written by `dsvl2 quantize`: no float experts ever loaded
        from dsvl2_cli.engine.quant import quantize_folder
        folder = args.ckpt.parent / f"{args.ckpt.name}-{args.prequantized}"
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        quantize_folder(args.ckpt, folder, args.prequantized)
        folder_s = round(time.perf_counter() - t, 1)
        print(f"quantize_folder {args.prequantized}: {folder_s} s", file=sys.stderr)
        methods.append(f"{args.prequantized}@folder")
    for method in methods:
        ckpt = folder if method.endswith("@folder") else args.ckpt
        cmd = [sys.executable, __file__, "--worker", method, "--ckpt", str(ckpt), "--tokens", str(args.tokens),
               "--threads", str(args.threads), "--ref", str(ref_path)]
        runs = []
        for _ in range(1 + RETRIES):  # a run disturbed by other processes is done again
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{method}: worker failed")
            runs.append(json.loads(line[len("RESULT "):]))
            if runs[-1]["others_cpu_share"] <= DISTURBED or time.perf_counter() - t0 > RETRY_UNTIL_S:
                break
            print(f"{method}: other processes took {runs[-1]['others_cpu_share']:.0%} of the CPU; again",
                  file=sys.stderr)
        results.append(min(runs, key=lambda r: r["others_cpu_share"]))
        print(f"{method}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    pair = None
    if args.paired:
        cmd = [sys.executable, __file__, "--worker", "paired", "--paired", args.paired, "--ckpt", str(args.ckpt),
               "--tokens", str(args.tokens), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit("paired decode: worker failed")
        pair = json.loads(line[len("RESULT "):])
        print(f"paired decode: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    report = {
        "benchmark": "routed-expert quantization, real tiny shapes, synthetic bf16 weights",
        "checkpoint": str(args.ckpt),
        "prompt": PROMPT,
        "decode_tokens": args.tokens,
        "quantize_folder_s": folder_s,
        "warmup_steps": WARMUP,
        "machine": machine(),
        # other processes on a 2-core machine distort every number: this shows whether there were any
        "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "seconds": round(time.perf_counter() - t0),
        "results": results,
        "paired_decode": pair,
        "table": table(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    if pair:
        print(f"interleaved decode ({pair['rounds']} rounds): " + ", ".join(
            f"{m} {ms} ms/token ({pair['speed_vs_bf16'][m]:.2f}x bf16)" for m, ms in pair["decode_ms_per_token"].items()))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
