"""The persistent prompt cache: the attention cache of a prompt's image prefix, kept on disk so
that a new process asked about the same images with the same leading text skips the vision
tower and the prefill of those positions.

An entry is one safetensors file (tensors only: nothing in it is ever executed) named by the
hash of what it answers for:
- the model: config.json and the safetensors files' sizes, modification times and headers
  (another checkpoint, or a rewritten file, is another model);
- the dtype and device type the cache was computed in;
- the exact position keys of the prefix: token ids, and per image position the fingerprint of
  the image's tiles (`generate.position_keys`), so another image with the same name misses.
The same facts are stored inside the file with a BLAKE2b digest of the tensor bytes; an entry
whose name, facts or digest do not match (truncated, corrupt, foreign, stale) is ignored with a
warning and removed. Entries are written to a temporary file and renamed, so a concurrent
process never reads half an entry. The store keeps at most `cap_bytes`, evicting the least
recently used (a hit refreshes the file's modification time).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CacheError
from ..files import Replacement
from .cache import ModelCache

FORMAT = "dsvl2-prompt-prefix"
VERSION = "1"
DEFAULT_CAP_BYTES = 2_000_000_000
SUFFIX = ".prefix.safetensors"


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a checkpoint as loaded: config.json's bytes and each weight file's size,
    modification time and header (cheap: no tensor data is read)."""
    h = hashlib.blake2b(digest_size=16)
    folder = Path(model_dir)
    for name in sorted(p.name for p in folder.iterdir() if p.name == "config.json" or p.suffix == ".safetensors"):
        path = folder / name
        st = path.stat()
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        with path.open("rb") as fh:
            if name == "config.json":
                h.update(fh.read())
            else:  # the JSON header: every tensor's name, dtype, shape and offsets
                size = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(min(size, 100_000_000)))
    return h.hexdigest()


def _keys_json(keys: Sequence) -> str:
    return json.dumps([list(k) if isinstance(k, tuple) else k for k in keys], separators=(",", ":"))


@dataclass(frozen=True)
class EntryKey:
    """What a saved prefix answers for."""

    model: str  # model_fingerprint
    dtype: str  # e.g. "torch.bfloat16"
    device: str  # device type: "cpu", "cuda"
    keys: tuple  # position keys of the prefix

    @property
    def facts(self) -> dict[str, str]:
        return {"format": FORMAT, "version": VERSION, "model": self.model, "dtype": self.dtype,
                "device": self.device, "keys": _keys_json(self.keys)}

    @property
    def name(self) -> str:
        blob = json.dumps(self.facts, sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=20).hexdigest() + SUFFIX


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the buffer itself: no copy of the cache
    return h.hexdigest()


class PromptStore:
    """Saved prompt prefixes in one folder, at most `cap_bytes` of them."""

    def __init__(self, folder: Path, cap_bytes: int = DEFAULT_CAP_BYTES):
        self.folder = Path(folder)
        self.cap_bytes = cap_bytes
        self._models: dict[tuple, str] = {}  # (folder, quantization) -> model id, read once per process

    # ------------------------------------------------------------ for generation

    def key_for(self, vlm, keys: Sequence) -> EntryKey:
        """The entry key of a loaded model (runtime.VLModel) and prefix position keys. Experts
        quantized while loading, the int8 vision tower (other image embeddings) and float32
        products (another rounding order) compute differently from the same folder: all three
        are part of the model id."""
        quant = vlm.quantization
        vision_int8 = bool(getattr(vlm, "vision_int8", False))
        f32 = bool(getattr(vlm, "f32_products", False))
        ident = (str(vlm.path), repr(quant), vision_int8, f32)
        if ident not in self._models:
            experts = f"+{quant.method}/{quant.group_size}" if quant else ""
            self._models[ident] = (model_fingerprint(vlm.path) + experts + ("+vision-int8" if vision_int8 else "")
                                   + ("+f32-products" if f32 else ""))
        return EntryKey(self._models[ident], str(vlm.dtype), vlm.device.type, tuple(keys))

    def lookup(self, vlm, keys: Sequence) -> ModelCache | None:
        """The saved cache of prefix `keys` for `vlm`, ready to extend, or None."""
        return self.load(self.key_for(vlm, keys), lambda: vlm.new_cache(1), vlm.device)

    def keep(self, vlm, keys: Sequence, cache: ModelCache) -> Path | None:
        """Save the first len(keys) positions of `cache` as the prefix `keys` of `vlm`."""
        return self.save(self.key_for(vlm, keys), cache)

    # ------------------------------------------------------------------ reading

    def load(self, key: EntryKey, new_cache, device: torch.device) -> ModelCache | None:
        """The saved cache for `key` as a fresh ModelCache from `new_cache()` on `device`, or
        None (a miss; an unusable entry warns and is removed)."""
        path = self.folder / key.name
        if not path.is_file():
            return None
        try:
            tensors, meta = _read(path)
            problem = _check(meta, key, tensors)
        except Exception as err:  # noqa: BLE001 - any unreadable file is a miss, never a crash
            problem = f"unreadable ({type(err).__name__})"
        if problem is None:
            cache = new_cache()
            try:
                _restore(cache, tensors, device)
                if cache.length != len(key.keys):
                    raise ValueError("length")
            except Exception:  # noqa: BLE001 - shapes of another model: not ours
                problem = "its tensors do not fit this model"
        if problem is not None:
            warnings.warn(f"prompt cache entry {path.name} ignored and removed: {problem}", stacklevel=2)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used
        return cache

    # ------------------------------------------------------------------ writing

    def save(self, key: EntryKey, cache: ModelCache) -> Path | None:
        """Write `cache` (its first len(key.keys) positions) for `key`; None when it cannot be
        written (an unwritable folder only costs the reuse)."""
        cache_length = len(key.keys)
        tensors = {}
        for i, layer in enumerate(cache.layers):
            for j, t in enumerate(layer.contents()):
                dim = 1 if t.dim() == 3 else 2  # latent (B, T, C+R) or K/V (B, H, T, d)
                tensors[f"layers.{i}.{j}"] = t.narrow(dim, 0, cache_length).to("cpu").contiguous()
        meta = {**key.facts, "digest": _digest(tensors), "layers": str(len(cache.layers))}
        path = self.folder / key.name
        try:
            from safetensors.torch import save_file

            self.folder.mkdir(parents=True, exist_ok=True)
            with Replacement(path, prefix=".", suffix=".part") as out:  # renamed into place once whole
                save_file(tensors, str(out.tmp), metadata=meta)
        except OSError as err:
            warnings.warn(f"prompt cache not saved in {self.folder} ({err.strerror or err})", stacklevel=2)
            return None
        self.evict(keep=path)
        return path

    # ------------------------------------------------------------------ upkeep

    def entries(self) -> list[tuple[Path, int, float]]:
        """(path, bytes, last use) of every entry, least recently used first."""
        out = []
        if self.folder.is_dir():
            for p in self.folder.glob("*" + SUFFIX):
                with contextlib.suppress(OSError):
                    st = p.stat()
                    out.append((p, st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e[2])

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used entries (never `keep`, the one just written: file times
        can tie) until the store fits its cap; returns bytes freed."""
        entries = self.entries()
        total, freed = sum(size for _, size, _ in entries), 0
        for path, size, _ in entries:
            if total - freed <= self.cap_bytes:
                break
            if path == keep:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                freed += size
        return freed

    def clear(self) -> tuple[int, int]:
        """Remove every entry (and stale temporary files); returns (entries, bytes) removed. An entry
        that cannot be removed is a CacheError (the page texts in page-text/ are not entries)."""
        n = size = 0
        for path, nbytes, _ in self.entries():
            if remove_file(path):
                n, size = n + 1, size + nbytes
        for tmp in self.folder.glob(".*.part") if self.folder.is_dir() else ():
            with contextlib.suppress(OSError):
                tmp.unlink()
        return n, size


def remove_file(path: Path) -> bool:
    """Remove a cache file: True when removed, False when another process removed it first; a
    file that cannot be removed is a one-line CacheError (clearing must not half-succeed silently)."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as err:
        raise CacheError(f"{path}: cannot remove it ({err.strerror or err}); check the folder's permissions") from None
    return True


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    return tensors, meta


def _check(meta: dict[str, str], key: EntryKey, tensors: dict[str, torch.Tensor]) -> str | None:
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        return "not a dsvl2 prompt prefix of this version"
    for field, want in key.facts.items():
        if meta.get(field) != want:
            return f"written for another {field}"
    if meta.get("digest") != _digest(tensors):
        return "its contents do not match their digest (damaged)"
    return None


def _restore(cache: ModelCache, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    layers = len(cache.layers)
    if any(int(name.split(".")[1]) >= layers for name in tensors):
        raise ValueError("more layers than the model has")
    for i, layer in enumerate(cache.layers):
        parts, j = [], 0
        while f"layers.{i}.{j}" in tensors:
            parts.append(tensors[f"layers.{i}.{j}"].to(device))
            j += 1
        layer.update_and_fetch(*parts)
