"""What this process may use, in bytes: MemAvailable from /proc/meminfo, lowered by the memory
cgroup's limit minus its usage (containers), or a CUDA device's free memory; DSVL2_MEMORY_LIMIT
caps either. Memory-mapped weights paged from disk are not counted (yet): fit.py's
`allow_paging=True` only warns.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ... import settings
from ...errors import Dsvl2Error

GB = 1e9


def gb(n: float) -> str:
    """Bytes as the memory messages show them: GB (1e9) with one decimal."""
    return f"{n / GB:.1f} GB"


@dataclass(frozen=True)
class Available:
    """Bytes this process may use and where the number comes from (the lowest of `sources`)."""

    bytes: int
    source: str
    sources: Mapping[str, int] = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        return f"{gb(self.bytes)} ({self.source})"


_SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_LIMIT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_memory_size(text: str, what: str = "DSVL2_MEMORY_LIMIT") -> int:
    """"12G", "800M", "1.5G", "1073741824" -> bytes. Suffixes K/M/G/T are powers of 1024 (so
    "16G" = 16 GiB: what `free -g` and container limits such as `docker -m 16g` mean); "KB"/"KiB"
    read the same. A malformed or zero value is a Dsvl2Error naming `what`."""
    m = _LIMIT.match(text or "")
    if m is None:
        raise Dsvl2Error(f"{what}={text!r} is not a memory size; use bytes or a number with K, M, G or T "
                         f"(powers of 1024), e.g. 12G or 800M")
    value = int(float(m.group(1)) * _SUFFIXES[m.group(2).upper()])
    if value <= 0:
        raise Dsvl2Error(f"{what}={text!r} must be more than 0 bytes")
    return value


def memory_limit() -> int | None:
    """DSVL2_MEMORY_LIMIT in bytes (None when unset)."""
    text = settings.memory_limit()
    return parse_memory_size(text) if text else None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def mem_available(meminfo: str | os.PathLike = "/proc/meminfo") -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none: not Linux)."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def cgroup_headroom(proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
                    cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> int | None:
    """What the memory cgroup still allows: limit minus usage (page cache that can be dropped,
    inactive_file, not counted as used), the lowest over the cgroup and its ancestors; None
    without a limit. v2: memory.max / memory.current; v1: memory.limit_in_bytes / usage_in_bytes.
    Inside a container the cgroup namespace puts our cgroup at the root, so the root is tried too."""
    root = Path(cgroup_root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    v2_path, v1_path = None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
        elif "memory" in parts[1].split(","):
            v1_path = parts[2]
    best = None

    def consider(folder: Path, limit_name: str, usage_name: str, inactive_key: str) -> None:
        nonlocal best
        limit = _read_int(folder / limit_name)  # "max" (v2) reads as None
        usage = _read_int(folder / usage_name)
        if limit is None or usage is None or limit >= 2**60:  # v1 "no limit" is ~2**63
            return
        used = max(0, usage - _stat_value(folder / "memory.stat", inactive_key))
        room = max(0, limit - used)
        best = room if best is None else min(best, room)

    def folders(base: Path, rel: str | None) -> list[Path]:
        out, seen = [], set()
        if rel is not None:
            p = Path(rel.strip("/"))
            while True:
                out.append(base / p)
                if p == Path("."):
                    break
                p = p.parent
        out.append(base)
        return [f for f in out if not (f in seen or seen.add(f))]

    if v2_path is not None or (root / "memory.max").exists():
        base = root / "unified" if (root / "unified" / "cgroup.controllers").exists() else root
        for f in folders(base, v2_path):
            consider(f, "memory.max", "memory.current", "inactive_file")
    if v1_path is not None:
        for f in folders(root / "memory", v1_path):
            consider(f, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    return best


def available_memory(device: str | torch.device = "cpu", *, meminfo: str | os.PathLike = "/proc/meminfo",
                     proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
                     cgroup_root: str | os.PathLike = "/sys/fs/cgroup", limit: int | None = None) -> Available:
    """What this process may use on `device`: for the CPU, MemAvailable or the cgroup's headroom
    when lower; for CUDA, the device's free memory; DSVL2_MEMORY_LIMIT (or `limit`) caps either."""
    dev = torch.device(device)
    sources: dict[str, int] = {}
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        sources[f"free memory of {dev}"] = int(free)
    else:
        for name, value in (("MemAvailable", mem_available(meminfo)),
                            ("cgroup memory limit", cgroup_headroom(proc_cgroup, cgroup_root))):
            if value is not None:
                sources[name] = value
    cap = memory_limit() if limit is None else limit
    if cap is not None:
        sources["DSVL2_MEMORY_LIMIT"] = cap
    if not sources:  # no /proc (macOS, Windows): only what psutil-free Python can tell
        try:
            sources["physical memory"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            sources["unknown"] = 2**62
    source = min(sources, key=lambda k: (sources[k], k != "DSVL2_MEMORY_LIMIT"))
    return Available(sources[source], source, sources)
