"""Out of memory while running: a one-line message for torch's and Python's out-of-memory errors
(RAM or GPU memory, and what to do about it); exits.py shows it instead of a traceback."""

from __future__ import annotations

import re

import torch

_RAM_PATTERNS = (re.compile(r"unable to mmap.*Cannot allocate memory", re.IGNORECASE | re.DOTALL),
                 re.compile(r"DefaultCPUAllocator: (can't|not enough memory)", re.IGNORECASE),
                 re.compile(r"\[enforce fail at alloc_cpu", re.IGNORECASE))
_GPU_PATTERNS = (re.compile(r"CUDA out of memory", re.IGNORECASE),
                 re.compile(r"CUDA error: out of memory", re.IGNORECASE),
                 re.compile(r"MPS backend out of memory", re.IGNORECASE))
_ADVICE = "use --quantize int4, a smaller model, fewer or smaller images, or a shorter conversation"


def describe_oom(err: BaseException) -> str | None:
    """A one-line message for an out-of-memory error from torch or Python (RAM or GPU memory, and
    what to do); None for any other error. Follows __cause__ / __context__."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
        if (oom_type is not None and isinstance(err, oom_type)) or any(p.search(text) for p in _GPU_PATTERNS):
            where = "MPS" if "MPS" in text else "GPU"
            return (f"out of {where} memory while running the model; {_ADVICE}, "
                    f"or --device cpu if the machine has the RAM")
        if isinstance(err, MemoryError) or any(p.search(text) for p in _RAM_PATTERNS):
            return f"out of memory (RAM) while running the model; {_ADVICE}"
        err = err.__cause__ or err.__context__
    return None
