"""One load of a model on CPU in this (fresh) process: its time and peak RSS, as README's
"Quantized experts" reports them for the copied and the memory-mapped paths.

    python benchmarks/bench_load.py ~/.cache/dsvl2/bench/tiny int4          # mapped (default)
    DSVL2_MMAP=0 python benchmarks/bench_load.py ~/.cache/dsvl2/bench/tiny int4

The first mapped load of a model writes its layout under DSVL2_MMAP_DIR (default
<cache>/mapped); run it twice to time a mapped load. Read the files once first (`cat FILES >
/dev/null`) so that the time is that of a warm page cache.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    import torch

    from dsvl2_cli.engine.runtime import load_model
    from dsvl2_cli.model.config import ModelConfig

    folder = Path(argv[0]).expanduser()
    method = argv[1] if len(argv) > 1 and argv[1] != "none" else None
    t1 = time.perf_counter()
    load_model(folder, ModelConfig.from_dir(folder), torch.bfloat16, torch.device("cpu"), quantize=method)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(f"DSVL2_MMAP={os.environ.get('DSVL2_MMAP', '1')} quantize={method}: load {t2 - t1:.2f} s "
          f"(process {t2 - t0:.2f} s), peak RSS {peak / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
