"""Serving throughput: aggregate decode tokens/s with 1, 2, 4, 8 concurrent clients against the
same requests run one after another, and the time to first token of a request whose image the
server has already seen (shared prompt cache) against a fresh one.

Runs the engine in process (engine/generate/scheduler.BatchEngine, what `dsvl2 serve` runs; no HTTP, so it
measures the engine), bounded in requests and tokens.

    python benchmarks/bench_serve.py -m deepseek-ai/deepseek-vl2-tiny --dtype bfloat16
    python benchmarks/bench_serve.py --quick   # a synthetic tiny-like checkpoint, CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import dsvl2_cli  # noqa: E402
from dsvl2_cli.engine.generate.scheduler import BatchEngine  # noqa: E402
from dsvl2_cli.engine.generate import Done, GenerationConfig, Prefilled, Token  # noqa: E402
from dsvl2_cli.engine.prompt.processor import user_message  # noqa: E402


def picture(w, h, seed) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB")


def run_clients(engine, prompts, config) -> tuple[float, int, list[float]]:
    """All prompts at once, one thread each: (seconds, generated tokens, ttft per request)."""
    counts, ttfts = [0] * len(prompts), [0.0] * len(prompts)

    def client(i):
        t0 = time.perf_counter()
        for event in engine.stream(prompts[i], config, timeout=600):
            if isinstance(event, Token) and event.id is not None:
                counts[i] += 1
                ttfts[i] = ttfts[i] or time.perf_counter() - t0

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, sum(counts), ttfts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--quick", action="store_true", help="synthetic tiny-like checkpoint, few tokens")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = None
    if args.quick:
        from dsvl2_cli.dev.synthetic import write_checkpoint
        tmp = tempfile.TemporaryDirectory()
        args.model = str(write_checkpoint(Path(tmp.name) / "tiny-like", "tiny-like"))
        args.dtype, args.device = args.dtype or "float32", args.device or "cpu"
        args.tokens = min(args.tokens, 8)
    vlm = dsvl2_cli.load(args.model, dtype=args.dtype, device=args.device)
    config = GenerationConfig(max_tokens=args.tokens)  # tok/s counts the tokens actually generated
    levels = [int(c) for c in args.clients.split(",")]
    prompts = [vlm.prepare([user_message(f"Question {i}: describe what you would expect to see.")])
               for i in range(max(levels))]
    results = {"model": vlm.name, "dtype": str(vlm.dtype), "device": str(vlm.device), "tokens": args.tokens,
               "concurrent": {}}
    engine = BatchEngine(vlm, max_batch=max(levels))
    try:
        run_clients(engine, prompts[:1], GenerationConfig(max_tokens=2))  # warm up
        for n in levels:
            seq_time, seq_tokens = 0.0, 0
            for p in prompts[:n]:
                t, k, _ = run_clients(engine, [p], config)
                seq_time, seq_tokens = seq_time + t, seq_tokens + k
            conc_time, conc_tokens, _ = run_clients(engine, prompts[:n], config)
            results["concurrent"][n] = {
                "sequential_tok_s": round(seq_tokens / seq_time, 2),
                "concurrent_tok_s": round(conc_tokens / conc_time, 2),
                "speedup": round((conc_tokens / conc_time) / (seq_tokens / seq_time), 2)}
        img = picture(768, 576, seed=1)
        first = vlm.prepare([user_message("Describe this image.", [img])])
        follow = vlm.prepare([user_message("What colours are in it?", [img])])
        short = GenerationConfig(max_tokens=1)
        ttft = {}
        for name, p in (("fresh_image", first), ("seen_image", follow)):
            t0 = time.perf_counter()
            for event in engine.stream(p, short, timeout=600):
                if isinstance(event, Prefilled):
                    reused = event.reused_tokens
                if isinstance(event, Done):
                    ttft[name] = {"seconds": round(time.perf_counter() - t0, 4), "cached_tokens": reused}
        results["time_to_first_token"] = ttft
    finally:
        engine.close()
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{results['model']}  {results['dtype']}  {results['device']}  {args.tokens} tokens per request")
        print("clients  sequential tok/s  concurrent tok/s  speedup")
        for n, r in results["concurrent"].items():
            print(f"{n:>7}  {r['sequential_tok_s']:>16}  {r['concurrent_tok_s']:>16}  {r['speedup']:>7}")
        for name, r in results["time_to_first_token"].items():
            print(f"time to first token, {name}: {r['seconds']} s ({r['cached_tokens']} cached tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
