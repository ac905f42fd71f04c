"""Housekeeping of the mapped layouts (mapped.py): what is there (source folder, dtype,
quantization, size, last use, state), pruning the stale ones, clearing them all.

An entry is stale when its source folder no longer exists, or when the source's fingerprint is
not the entry's (a file was rewritten: a load would write another entry), or when it is half an
entry: a record without its data file, or a data file without its record left for over an hour.
Temporary files of a writer are left alone for an hour too: a writer may be at work on them.

Removal takes the completion record first and the data file second, so an interrupted removal
leaves a data file without a record, which no load maps (it is rebuilt) and the next prune
removes; it never leaves a "complete" entry without its data. Removing a file that a running
process has mapped is safe on Linux (and any POSIX system): unlinking drops the name only, and
the inode and its pages live on until the last mapping goes, so the running model keeps its
weights; a new load finds no entry and writes one. (A load that checked an entry just before it
was removed finds the file gone when it maps it, and copies instead: mapped.load_mapped.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ... import settings
from ...errors import CacheError
from ..prompt_store import model_fingerprint, remove_file

FORMAT = "dsvl2-mapped-layout"
DATA_SUFFIX = ".safetensors"
RECORD_SUFFIX = ".done.json"
TMP_PREFIX = ".tmp-"
LEFTOVER_AGE = 3600.0  # seconds untouched before a record-less data file or a temporary file is a leftover

READY, MISSING, CHANGED, INCOMPLETE, WRITING = ("ready", "source missing", "source changed", "incomplete",
                                                "being written")
STALE = (MISSING, CHANGED, INCOMPLETE)


@dataclass(frozen=True)
class MappedEntry:
    """One mapped layout (or the leftovers of one) in the mapped folder."""

    name: str  # the file stem: "<fingerprint>-<dtype>[-<quant key>]", or a temporary file's name
    files: tuple[Path, ...]  # record first: the order they are removed in
    bytes: int
    last_used: float  # the record's modification time (touched at every mapped load)
    source: str | None  # the model folder it was built from (None: no readable record)
    dtype: str | None  # "BF16", "F16", "F32"
    quant: str | None  # quant.KernelLayout.key, None for float experts
    state: str  # READY, or one of STALE, or WRITING

    @property
    def stale(self) -> bool:
        return self.state in STALE

    def as_json(self) -> dict:
        return {"name": self.name, "source": self.source,
                "source_exists": self.source is not None and Path(self.source).is_dir(),
                "dtype": self.dtype.lower() if self.dtype else None, "quant": self.quant, "bytes": self.bytes,
                "last_used": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.last_used)),
                "state": self.state, "stale": self.stale}


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def _stat(path: Path) -> tuple[int, float]:
    try:
        st = path.stat()
    except OSError:
        return 0, 0.0
    return st.st_size, st.st_mtime


def entries(folder: Path | None = None) -> list[MappedEntry]:
    """Every entry of the mapped folder (default settings.mapped_dir()), least recently used first."""
    folder = Path(folder) if folder is not None else settings.mapped_dir()
    try:
        names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    except OSError as err:
        raise CacheError(f"{folder}: cannot list the mapped layouts ({err.strerror or err})") from None
    now, fingerprints, out = time.time(), {}, []
    stems = {n.removesuffix(RECORD_SUFFIX) if n.endswith(RECORD_SUFFIX) else n.removesuffix(DATA_SUFFIX)
             for n in names if not n.startswith(TMP_PREFIX) and n.endswith((RECORD_SUFFIX, DATA_SUFFIX))}
    for stem in sorted(stems):
        record_path, data_path = folder / (stem + RECORD_SUFFIX), folder / (stem + DATA_SUFFIX)
        (rec_size, rec_time), (data_size, data_time) = _stat(record_path), _stat(data_path)
        record = _read_record(record_path) if record_path.name in names else None
        has_data = data_path.name in names
        if record is None or not has_data:
            young = has_data and record_path.name not in names and now - data_time < LEFTOVER_AGE
            state = WRITING if young else INCOMPLETE  # a writer renames the data first, then writes the record
        else:
            state = _source_state(record, stem, fingerprints)
        files = tuple(p for p in (record_path, data_path) if p.name in names)
        out.append(MappedEntry(stem, files, rec_size + data_size, rec_time or data_time,
                               record.get("source") if record else None, record.get("dtype") if record else None,
                               record.get("quant") if record else None, state))
    for name in names:
        if name.startswith(TMP_PREFIX):
            size, mtime = _stat(folder / name)
            out.append(MappedEntry(name, (folder / name,), size, mtime, None, None, None,
                                   WRITING if now - mtime < LEFTOVER_AGE else INCOMPLETE))
    return sorted(out, key=lambda e: e.last_used)


def _source_state(record: dict, stem: str, fingerprints: dict[str, str | None]) -> str:
    source = record.get("source")
    if not isinstance(source, str) or not Path(source).is_dir():
        return MISSING
    if source not in fingerprints:
        try:
            fingerprints[source] = model_fingerprint(Path(source))
        except (OSError, ValueError):  # unreadable now (permissions, a file being rewritten): keep it
            fingerprints[source] = None
    now = fingerprints[source]
    built_from = record.get("fingerprint") or stem.split("-", 1)[0]  # older records: the name's first part
    return CHANGED if now is not None and now != built_from else READY


def remove(entry: MappedEntry) -> None:
    """Remove an entry's files, its record first (see the module docstring: safe while mapped)."""
    for path in entry.files:
        remove_file(path)


def _remove_all(chosen: Iterable[MappedEntry]) -> tuple[int, int]:
    n = size = 0
    for entry in chosen:
        remove(entry)
        n, size = n + 1, size + entry.bytes
    return n, size


def prune(folder: Path | None = None, keep: Iterable[Path] = ()) -> tuple[int, int]:
    """Remove the stale entries (never one with a file in `keep`); returns (entries, bytes) removed."""
    keep = {Path(p) for p in keep}
    return _remove_all(e for e in entries(folder) if e.stale and not keep.intersection(e.files))


def clear(folder: Path | None = None) -> tuple[int, int]:
    """Remove every entry but those being written; returns (entries, bytes) removed."""
    return _remove_all(e for e in entries(folder) if e.state != WRITING)
