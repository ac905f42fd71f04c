"""A strict, copy-free safetensors reader.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw little-endian tensor bytes. We read tensors with plain file reads
straight into their final memory (a freshly allocated tensor, or a slice of a stacked one), instead
of memory-mapping the file: with a map, every touched page of the file also counts as resident
while the copies exist, and loading a 6.7 GB checkpoint peaked at 10 GB. Every header value is
checked against the file before anything is read, so a truncated or corrupted file is an error
naming it, never a crash or an out-of-bounds read. Nothing here can execute code.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import WeightsError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 * 2**20  # the format's own limit for the JSON header


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, Entry]:
    """Parse and validate a safetensors header; names -> entries (no tensor data read)."""
    def bad(why: str) -> WeightsError:
        return WeightsError(f"{path}: not a readable safetensors file ({why}); re-download it")

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad("shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER or 8 + length > size:
                raise bad(f"header length {length} does not fit in the file of {size} bytes")
            raw = f.read(length)
    except OSError as err:
        raise WeightsError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    base, data_size = 8 + length, size - 8 - length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            valid = (dtype in DTYPES and all(isinstance(d, int) and d >= 0 for d in shape)
                     and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size)
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise bad(f"tensor {name} has an invalid entry or points outside the file")
        nbytes = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
        if nbytes != end - begin:
            raise bad(f"tensor {name}: {end - begin} bytes for shape {list(shape)} of {dtype}")
        entries[name] = Entry(path, dtype, shape, base + begin, nbytes)
    return entries


class Reader:
    """Reads tensors by name from checked entries, keeping the files open."""

    def __init__(self, entries: dict[str, Entry]):
        self.entries = entries
        self._files: dict[Path, int] = {}

    def _fd(self, path: Path) -> int:
        if path not in self._files:
            self._files[path] = os.open(path, os.O_RDONLY)
        return self._files[path]

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor `name` into `out` (contiguous, same number of bytes and dtype)."""
        e = self.entries[name]
        if out.dtype != DTYPES[e.dtype] or not out.is_contiguous() or out.numel() * out.element_size() != e.nbytes:
            raise WeightsError(f"{e.file}: tensor {name} ({e.dtype} {list(e.shape)}) does not fit the target")
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if e.nbytes else memoryview(b"")
        fd, done = self._fd(e.file), 0
        while done < e.nbytes:  # os.preadv may return short reads on large requests
            n = os.preadv(fd, [view[done:]], e.start + done)
            if n <= 0:
                raise WeightsError(f"{e.file}: ends inside tensor {name}; the file is truncated, re-download it")
            done += n
        return out

    def read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        return self.read_into(name, torch.empty(e.shape, dtype=DTYPES[e.dtype]))

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
