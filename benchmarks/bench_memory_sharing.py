"""Private memory while generating, and two processes sharing one model's pages (CPU).

Issue 14's goal: with the weights memory-mapped, the memory a process holds of its own
(anonymous: heap, activations, the cache; not file-backed) while it generates is at most 10% of
the weight bytes plus the cache, and a second process on the same model shares the weight pages
instead of holding another copy.

Two worker processes (this script with --worker) each load the real-shape tiny checkpoint (bf16,
memory-mapped: the default), answer a question about a 640x480 photo (5 tiles, 1037 prompt
tokens) and, half-way through the answer, read their own /proc/self/smaps_rollup: RssAnon (the
private memory: nothing writes into the mapped weights, so their pages stay clean and shared),
RssFile, Pss_File (file pages divided among the processes mapping them), Shared_Clean. Worker A
then waits while worker B does the same; A reads its figures again with B alive. Shared pages show
as B's Shared_Clean ~ its RssFile, and A's Pss_File dropping to about half.

    python benchmarks/bench_memory_sharing.py [--ckpt DIR] [--tokens 16]

Prints a table (GB = 1e9 bytes) and writes benchmarks/results/memory-sharing-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIELDS = ("Rss", "Pss_File", "Pss_Anon", "Shared_Clean", "Private_Clean", "Private_Dirty", "Anonymous")


def memory(pid: int | str = "self") -> dict:
    """The fields of /proc/PID/smaps_rollup we report, in bytes, and RssAnon / RssFile from status."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in FIELDS:
            out[key] = int(rest.split()[0]) * 1024
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def worker(ckpt: Path, tokens: int) -> int:
    import torch

    import dsvl2_cli
    from dsvl2_cli.dev.bench import PHOTO, synthetic_image
    from dsvl2_cli.engine.generate import GenerationConfig, Token, stream_generate
    from dsvl2_cli.engine.prompt.processor import user_message

    torch.set_num_threads(2)
    vlm = dsvl2_cli.load(ckpt, dtype="bfloat16", device="cpu")
    weight_bytes = sum(p.numel() * p.element_size() for p in vlm.model.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in vlm.model.buffers())
    prepared = vlm.prepare([user_message("What is in this picture?", [synthetic_image(PHOTO)])])
    lm = vlm.config.language
    per_position = lm.num_hidden_layers * lm.cache_values_per_token() * 2  # bf16 cache bytes per position
    seen = 0
    report = None
    for event in stream_generate(vlm, prepared, GenerationConfig(max_tokens=tokens)):
        if isinstance(event, Token) and event.id is not None:
            seen += 1
            # half-way: while generating, with the cache and the decode state alive
            if seen == max(1, tokens // 2) and report is None:
                positions = len(prepared.input_ids) + seen
                report = {"weight_bytes": weight_bytes, "positions": positions,
                          "cache_bytes": positions * per_position, "memory": memory()}
    if report is None:
        raise SystemExit(f"the answer ended after {seen} tokens, before the half-way reading")
    print(json.dumps(report), flush=True)
    sys.stdin.readline()  # hold the model until the parent has looked (and the other worker ran)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory-sharing-cpu.json")
    args = ap.parse_args(argv)
    if args.ckpt is None:
        from dsvl2_cli import settings
        from dsvl2_cli.dev import bench

        args.ckpt = bench.ensure_checkpoint(settings.bench_dir(), "tiny", None)
    if args.worker:
        return worker(args.ckpt, args.tokens)

    cmd = [sys.executable, __file__, "--worker", "--ckpt", str(args.ckpt), "--tokens", str(args.tokens)]
    procs = []
    try:
        a = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(a)
        first = json.loads(a.stdout.readline())
        b = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(b)
        second = json.loads(b.stdout.readline())
        first_with_second = memory(a.pid)
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
            p.wait(timeout=60)

    weights, cache = first["weight_bytes"], first["cache_bytes"]
    budget = 0.10 * weights + cache
    private = first["memory"]["RssAnon"]
    rows = [
        ("weights (bytes of every parameter and buffer)", weights),
        (f"cache at {first['positions']} positions", cache),
        ("A: private (RssAnon) while generating", private),
        ("A: file-backed (RssFile)", first["memory"]["RssFile"]),
        ("A: Pss_File alone", first["memory"]["Pss_File"]),
        ("A: Pss_File with B alive", first_with_second["Pss_File"]),
        ("B: private (RssAnon) while generating", second["memory"]["RssAnon"]),
        ("B: file-backed (RssFile)", second["memory"]["RssFile"]),
        ("B: Shared_Clean", second["memory"]["Shared_Clean"]),
    ]
    for label, value in rows:
        print(f"{label:<48} {value / 1e9:8.3f} GB")
    shared = second["memory"]["Shared_Clean"] / max(1, second["memory"]["RssFile"])
    verdict = {
        "private_goal": "RssAnon while generating <= 10% of the weight bytes + the cache",
        "private_budget_bytes": budget,
        "private_met": private <= budget and second["memory"]["RssAnon"] <= budget,
        "b_shared_fraction_of_file_pages": shared,
        "a_pss_file_ratio_with_b": first_with_second["Pss_File"] / max(1, first["memory"]["Pss_File"]),
    }
    print(f"private {private / 1e9:.3f} GB against a budget of {budget / 1e9:.3f} GB: "
          f"{'met' if verdict['private_met'] else 'NOT MET'}; B shares {shared:.0%} of its file pages; "
          f"A's Pss_File x{verdict['a_pss_file_ratio_with_b']:.2f} with B alive")
    from dsvl2_cli.dev.bench import machine_description

    report = {"checkpoint": str(args.ckpt), "tokens": args.tokens, "machine": machine_description(),
              "a": first, "a_with_b_alive": first_with_second, "b": second, "verdict": verdict}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
