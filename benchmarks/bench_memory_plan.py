"""The memory plan (engine/loading/memory_plan.py) against measured peak RSS, real tiny shapes, CPU.

For each method (default none and int4), in a fresh subprocess so that the peak is that run's
own: load the real-shape tiny synthetic checkpoint (bf16, random weights: memory does not depend
on the values) quantizing while loading, prepare one 640x480 image with a question (2x2 tiles +
the global view: 5 tiles, 1023 image tokens), generate 16 tokens greedily (EOS does not stop
it early: the weights are random), and read the peak RSS of the whole process from the kernel
(VmHWM; ru_maxrss where there is no /proc). The plan's total is compared with that peak; the
plan also at the context this run reached (the cache at the prompt + 16 positions instead of
the full context), which is what the run itself could have needed.

    python benchmarks/bench_memory_plan.py [--ckpt DIR] [--methods none,int4] [--tokens 16]

The checkpoint (6.7 GB, a few minutes to write) goes to DSVL2_BENCH_DIR/tiny (as `dsvl2 bench`)
and is reused when present. Prints a table (GB = 1e9 bytes) and writes
benchmarks/results/memory-plan-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PHOTO = (640, 480)
QUESTION = "What is in this picture?"


def peak_rss() -> int:
    from dsvl2_cli.dev.bench import peak_rss_bytes  # VmHWM, the one definition

    return peak_rss_bytes()


def current_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def child(ckpt: Path, method: str, tokens: int) -> dict:
    import torch

    import dsvl2_cli
    from dsvl2_cli.dev.bench import synthetic_image
    from dsvl2_cli.engine import generate as gen
    from dsvl2_cli.engine.prompt.processor import user_message

    out = {"method": method, "rss_imported": current_rss()}
    t = time.perf_counter()
    vlm = dsvl2_cli.load(ckpt, dtype="bfloat16", device="cpu", quantize=method)
    out["load_s"] = round(time.perf_counter() - t, 1)
    out["peak_rss_load"] = peak_rss()
    out["rss_after_load"] = current_rss()
    out["weight_bytes"] = vlm.weight_memory()
    prepared = vlm.prepare([user_message(QUESTION, [synthetic_image(PHOTO)])])
    # greedy, EOS ignored: the run decodes exactly `tokens` tokens whatever the random weights say
    model, lm = vlm.model, vlm.model.language
    t = time.perf_counter()
    with torch.inference_mode():
        embeds = model.embed(prepared.input_ids[None], prepared.image_mask[None], prepared.pixel_values(),
                             [img.grid for img in prepared.images], tile_batch=gen.TILE_BATCH)
        out["peak_rss_vision"] = peak_rss()
        cache = lm.new_cache()
        for s in range(0, embeds.shape[1], gen.DEFAULT_PREFILL_CHUNK):
            logits = lm(embeds[:, s:s + gen.DEFAULT_PREFILL_CHUNK], cache, last_only=True)
        out["peak_rss_prefill"] = peak_rss()
        token = logits[:, -1:].argmax(-1)
        for _ in range(tokens):
            logits = lm(model.embed(token), cache)
            token = logits[:, -1:].argmax(-1)
    out["generate_s"] = round(time.perf_counter() - t, 1)
    out["prompt_tokens"] = int(prepared.input_ids.shape[0])
    out["image_tokens"] = int(prepared.image_mask.sum())
    out["tiles"] = int(prepared.pixel_values().shape[0])
    out["context"] = int(cache.length)
    out["cache_bytes"] = int(cache.nbytes)
    out["peak_rss"] = peak_rss()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=None, help="real-shape tiny checkpoint (default: DSVL2_BENCH_DIR/tiny)")
    ap.add_argument("--methods", default="none,int4")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory-plan-cpu.json")
    ap.add_argument("--replan", action="store_true",
                    help="recompute the plan for the measurements already in --out (no new run)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child is not None:
        print("RESULT " + json.dumps(child(args.ckpt, args.child, args.tokens)), flush=True)
        return 0

    import torch

    from dsvl2_cli import settings
    from dsvl2_cli.dev.bench import ensure_checkpoint
    from dsvl2_cli.engine.loading import memory_plan
    from dsvl2_cli.engine.quant.format import QuantSpec
    from dsvl2_cli.model.config import ModelConfig

    def add_plan(measured: dict, ckpt: Path) -> dict:
        method = measured["method"]
        p = memory_plan.plan_for_folder(ckpt, torch.bfloat16, method)
        at_run = memory_plan.plan(ModelConfig.from_dir(ckpt), torch.bfloat16, None if method == "none" else
                          QuantSpec.make(method), context=measured["context"])
        measured["plan"] = p.as_dict()
        measured["plan_at_run_context"] = at_run.as_dict()
        measured["planned_weights_equal_loaded"] = p.weights["total"] == measured["weight_bytes"]["total"]
        measured["plan_over_measured"] = round(p.total / measured["peak_rss"], 4)
        measured["plan_at_run_over_measured"] = round(at_run.total / measured["peak_rss"], 4)
        return measured

    if args.replan:
        report = json.loads(args.out.read_text())
        ckpt = Path(report["checkpoint"])
        results = [add_plan(r, ckpt) for r in report["results"]]
        report["runtime_overhead_constant"] = memory_plan.RUNTIME_OVERHEAD
        return finish(report, results, args.out)

    ckpt = args.ckpt or ensure_checkpoint(settings.bench_dir(), "tiny", None)
    results = []
    t0 = time.time()
    for method in args.methods.split(","):
        proc = subprocess.run([sys.executable, __file__, "--ckpt", str(ckpt), "--child", method,
                               "--tokens", str(args.tokens)], check=False, capture_output=True, text=True, cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return 1
        measured = add_plan(json.loads(lines[-1][len("RESULT "):]), ckpt)
        results.append(measured)
        print(f"{method}: done in {measured['load_s'] + measured['generate_s']:.0f} s", file=sys.stderr, flush=True)

    report = {"benchmark": "memory plan vs peak RSS, real tiny shapes, synthetic bf16 weights, CPU",
              "checkpoint": str(ckpt), "workload": f"load + one {PHOTO[0]}x{PHOTO[1]} image prompt + "
              f"{args.tokens} decoded tokens, bfloat16", "gb": "1e9 bytes",
              "runtime_overhead_constant": memory_plan.RUNTIME_OVERHEAD,
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "platform": platform.platform(), "threads": torch.get_num_threads()},
              "seconds": round(time.time() - t0), "results": results}
    return finish(report, results, args.out)


def finish(report: dict, results: list[dict], out: Path) -> int:
    gb = 1e9
    print(f"{'method':6} {'weights':>8} {'load peak':>10} {'vision':>8} {'prefill':>8} {'peak RSS':>9} "
          f"{'plan':>7} {'plan/RSS':>8} {'plan@run':>9} {'ratio':>6}")
    for r in results:
        print(f"{r['method']:6} {r['weight_bytes']['total'] / gb:8.2f} {r['peak_rss_load'] / gb:10.2f} "
              f"{r['peak_rss_vision'] / gb:8.2f} {r['peak_rss_prefill'] / gb:8.2f} {r['peak_rss'] / gb:9.2f} "
              f"{r['plan']['total'] / gb:7.2f} {r['plan_over_measured']:8.3f} "
              f"{r['plan_at_run_context']['total'] / gb:9.2f} {r['plan_at_run_over_measured']:6.3f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({r["method"]: {"peak_rss": r["peak_rss"], "plan": r["plan"]["total"],
                                    "ratio": r["plan_over_measured"]} for r in results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
