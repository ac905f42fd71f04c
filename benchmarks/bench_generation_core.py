"""The generation core against an earlier revision's generation loop, in one process, interleaved.

Loads `dsvl2_cli/engine/generate.py` as it was at --base (default 9f1af16, before the one
generation core) as a module beside the package (its relative imports reach today's cache,
events, processor and runtime, which it was written against), and times both `stream_generate`s
on the same loaded model, in alternating rounds:
- decode: the median gap between consecutive tokens of a short text prompt's answer;
- prefill: from the call to the `Prefilled` event, for a text prompt of --prefill-tokens tokens;
- the loop alone: a decode step with the model's forward pass replaced by a constant.
Both sides compute the same tokens (checked).

    python benchmarks/bench_generation_core.py [--family tiny] [--layers N] [--rounds 15]

Prints a table and writes benchmarks/results/generation-core-cpu.json.
"""

from __future__ import annotations

import argparse
import importlib.util
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

import dsvl2_cli  # noqa: E402
from dsvl2_cli import settings  # noqa: E402
from dsvl2_cli.dev import bench, bench_probes  # noqa: E402
from dsvl2_cli.engine.events import Done, GenerationConfig, Prefilled, Token  # noqa: E402
from dsvl2_cli.engine.generate import stream_generate  # noqa: E402
from dsvl2_cli.engine.prompt.processor import Prepared  # noqa: E402


# modules 9f1af16's generate.py and batching.py import, where they are now
MOVED = {"processor": "prompt.processor", "sampling": "generate.sampling", "tokenizer": "prompt.tokenizer"}


def load_base(rev: str, path: str = "dsvl2_cli/engine/generate.py", name: str = "_generate_base"):
    """`path` at `rev` as the module dsvl2_cli.engine.<name> (relative imports as the original's;
    the modules it imports that have moved since are found under their old names)."""
    for old, new in MOVED.items():
        sys.modules.setdefault(f"dsvl2_cli.engine.{old}", importlib.import_module(f"dsvl2_cli.engine.{new}"))
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True,
                            text=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(f"dsvl2_cli.engine.{name}", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def text_prompt(vlm, n: int) -> Prepared:
    ids = torch.tensor(bench.text_ids(vlm, n))
    return Prepared(input_ids=ids, image_mask=torch.zeros_like(ids, dtype=torch.bool), images=[])


def decode_gaps(run, vlm, prepared, tokens: int) -> tuple[list[float], tuple[int, ...]]:
    times, ids = [], ()
    for event in run(vlm, prepared, GenerationConfig(max_tokens=tokens)):
        if isinstance(event, Token) and event.id is not None:
            times.append(time.perf_counter())
        elif isinstance(event, Done):
            ids = event.token_ids
    return [b - a for a, b in zip(times, times[1:])], ids


def prefill_seconds(run, vlm, prepared) -> float:
    t = time.perf_counter()
    events = run(vlm, prepared, GenerationConfig(max_tokens=1))
    for event in events:
        if isinstance(event, Prefilled):
            seconds = time.perf_counter() - t
            events.close()
            return seconds
    raise AssertionError("no Prefilled event")


def loop_overhead(sides: dict, vlm, prepared, tokens: int, rounds: int) -> dict:
    """Seconds per decode step of each loop with the model's forward pass replaced by a constant
    (no compute): what the loop itself costs, free of the machine's bandwidth noise."""
    vocab = vlm.config.language.vocab_size
    logits = torch.zeros(1, 1, vocab)
    logits[0, 0, 100] = 1.0  # greedy picks an ordinary token, never eos: every run is `tokens` long
    real = vlm.forward
    vlm.forward = lambda embeds, cache=None, last_only=False: logits.expand(embeds.shape[0], 1, vocab)
    try:
        times = {k: [] for k in sides}
        for i in range(rounds + 1):
            for name, run in sides.items():
                gaps, _ = decode_gaps(run, vlm, prepared, tokens)
                if i:
                    times[name].append(statistics.median(gaps))
    finally:
        vlm.forward = real
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="9f1af16")
    parser.add_argument("--family", default="tiny")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--decode-tokens", type=int, default=24)
    parser.add_argument("--prefill-tokens", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/generation-core-cpu.json")
    args = parser.parse_args(argv)

    base = load_base(args.base)
    path = bench.ensure_checkpoint(settings.bench_dir(), args.family, args.layers)
    vlm = dsvl2_cli.load(path, dtype="bfloat16", device="cpu")
    short, long = text_prompt(vlm, 24), text_prompt(vlm, args.prefill_tokens)
    sides = {"base": base.stream_generate, "new": stream_generate}
    decode = {k: [] for k in sides}
    prefill = {k: [] for k in sides}
    ids = {}
    prefill_seconds(stream_generate, vlm, long)  # warm: every mapped page touched, kernels built
    for i in range(args.rounds + 1):
        for name, run in (sides.items() if i % 2 else reversed(list(sides.items()))):
            gaps, ids[name] = decode_gaps(run, vlm, short, args.decode_tokens)
            seconds = prefill_seconds(run, vlm, long)
            if i:  # round 0 warms up
                decode[name].append(statistics.median(gaps))
                prefill[name].append(seconds)
    assert ids["base"] == ids["new"], "the two loops chose different tokens"
    overhead = loop_overhead(sides, vlm, short, 200, 5)
    med = {k: {"decode_step_s": statistics.median(decode[k]), "prefill_s": statistics.median(prefill[k])}
           for k in sides}
    result = {
        "machine": bench.machine_description(), "checkpoint": str(path), "base": args.base,
        "rounds": args.rounds, "decode_tokens": args.decode_tokens, "prefill_tokens": args.prefill_tokens,
        "medians": med,
        # the machine's bandwidth drifts between rounds: each round's new/base pair is compared
        "decode_new_over_base": statistics.median(n / b for n, b in zip(decode["new"], decode["base"])),
        "prefill_new_over_base": statistics.median(n / b for n, b in zip(prefill["new"], prefill["base"])),
        "loop_overhead_s_per_step": overhead,
        "rounds_s": {"decode": decode, "prefill": prefill},
        "bandwidth_probe_gb_s": bench_probes.BandwidthProbe().gb_s(),
    }
    print(f"medians of {args.rounds} rounds; new/base: the median of each round's ratio")
    print(f"{'':12s} {'base ' + args.base:>16s} {'new':>12s} {'new/base':>9s}")
    print(f"{'decode step':12s} {med['base']['decode_step_s'] * 1e3:13.1f} ms {med['new']['decode_step_s'] * 1e3:9.1f} ms "
          f"{result['decode_new_over_base']:9.3f}")
    print(f"{'prefill':12s} {med['base']['prefill_s']:14.3f} s {med['new']['prefill_s']:10.3f} s "
          f"{result['prefill_new_over_base']:9.3f}")
    print(f"{'loop alone':12s} {overhead['base'] * 1e6:13.0f} us {overhead['new'] * 1e6:9.0f} us "
          f"{overhead['new'] / overhead['base']:9.3f}   (the forward pass replaced by a constant)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
