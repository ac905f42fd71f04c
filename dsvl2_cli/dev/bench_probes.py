"""The benchmark's ceilings and its process-level rows.

Ceilings: this machine's memory read bandwidth moves between ~30 and ~60 GB/s for minutes at a
time (a shared host), so one figure measured at the start cannot be the floor of a decode
measured minutes later. `BandwidthProbe` streams a buffer far larger than the caches with the
native kernels' own loads (`kernels.stream_read`) and is run right before and right after each
decode measurement; `matmul_rate` does the same for the compute-bound rows.

Process rows (what a user feels, each in a fresh `python -m dsvl2_cli` subprocess): `--help`
startup, load with the checkpoint in the page cache, and process start to first token.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..engine.native import kernels

BANDWIDTH_BYTES = 1 << 30  # far larger than any L3 (32-96 MiB here): every read comes from DRAM
QUICK_BANDWIDTH_BYTES = 64 << 20


def best_time(fn, repeat: int) -> float:
    """The fastest of `repeat` runs: a ceiling is the rate the machine can reach, and every
    disturbance (another process, an interrupt) only makes a run slower."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class BandwidthProbe:
    """Memory read bandwidth, from a buffer allocated (and touched) once and re-read per probe.

    The buffer stays resident for the whole run, so its bytes are part of every peak RSS the
    benchmark reads afterwards: `nbytes` is what the caller subtracts."""

    def __init__(self, nbytes: int = BANDWIDTH_BYTES, repeat: int = 5):
        self.buf = torch.ones(nbytes // 4, dtype=torch.float32)  # ones: every page written, so resident
        self.nbytes = self.buf.numel() * 4
        self.repeat = repeat
        self.native = kernels.stream_read(self.buf[:1024]) is not None
        self.method = ("native streaming read (dsvl2_stream_read, " + kernels.status() + ")" if self.native
                       else "torch sum() (no native kernels here)")
        self.gb_s()  # first pass: page-table and TLB warm-up, not timed

    def gb_s(self) -> float:
        read = (lambda: kernels.stream_read(self.buf)) if self.native else self.buf.sum
        return self.nbytes / best_time(read, self.repeat) / 1e9

    def torch_sum_gb_s(self) -> float:
        """The old ceiling, kept in the report to show why it was replaced."""
        self.buf.sum()
        return self.nbytes / best_time(self.buf.sum, self.repeat) / 1e9


def interleaved(fns: dict, repeat: int) -> dict:
    """Median seconds of each function, run in turns (one warm-up round first): the benchmark
    scripts' A/B rows, so that a change in the machine's speed hits every side alike."""
    times = {name: [] for name in fns}
    for i in range(repeat + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_dtype() -> str:
    """The dtype a bf16 model's prefill products run in on this CPU (engine/native/f32_products.py)."""
    from ..engine.native import f32_products

    return "float32" if f32_products.wanted(torch.bfloat16, torch.device("cpu")) else "bfloat16"


def matmul_rate(quick: bool) -> float:
    """GEMM GFLOP/s at a prefill-like shape (best of a few), as a bf16 model's prefill runs its
    products here: bf16, or float32 where the CPU lacks bf16 dot products (f32_products.py; its
    bf16 rate would be a floor far below what the model reaches)."""
    dtype = getattr(torch, matmul_dtype())
    m, k, n = (512, 2048, 2048) if quick else (2048, 4096, 4096)
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    a @ b
    return 2 * m * k * n / best_time(lambda: a @ b, 3 if quick else 5) / 1e9


# ------------------------------------------------------------------ process-level rows

def _env() -> dict:
    """The subprocess imports this same dsvl2_cli (a worktree may differ from the installed one)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    return env


def _run(args: list[str], timeout: float = 600) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(), timeout=timeout,
                          check=False)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{' '.join(args[:3])} exited with {done.returncode}: {tail[0][:300]}")
    return wall, done


def help_startup(runs: int = 5) -> dict:
    """Wall time of `python -m dsvl2_cli --help`, median of `runs` fresh processes (the first one
    included: its .pyc and the shared libraries are cached by earlier runs of the benchmark)."""
    times = sorted(_run(["-m", "dsvl2_cli", "--help"])[0] for _ in range(runs))
    return {"runs": runs, "median_s": times[len(times) // 2], "min_s": times[0], "max_s": times[-1]}


def loaded_files(path: Path) -> list[Path]:
    """The files a bf16 CPU load of `path` reads its weights from: the mapped layout when there is
    one (engine/loading/mapped.py; the checkpoint's own files are then read only for their headers),
    else the checkpoint's files."""
    from ..engine.loading import mapped

    data, record = mapped.entry_paths(path, torch.bfloat16)
    if data.is_file() and record.is_file():
        return [data]
    return sorted(f for f in path.iterdir() if f.is_file())


def warm_page_cache(path: Path) -> float:
    """Read once every file a load of `path` reads (loaded_files), so that the rows after it see
    them in the page cache; returns the seconds taken (a few GB/s or more means they already
    were). Reading the checkpoint instead of its mapped layout would fill the page cache with the
    wrong 7 GB and push the layout out."""
    t = time.perf_counter()
    for f in loaded_files(path):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass
    return time.perf_counter() - t


_LOAD_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import dsvl2_cli.engine.runtime, dsvl2_cli.engine.loading.mapped, dsvl2_cli.engine.prompt.tokenizer
t2 = time.perf_counter()
dsvl2_cli.load(sys.argv[1], dtype="bfloat16", device="cpu")
t3, ready_at = time.perf_counter(), time.time()
dsvl2_cli.load(sys.argv[1], dtype="bfloat16", device="cpu")
t4 = time.perf_counter()
print(json.dumps({"torch_import_s": t1 - t0, "import_s": t2 - t0, "load_s": t3 - t2, "second_load_s": t4 - t3,
                  "ready_in_process_s": t3 - t0, "ready_at": ready_at}))
"""


def load_cached(path: Path, runs: int = 3) -> dict:
    """dsvl2_cli.load in fresh processes with the checkpoint in the page cache, the run of median
    start-to-ready time of `runs` (one run's figures, so its parts add up): the imports it needs (torch, then ours), the first load after them (what every CLI
    start pays), a second load in the same process, and the process's wall time from its start
    (the parent's clock before the spawn to the child's when the model is ready: the
    interpreter's start included, the exit not)."""
    warm_s = warm_page_cache(path)
    samples = []
    for _ in range(runs):
        spawned = time.time()
        _, done = _run(["-c", _LOAD_SCRIPT, str(path)])
        fields = json.loads(done.stdout.strip().splitlines()[-1])
        fields["ready_s"] = fields.pop("ready_at") - spawned
        samples.append(fields)
    samples.sort(key=lambda s: s["ready_s"])
    out = {"page_cache_read_s": warm_s, "runs": runs, **samples[len(samples) // 2],
           "ready_s_all": [s["ready_s"] for s in samples]}
    out["startup_overhead_s"] = out["ready_s"] - out["load_s"]  # all but the load: start + imports
    return out


@functools.cache
def _chat_options() -> str:
    """`dsvl2 chat --help` of the dsvl2 under test: which switches its process rows can use."""
    return _run(["-m", "dsvl2_cli", "chat", "--help"])[1].stdout


def cli_has_no_cache() -> bool:
    """Whether this dsvl2 has the prompt-cache switch (`chat --no-cache`) the warm row needs."""
    return "--no-cache" in _chat_options()


def _chat(path: Path, image: Path, question: str, extra: list[str]) -> dict:
    wall, done = _run(["-m", "dsvl2_cli", "chat", str(image), question, "--max-tokens", "1", "-m", str(path),
                       "--json", *extra])
    record = json.loads(done.stdout.strip().splitlines()[-1])
    return {"process_wall_s": wall, "ttft_s": record["timings"]["time_to_first_token_s"],
            "prompt_tokens": record["usage"]["prompt_tokens"], "cached_tokens": record["usage"]["cached_tokens"]}


def process_first_token(path: Path, image: Path, runs: int = 3) -> dict:
    """`dsvl2 chat IMG "question" --max-tokens 1 --json` in fresh processes.

    process_wall_s runs from spawning the process to its exit after the first (only) token:
    interpreter start, imports, load, image, prefill, one token, exit. "cold" is a fresh process
    with no prompt cache (`--no-cache` where it exists); the checkpoint is in the page cache (the
    benchmark read it just before; dropping the page cache needs root). "prompt_cache" is a later
    process with the same image and another question, after one run that filled the cache; it is
    recorded as not available where `chat --no-cache` does not exist yet. "cold_vision_int8" is
    the cold run with the opt-in int8 vision tower (`--vision-int8`), where it runs here. Cold
    runs are `runs` processes each, bf16 and int8 alternating; each row is the run of median
    time to first token (all of them in ttft_s_all): one cold run is at the mercy of the
    machine's other tenants."""
    warm_page_cache(path)
    has_cache = cli_has_no_cache()
    int8 = has_cache and int8_vision_here()
    question = "What is in this picture?"
    cold, cold_int8 = [], []
    for _ in range(runs):
        cold.append(_chat(path, image, question, ["--no-cache"] if has_cache else []))
        if int8:  # its own cache key: no reuse either way
            cold_int8.append(_chat(path, image, question, ["--no-cache", "--vision-int8"]))
    out = {"cold": _median_run(cold)}
    if int8:
        out["cold_vision_int8"] = _median_run(cold_int8)
    if not has_cache:
        out["prompt_cache"] = "not available (this dsvl2 has no chat --no-cache: no prompt cache across runs)"
        return out
    _chat(path, image, question, [])  # fills the prompt cache for this image
    out["prompt_cache"] = _chat(path, image, "Which colour is most common here?", [])
    return out


def _median_run(samples: list[dict]) -> dict:
    ordered = sorted(samples, key=lambda s: s["ttft_s"])
    return {**ordered[len(ordered) // 2], "ttft_s_all": [s["ttft_s"] for s in samples],
            "process_wall_s_all": [s["process_wall_s"] for s in samples]}


def int8_vision_here() -> bool:
    """Whether `chat --vision-int8` exists and would run int8 here (AVX512-VNNI kernels built)."""
    from ..engine.native import int8_kernels, kernels

    if not (kernels.available() and int8_kernels.int8_gemm_available()):
        return False
    return "--vision-int8" in _chat_options()
