"""Repeated work through a running `dsvl2 serve`: process start to first token of a CLI command
answered by the server, against the same command on a local model (with its prompt cache).

A user who asks many questions keeps one server running (`dsvl2 serve`) and points the commands
at it (`--server URL` or `DSVL2_SERVER`): the model is loaded once, the server's prompt cache
keeps the image, and a command answered by a server never imports torch. This script starts
`dsvl2 serve` on 127.0.0.1 (a free port) with the real-shape tiny checkpoint, asks once about
the photo (the server encodes it), then times fresh `dsvl2 chat photo "..." --server URL
--max-tokens 1 --json` processes (another question about the same photo) and the same command
run locally, interleaved, median of `--runs`. The server is stopped at the end.

    python benchmarks/bench_client_startup.py [--ckpt DIR] [--runs 3]

Writes benchmarks/results/client-startup-cpu.json. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dsvl2(*args: str) -> list[str]:
    return [sys.executable, "-m", "dsvl2_cli", *args]


def timed_chat(args: list[str], env: dict) -> dict:
    t = time.perf_counter()
    done = subprocess.run(dsvl2(*args), capture_output=True, text=True, env=env, timeout=600, check=False)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"dsvl2 {' '.join(args[:2])} exited {done.returncode}: {done.stderr.strip()[-400:]}")
    rec = json.loads(done.stdout.strip().splitlines()[-1])
    return {"process_s": wall, "ttft_s": rec["timings"]["time_to_first_token_s"],
            "cached_tokens": rec["usage"]["cached_tokens"]}


def main(argv=None) -> int:
    from dsvl2_cli import settings
    from dsvl2_cli.dev.bench import PHOTO, ensure_checkpoint, synthetic_image

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "client-startup-cpu.json")
    args = ap.parse_args(argv)

    ckpt = args.ckpt or ensure_checkpoint(settings.bench_dir(), "tiny", None)
    photo = settings.bench_dir() / "photo-640x480.png"
    if not photo.exists():
        synthetic_image(PHOTO).save(photo)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DSVL2_SERVER", None)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(dsvl2("serve", "-m", str(ckpt), "--host", "127.0.0.1", "--port", str(port)), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"dsvl2 serve exited: {server.stderr.read()[-400:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("dsvl2 serve did not come up within 300 s")
            time.sleep(0.5)
        common = ["chat", str(photo), "--max-tokens", "1", "--json"]
        first = timed_chat([*common[:2], "What is in this picture?", *common[2:], "--server", url], env)
        rows = {"server": [], "local": []}
        for i in range(args.runs):
            question = f"What colour is the sky in this picture, answer {i}?"
            rows["server"].append(timed_chat([*common[:2], question, *common[2:], "--server", url], env))
            rows["local"].append(timed_chat([*common[:2], question, *common[2:], "-m", str(ckpt)], env))
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[kind])

    report = {"checkpoint": str(ckpt), "runs": args.runs, "first_request_to_server": first, "samples": rows,
              "median": {kind: {key: med(kind, key) for key in ("process_s", "ttft_s", "cached_tokens")}
                         for kind in rows}}
    m = report["median"]
    print(f"{'':<34} {'process start to answer':>24} {'TTFT reported':>14} {'cached tokens':>14}")
    print(f"{'first question (server encodes)':<34} {first['process_s']:>22.2f} s {first['ttft_s']:>12.2f} s "
          f"{first['cached_tokens']:>14}")
    for kind, label in (("server", "same photo, --server (warm)"), ("local", "same photo, local + prompt cache")):
        row = m[kind]
        print(f"{label:<34} {row['process_s']:>22.2f} s {row['ttft_s']:>12.2f} s {row['cached_tokens']:>14.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["median"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
