"""Decode against the bandwidth floor of its moment, sampled over minutes to see both phases.

This machine's memory bandwidth moves between ~30 and ~60 GB/s for minutes at a time (other
tenants), so one `dsvl2 bench` run sees one phase. This script keeps sampling: each sample is a
native streaming-read probe, `--steps` decode steps of the real-shape checkpoint at a short
context, and a second probe; the sample's floor is the faster probe's bandwidth over the bytes a
step reads (as `dsvl2 bench`). Samples are grouped by phase (probe below `--slow-below` GB/s:
slow; above `--fast-above`: fast; between: mixed) and each group reports its median fraction of
the floor. A fraction over 100% would mean the floor is wrong, and is reported as such.

    python benchmarks/bench_decode_phases.py [--ckpt DIR] [--minutes 6] [--pause 10]

Writes benchmarks/results/decode-phases-cpu.json. Run it on a quiet machine (one process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def sample_phase(probes: dict, slow_below: float, fast_above: float) -> str:
    """"slow" or "fast" when both probes say so, else "mixed" (the phase changed, or in between)."""
    if max(probes.values()) < slow_below:
        return "slow"
    return "fast" if min(probes.values()) > fast_above else "mixed"


def main(argv=None) -> int:
    import torch

    import dsvl2_cli
    from dsvl2_cli import settings
    from dsvl2_cli.dev import bench
    from dsvl2_cli.dev.bench_probes import BandwidthProbe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=None, help="real-shape checkpoint (default: the bench's tiny)")
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--pause", type=float, default=10.0, help="seconds idle between samples")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--context", type=int, default=10)
    ap.add_argument("--slow-below", type=float, default=40.0)
    ap.add_argument("--fast-above", type=float, default=45.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode-phases-cpu.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    path = args.ckpt or bench.ensure_checkpoint(settings.bench_dir(), "tiny", None)
    vlm = dsvl2_cli.load(path, dtype="bfloat16", device="cpu")
    probe = BandwidthProbe()
    ids = bench.text_ids(vlm, args.context)
    step_bytes = bench.lm_decode_bytes(vlm.config, args.context)
    samples, end = [], time.monotonic() + args.minutes * 60
    while time.monotonic() < end:
        step_s, _, probes = bench.decode_rate(vlm, ids, args.steps, probe)
        floor_gb_s = max(probes.values())
        fraction = step_bytes / step_s / 1e9 / floor_gb_s
        samples.append({"at_s": round(args.minutes * 60 - (end - time.monotonic()), 1), "ms_per_token": step_s * 1e3,
                        "probe_gb_s": probes, "fraction_of_floor": fraction,
                        "phase": sample_phase(probes, args.slow_below, args.fast_above)})
        s = samples[-1]
        print(f"{s['at_s']:7.1f} s  {s['ms_per_token']:6.1f} ms/token  probes {probes['before']:5.1f}/"
              f"{probes['after']:5.1f} GB/s  {fraction:6.1%} of floor  {s['phase']}", flush=True)
        time.sleep(args.pause)

    groups = {}
    for name in ("slow", "fast", "mixed"):
        group = [s for s in samples if s["phase"] == name]
        if group:
            groups[name] = {"samples": len(group),
                            "median_fraction_of_floor": statistics.median(s["fraction_of_floor"] for s in group),
                            "median_ms_per_token": statistics.median(s["ms_per_token"] for s in group),
                            "median_probe_gb_s": statistics.median(max(s["probe_gb_s"].values()) for s in group),
                            "floor_wrong": any(s["fraction_of_floor"] > 1.0 for s in group)}
    print(f"\n{'phase':<6} {'samples':>7} {'probe GB/s':>10} {'ms/token':>9} {'of floor':>9}  goal >= 70%")
    for name, g in groups.items():
        verdict = "floor wrong" if g["floor_wrong"] else "met" if g["median_fraction_of_floor"] >= 0.7 else "NOT MET"
        print(f"{name:<6} {g['samples']:>7} {g['median_probe_gb_s']:>10.1f} {g['median_ms_per_token']:>9.1f} "
              f"{g['median_fraction_of_floor']:>9.1%}  {verdict}")
    report = {"checkpoint": str(path), "context": args.context, "steps": args.steps, "bytes_per_step": step_bytes,
              "thresholds_gb_s": {"slow_below": args.slow_below, "fast_above": args.fast_above},
              "machine": bench.machine_description(), "groups": groups, "samples": samples}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"groups": groups}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
