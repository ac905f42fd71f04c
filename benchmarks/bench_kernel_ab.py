"""The decode GEMV of two versions of csrc/cpu_kernels.c, in one process: a kernel change's A/B.

Compiles the file as it is at git revision --base (default HEAD) and as it is in the working tree
(or at --head REV) with the flags the runtime uses (kernel_build._flags("native")), loads both, checks
that they agree (bf16 outputs within one rounding of each other's scale), then times
`dsvl2_gemv_bf16` on 1 GiB of bf16 weights (12 matrices of 32768 x 1280, far beyond the caches)
for each row count, the two versions in turns (--repeat rounds, medians), against the native
streaming-read probe of the same moment. Prints a table and writes
benchmarks/results/kernel-ab-cpu.json (--out to change).

    python benchmarks/bench_kernel_ab.py [--base HEAD] [--head REV] [--rows 1,4] [--repeat 9]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dsvl2_cli.dev import bench  # noqa: E402
from dsvl2_cli.dev.bench_probes import BANDWIDTH_BYTES, BandwidthProbe  # noqa: E402
from dsvl2_cli.engine.native import kernel_build, kernels  # noqa: E402

SOURCE = "dsvl2_cli/csrc/cpu_kernels.c"
N, K, MATRICES = 32768, 1280, 12


def source_at(rev: str | None) -> str:
    if rev is None:
        return (ROOT / SOURCE).read_text()
    return subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{SOURCE}"], check=True, capture_output=True,
                          text=True).stdout


def build(text: str, out: Path) -> ctypes.CDLL:
    src = out.with_suffix(".c")
    src.write_text(text)
    subprocess.run([*kernel_build._compiler(), *kernel_build._flags("native"), str(src), "-o", str(out), "-lm"],
                   check=True)
    return ctypes.CDLL(str(out))


def gemv(lib, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, threads: int) -> None:
    m = x.shape[0]
    lib.dsvl2_gemv_bf16(ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(K), ctypes.c_int64(m),
                        ctypes.c_void_p(w.data_ptr()), ctypes.c_int64(N), ctypes.c_int64(K),
                        ctypes.c_void_p(y.data_ptr()), ctypes.c_int64(N), 0, threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD")
    ap.add_argument("--head", default=None, help="a revision (default: the working tree)")
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernel-ab-cpu.json")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    names = {"base": args.base, "head": args.head or "working tree"}
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"base": build(source_at(args.base), Path(tmp) / "base.so"),
                "head": build(source_at(args.head), Path(tmp) / "head.so")}
        g = torch.Generator().manual_seed(0)
        ws = [torch.randn(N, K, generator=g).bfloat16() for _ in range(MATRICES)]
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        probe = BandwidthProbe(BANDWIDTH_BYTES, repeat=3)
        result = {"benchmark": "dsvl2_gemv_bf16, two versions of cpu_kernels.c", "versions": names,
                  "threads": threads, "kernels": kernels.status(), "weights_bytes": nbytes, "repeat": args.repeat,
                  "machine": bench.machine_description(), "rows": {}}
        print(f"threads {threads}, {kernels.status()}; base {names['base']}, head {names['head']}; "
              f"{nbytes / 2**30:.0f} GiB of weights; medians of {args.repeat} rounds in turns")
        print(f"{'rows':>4} {'base GB/s':>10} {'head GB/s':>10} {'head/base':>10} {'probe GB/s':>11} {'max diff':>9}")
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, K, generator=g).bfloat16()
            outs = {}
            for name, lib in libs.items():
                y = torch.empty(m, N, dtype=torch.bfloat16)
                gemv(lib, x, ws[0], y, threads)
                outs[name] = y.float()
            scale = outs["base"].abs().max().item()
            diff = (outs["base"] - outs["head"]).abs().max().item()
            if diff > scale * 2.0**-7:  # two bf16 roundings of the largest output
                sys.exit(f"rows {m}: the versions disagree ({diff} against outputs up to {scale})")
            times = {name: [] for name in libs}
            probes = [probe.gb_s()]
            for _ in range(args.repeat):
                for name, lib in libs.items():
                    y = torch.empty(m, N, dtype=torch.bfloat16)
                    start = time.perf_counter()
                    for w in ws:
                        gemv(lib, x, w, y, threads)
                    times[name].append(time.perf_counter() - start)
            probes.append(probe.gb_s())
            rate = {name: nbytes / statistics.median(ts) / 1e9 for name, ts in times.items()}
            result["rows"][m] = {"base_gb_s": rate["base"], "head_gb_s": rate["head"],
                                 "ratio": rate["head"] / rate["base"], "probe_gb_s": probes, "max_diff": diff}
            print(f"{m:4} {rate['base']:10.1f} {rate['head']:10.1f} {rate['head'] / rate['base']:9.2f}x "
                  f"{max(probes):11.1f} {diff:9.2g}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
