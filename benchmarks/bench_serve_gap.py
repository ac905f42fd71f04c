"""How long a running stream waits while the server takes in another client's image prompt.

Client A streams a text answer; after its 5th token client B sends the photo (640x480: 5 tiles,
1037 prompt positions). Measured: A's longest gap between two tokens while B is prefilled, and B's
time to `Prefilled`, for the server engine of --base (default 9f1af16: it prefilled a new request
whole before the next decode step) and today's scheduler (one prefill unit, a tile or a prompt
chunk, per decode step). For scale: one tile through the vision tower, one prompt chunk of 1024
positions, and one decode step, timed alone. Both engines run in this process on the same model,
in alternating rounds.

    python benchmarks/bench_serve_gap.py [--family tiny] [--layers N] [--rounds 2]

Prints a table and writes benchmarks/results/serve-gap-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import dsvl2_cli  # noqa: E402
from bench_generation_core import load_base, text_prompt  # noqa: E402
from dsvl2_cli import settings  # noqa: E402
from dsvl2_cli.dev import bench  # noqa: E402
from dsvl2_cli.engine.events import Done, GenerationConfig, Prefilled, Token  # noqa: E402
from dsvl2_cli.engine.generate.scheduler import BatchEngine  # noqa: E402
from dsvl2_cli.engine.prompt.messages import user_message  # noqa: E402


def base_engine_class(rev: str):
    """engine/batching.py's BatchEngine at `rev`, over that revision's generate.py."""
    load_base(rev)
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:dsvl2_cli/engine/batching.py"], check=True,
                            capture_output=True, text=True).stdout
    source = source.replace("from .generate import", "from ._generate_base import")
    module = type(sys)("dsvl2_cli.engine._batching_base")
    module.__package__ = "dsvl2_cli.engine"
    sys.modules[module.__name__] = module
    exec(compile(source, f"{rev}:dsvl2_cli/engine/batching.py", "exec"), module.__dict__)
    return module.BatchEngine


def one_run(engine, vlm, running, photo, tokens: int) -> dict:
    """A streams `running`; after its 5th token B sends `photo`; A's gaps while B is prefilled."""
    stamps, b_sent, b_ready = [], [], []

    def client_b():
        b_sent.append(time.perf_counter())
        for event in engine.stream(photo, GenerationConfig(max_tokens=2), timeout=600):
            if isinstance(event, Prefilled):
                b_ready.append(time.perf_counter())

    b = threading.Thread(target=client_b)
    for event in engine.stream(running, GenerationConfig(max_tokens=tokens), timeout=600):
        if isinstance(event, Token) and event.id is not None:
            stamps.append(time.perf_counter())
            if len(stamps) == 5:
                b.start()
        if isinstance(event, Done) or (b_ready and stamps[-1] > b_ready[0] + 1.0):
            break
    b.join()
    during = [t2 - t1 for t1, t2 in zip(stamps, stamps[1:]) if t2 > b_sent[0] and t1 < b_ready[0]]
    before = [t2 - t1 for t1, t2 in zip(stamps, stamps[1:]) if t2 < b_sent[0]]
    return {"longest_gap_s": max(during), "tokens_during": len(during), "b_prefill_s": b_ready[0] - b_sent[0],
            "step_before_s": statistics.median(before)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="9f1af16")
    parser.add_argument("--family", default="tiny")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve-gap-cpu.json")
    args = parser.parse_args(argv)

    path = bench.ensure_checkpoint(settings.bench_dir(), args.family, args.layers)
    vlm = dsvl2_cli.load(path, dtype="bfloat16", device="cpu")
    running = text_prompt(vlm, 40)
    img = bench.synthetic_image((640, 480))
    engines = {"base": base_engine_class(args.base), "new": BatchEngine}
    runs = {k: [] for k in engines}
    for i in range(args.rounds):
        for name, cls in (engines.items() if i % 2 == 0 else reversed(list(engines.items()))):
            engine = cls(vlm, cache_bytes=0)  # no pool: every round encodes the photo anew
            try:
                photo = vlm.prepare([user_message(f"Describe this picture ({name} {i}).", [img])])
                runs[name].append(one_run(engine, vlm, running, photo, args.tokens))
            finally:
                engine.close()

    with torch.inference_mode():  # the units of work, alone
        photo = vlm.prepare([user_message("Describe this picture.", [img])])
        tile = photo.images[0].pixel_values[:1]
        vlm.model.encode_tiles(tile)
        t = time.perf_counter()
        vlm.model.encode_tiles(tile)
        tile_s = time.perf_counter() - t
        embeds = vlm.embed_tokens(text_prompt(vlm, 1024).input_ids[None])
        t = time.perf_counter()
        vlm.forward(embeds, vlm.new_cache(1), last_only=True)
        chunk_s = time.perf_counter() - t

    med = {k: {key: statistics.median(r[key] for r in v) for key in v[0]} for k, v in runs.items()}
    result = {"machine": bench.machine_description(), "checkpoint": str(path), "base": args.base,
              "photo_prompt_tokens": int(photo.input_ids.numel()), "tiles": int(photo.images[0].pixel_values.shape[0]),
              "one_tile_s": tile_s, "one_chunk_1024_s": chunk_s, "medians": med, "runs": runs}
    print(f"photo: {result['tiles']} tiles, {result['photo_prompt_tokens']} positions; one tile {tile_s:.2f} s, "
          f"one 1024-position chunk {chunk_s:.2f} s")
    print(f"{'':8s} {'longest gap':>12s} {'tokens during':>14s} {'B prefill':>10s} {'step before':>12s}")
    for name, m in med.items():
        print(f"{name:8s} {m['longest_gap_s']:10.2f} s {m['tokens_during']:14.0f} {m['b_prefill_s']:8.2f} s "
              f"{m['step_before_s'] * 1e3:9.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
