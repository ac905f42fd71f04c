"""Prefill with the native elementwise MoE passes against torch's ops, on the real shapes.

The engine swaps two hooks into the language model on CPU (engine/native/fast.py): the gated MLPs' and
routed experts' `act` (silu(gate) * up in one native pass) and the routed experts' `combine` (the
weighted sum of each token's expert rows back in token order). Both make torch's roundings bit
for bit (tests/test_kernels.py), so this measures speed only: a 1024-token text prefill of the
real-shape synthetic checkpoints (tiny, and small at 4 of its 27 layers), with the hooks native
and with torch's plain functions, alternating in one process; medians of --repeat rounds.

    python benchmarks/bench_prefill_hooks.py [--families tiny,small:4] [--repeat 4]

Prints a table and one JSON line; writes benchmarks/results/prefill-hooks-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import dsvl2_cli  # noqa: E402
from dsvl2_cli import settings  # noqa: E402
from dsvl2_cli.dev import bench, bench_probes  # noqa: E402
from dsvl2_cli.model.moe import MLP, Experts, silu_gate  # noqa: E402


def measure(family: str, layers: int | None, tokens: int, repeat: int) -> dict:
    path = bench.ensure_checkpoint(settings.bench_dir(), family, layers)
    vlm = dsvl2_cli.load(path, dtype="bfloat16", device="cpu")
    bench_probes.warm_page_cache(path)
    modules = [m for m in vlm.model.language.modules() if isinstance(m, (MLP, Experts))]
    native = {id(m): (m.act, getattr(m, "combine", None)) for m in modules}

    def use(kind: str) -> None:
        for m in modules:
            act, combine = native[id(m)]
            m.act = act if kind == "native" else silu_gate
            if isinstance(m, Experts):
                m.combine = combine if kind == "native" else None

    embeds = vlm.embed_tokens(torch.tensor([bench.text_ids(vlm, tokens)]))

    def prefill(kind: str):
        def run():
            use(kind)
            vlm.forward(embeds, None, last_only=True)
        return run

    with torch.inference_mode():
        vlm.forward(embeds[:, :64], None, last_only=True)  # first touch of every mapped layer
        secs = bench_probes.interleaved({"native": prefill("native"), "torch": prefill("torch")}, repeat)
    use("native")
    return {"family": family, "layers": layers, "tokens": tokens, "native_s": secs["native"],
            "torch_s": secs["torch"], "native_over_torch": secs["native"] / secs["torch"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="tiny,small:4")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prefill-hooks-cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for spec in args.families.split(","):
        family, _, layers = spec.partition(":")
        rows.append(measure(family, int(layers) if layers else None, args.tokens, args.repeat))
        r = rows[-1]
        print(f"{spec:<8} {r['tokens']} tokens: native {r['native_s']:.2f} s, torch's ops {r['torch_s']:.2f} s "
              f"({r['native_over_torch']:.2f}x the time)", flush=True)
    report = {"machine": bench.machine_description(), "repeat": args.repeat, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
