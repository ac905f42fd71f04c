"""Memory-mapped loading (the llama.cpp / gpt-fast anchor): the weights are used in place.

Our modules do not hold the checkpoint's tensors as they are in the file (routed experts are
stacked into (E, 2M, D) and (E, D, M), gate/up are fused, MLA's kv_b_proj is split into w_kb and
w_vb, and the dtype may change), so the file's pages cannot be our parameters. The first CPU
load of a model in a dtype therefore writes a "mapped layout": one safetensors file holding every
parameter exactly as the model holds it, streamed one parameter at a time (peak memory: one
layer's experts, as the copy path). Every later load maps that file copy-on-write
(`UntypedStorage.from_file(shared=False)`, MAP_PRIVATE) and sets each parameter to a view of the
mapping: nothing is copied, the pages stay in the page cache, and a second process on the same
model shares them. Nothing writes into weights (the native kernels only read them).

Quantized routed experts are mapped too: their buffers are stored in the layout of the kernel that
runs them on this machine (int4 and nf4 packings are torch's and bitsandbytes' own, converted
once when the entry is written), so a load neither quantizes nor converts; a pre-quantized folder
gets an entry as a float one does (its non-expert tensors are in checkpoint order and dtype, and
its packed experts in the portable layout, so neither can be used in place as they are).

An entry is `<mapped_dir>/<model fingerprint>-<dtype>[-<quant key>].safetensors` (the quant key,
quant.KernelLayout.key, names the method, group size, kernel layout and a digest of its packing;
a rewritten source file has another fingerprint, so another entry) and `.done.json`, its
completion record, written after the data file is renamed into place. Writing an entry prunes the
stale ones (mapped_store.py: their source folder is gone or was rewritten). Before any page is mapped the entry must pass cheap strict checks: the record
names this source and dtype, the file's size is the record's and the layout's, its header is byte
for byte the header this model's parameter table implies (names, shapes, dtypes, 64-byte aligned
offsets), and a BLAKE2b of the header and of 64 sampled 4 KiB data pages matches the record. A
truncated file is caught by its size (a mapped read past the end of a file is SIGBUS, not an
error), a foreign or rewritten header by the header; a same-size rewrite of tensor bytes outside
the sampled pages is not detected (hashing every byte would cost a full read of the file at every
load). Any failed check rebuilds the entry from the source with a one-line warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ... import settings
from ...errors import CacheError, WeightsError
from ...files import Replacement, write_atomic
from ...model.config import ModelConfig
from . import mapped_store
from ..prompt_store import model_fingerprint
from ..quant.experts import KernelLayout
from .weights import EXPERTS_PARAM, TensorReader, build_params, param_dtype

FORMAT = mapped_store.FORMAT
VERSION = "1"
ALIGN = 64  # every tensor starts on a 64-byte boundary (element alignment, and whole cache lines)
SAMPLES, SAMPLE_BYTES = 64, 4096
HEADER_LIMIT = 100_000_000
COMPUTE_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
ST_DTYPES = {**COMPUTE_DTYPES, torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}
DISK_MARGIN = 1 << 30  # leave at least this much free after writing an entry

Table = dict[str, tuple[tuple[int, ...], torch.dtype]]
ExpertsHook = Callable[[str, TensorReader], torch.nn.Module]


def param_table(model: torch.nn.Module, dtype: torch.dtype, layout: KernelLayout | None = None) -> Table:
    """Our tensor name -> (shape, dtype) as the model holds it: the expected header. With a
    quantized `layout`, each MoE layer's `experts.gate_up`/`down` are replaced by its buffers."""
    table: Table = {}
    for name, p in model.named_parameters():
        m = EXPERTS_PARAM.match(name) if layout is not None else None
        if m is None:
            table[name] = (tuple(p.shape), param_dtype(name, dtype))
        elif m.group(2) == "gate_up":
            table.update(layout.table(m.group(1)))
    return table


def entry_paths(model_dir: Path, dtype: torch.dtype, layout: KernelLayout | None = None,
                fingerprint: str | None = None) -> tuple[Path, Path]:
    stem = f"{fingerprint or model_fingerprint(model_dir)}-{COMPUTE_DTYPES[dtype].lower()}"
    if layout is not None:
        stem += f"-{layout.key}"
    folder = settings.mapped_dir()
    return folder / f"{stem}{mapped_store.DATA_SUFFIX}", folder / f"{stem}{mapped_store.RECORD_SUFFIX}"


def _layout(table: Table, source: str, quant: str | None = None) -> tuple[bytes, list[tuple[str, int, int]], int]:
    """The exact header bytes, (name, file offset, nbytes) per tensor, and the file's size.
    Gaps before aligned tensors are filled by U8 "__pad__.N" tensors: safetensors allows no holes."""
    entries, spans, pos, pads = {}, [], 0, 0
    for name, (shape, dt) in table.items():
        if pos % ALIGN:
            gap = ALIGN - pos % ALIGN
            entries[f"__pad__.{pads}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [pos, pos + gap]}
            pads, pos = pads + 1, pos + gap
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
        entries[name] = {"dtype": ST_DTYPES[dt], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        spans.append((name, pos, nbytes))
        pos += nbytes
    meta = {"format": FORMAT, "version": VERSION, "source": source}
    if quant is not None:  # float entries keep the header they always had
        meta["quant"] = quant
    header = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % ALIGN)  # data starts aligned too (trailing spaces are valid)
    base = 8 + len(header)
    return header, [(n, base + off, nb) for n, off, nb in spans], base + pos


def _digest(path: Path, header_len: int, size: int) -> str:
    """BLAKE2b of the header and of SAMPLES evenly spread data pages, read with pread (never the
    mapping: a short file gives short reads, not SIGBUS)."""
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        h.update(os.pread(f.fileno(), 8 + header_len, 0))
        span = max(size - 8 - header_len - SAMPLE_BYTES, 0)
        for i in range(SAMPLES):
            h.update(os.pread(f.fileno(), SAMPLE_BYTES, 8 + header_len + span * i // max(SAMPLES - 1, 1)))
    return h.hexdigest()


def _quant_key(layout: KernelLayout | None) -> str | None:
    return None if layout is None else layout.key


def write_entry(model: torch.nn.Module, reader: TensorReader, cfg: ModelConfig, dtype: torch.dtype,
                data_path: Path, record_path: Path, source: str,
                on_progress: Callable[[int, int], None] | None = None,
                experts: ExpertsHook | None = None, layout: KernelLayout | None = None,
                fingerprint: str | None = None) -> None:
    """Stream every tensor of the meta `model`, as built from `reader` (quantized experts by the
    `experts` hook, in `layout`), into a mapped layout. Temporary file + fsync + rename, then the
    completion record: a reader never sees half an entry."""
    table = param_table(model, dtype, layout)
    built = build_params(model, reader, cfg, dtype, experts if layout is not None else None)
    write_tensors(data_path, record_path, table, built, source, dtype, _quant_key(layout), fingerprint, on_progress)


def write_tensors(data_path: Path, record_path: Path, table: Table, tensors: Iterable[tuple[str, torch.Tensor]],
                  source: str, dtype: torch.dtype, quant: str | None, fingerprint: str | None,
                  on_progress: Callable[[int, int], None] | None = None) -> None:
    """An entry holding `tensors` ((name, tensor) in `table`'s order, each as `table` says; made
    one at a time if an iterator), then its completion record; stale entries are pruned after."""
    header, spans, size = _layout(table, source, quant)
    folder = data_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    # temporary file + fsync + rename, then the completion record the same way (files.py)
    with Replacement(data_path, prefix=mapped_store.TMP_PREFIX, suffix=mapped_store.DATA_SUFFIX, fsync=True) as out:
        f = out.file
        f.write(len(header).to_bytes(8, "little") + header)
        for done, ((name, tensor), (span_name, offset, nbytes)) in enumerate(zip(tensors, spans, strict=True), 1):
            if name != span_name or (tuple(tensor.shape), tensor.dtype) != table[name]:
                raise WeightsError(f"{name}: built tensor does not fit the mapped layout (internal error)")
            f.write(b"\0" * (offset - f.tell()))
            f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
            del tensor
            if on_progress is not None:
                on_progress(done, len(spans))
    record = {"format": FORMAT, "version": VERSION, "source": source, "dtype": COMPUTE_DTYPES[dtype],
              "quant": quant, "fingerprint": fingerprint, "size": size,
              "digest": _digest(data_path, len(header), size)}
    write_atomic(record_path, json.dumps(record).encode(), prefix=mapped_store.TMP_PREFIX, suffix=".json")
    # Older entries of rewritten or deleted models are dead weight (GBs): pruned now, quietly (a
    # failure to prune must not fail the load that wrote this entry).
    with contextlib.suppress(OSError, CacheError):
        mapped_store.prune(folder, keep=(data_path,))


def map_tensors(data_path: Path, spans, size: int, table: Table) -> dict[str, torch.Tensor]:
    """Every tensor of a checked entry as a view of one private mapping of its file."""
    storage = torch.UntypedStorage.from_file(str(data_path), shared=False, nbytes=size)
    out = {}
    for name, offset, _ in spans:
        shape, dt = table[name]
        elem = torch.empty((), dtype=dt).element_size()
        out[name] = torch.empty(0, dtype=dt).set_(storage, offset // elem, shape, _contiguous_strides(shape))
    return out


def check_entry(data_path: Path, record_path: Path, table: Table, source: str, dtype: torch.dtype,
                quant: str | None = None) -> tuple[list[tuple[str, int, int]], int] | str:
    """The tensor spans and file size of a sound entry, or why it cannot be mapped (a few words).
    `quant`: the KernelLayout key of quantized experts (None: float)."""
    if not data_path.is_file() or not record_path.is_file():
        return "missing"
    header, spans, size = _layout(table, source, quant)
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        on_disk = data_path.stat().st_size
        with data_path.open("rb") as f:
            head_len = int.from_bytes(f.read(8), "little")
            found = f.read(min(head_len, HEADER_LIMIT))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"unreadable ({err})"
    want = {"format": FORMAT, "version": VERSION, "source": source, "dtype": COMPUTE_DTYPES[dtype], "quant": quant}
    if not isinstance(record, dict) or {k: record.get(k) for k in want} != want:
        return "its completion record is for another model or version"
    if on_disk != size or record.get("size") != size:
        return f"it is {on_disk} bytes, the layout needs {size} (truncated or rewritten)"
    if found != header:
        return "its header does not match this model's parameters"
    if record.get("digest") != _digest(data_path, len(header), size):
        return "its contents do not match its completion record"
    return spans, size


def map_entry(model: torch.nn.Module, data_path: Path, spans, size: int, table: Table,
              layout: KernelLayout | None = None) -> None:
    """Set every tensor of the meta `model` to a view of one private mapping of the file; with a
    quantized `layout`, each MoE layer's experts become a quantized module holding views."""
    tensors = map_tensors(data_path, spans, size, table)  # first: may fail
    if layout is not None:
        for name, _ in list(model.named_parameters()):
            m = EXPERTS_PARAM.match(name)
            if m is not None and m.group(2) == "gate_up":
                parent, _, attr = m.group(1).rpartition(".")
                setattr(model.get_submodule(parent), attr, layout.empty_module())
    for name, t in tensors.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._buffers:
            module._buffers[attr] = t
        else:
            module._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= dim
    return tuple(reversed(strides))


def load_mapped(model: torch.nn.Module, model_dir: Path, reader: TensorReader, cfg: ModelConfig,
                dtype: torch.dtype, on_progress: Callable[[int, int], None] | None = None,
                experts: ExpertsHook | None = None, layout: KernelLayout | None = None) -> bool:
    """Fill the meta `model` from its mapped layout, writing (or rebuilding) the entry first if
    needed. Quantized experts: `experts` builds a layer's module (on CPU) and `layout` says how its
    buffers lie. False (the caller copies instead, the model untouched) when the dtype has no
    entry, or the entry can neither be found sound nor written (no room, unwritable folder)."""
    if dtype not in COMPUTE_DTYPES or (layout is None) != (experts is None):
        return False
    fingerprint = model_fingerprint(model_dir)
    data_path, record_path = entry_paths(model_dir, dtype, layout, fingerprint)
    source, table, quant = str(Path(model_dir).resolve()), param_table(model, dtype, layout), _quant_key(layout)
    checked = check_entry(data_path, record_path, table, source, dtype, quant)
    if isinstance(checked, str):
        if checked != "missing":
            warnings.warn(f"{data_path}: mapped layout not used ({checked}); rebuilding it from {model_dir}",
                          stacklevel=2)
        for p in (record_path, data_path):  # the record first: a half-removed entry is never "complete"
            with contextlib.suppress(OSError):
                p.unlink()
        need = _layout(table, source, quant)[2]
        try:
            data_path.parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(data_path.parent).free
            if free < need + DISK_MARGIN:
                warnings.warn(f"{data_path.parent}: no room for the {need / 1e9:.1f} GB mapped layout; copying the "
                              "weights instead (set DSVL2_MMAP_DIR to a folder with room)", stacklevel=2)
                return False
            write_entry(model, reader, cfg, dtype, data_path, record_path, source, on_progress, experts, layout,
                        fingerprint)
        except OSError as err:  # read-only or full cache folder: the load goes on, copying
            warnings.warn(f"{data_path.parent}: cannot write the mapped layout ({err.strerror or err}); copying the "
                          "weights instead (set DSVL2_MMAP_DIR to a writable folder, or DSVL2_MMAP=0)", stacklevel=2)
            return False
        checked = check_entry(data_path, record_path, table, source, dtype, quant)
        if isinstance(checked, str):
            raise WeightsError(f"{data_path}: the mapped layout just written fails its check ({checked})")
    try:
        map_entry(model, data_path, *checked, table, layout)
    except (OSError, RuntimeError) as err:  # removed by `dsvl2 cache clear` between the check and the map
        warnings.warn(f"{data_path}: mapped layout not used ({err}); copying the weights instead", stacklevel=2)
        return False
    with contextlib.suppress(OSError):
        os.utime(record_path)  # its last use, for `dsvl2 cache`
    return True
