"""`dsvl2 quantize`: write a pre-quantized, self-describing copy of a checkpoint folder."""


from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ... import quant_methods
from ...files import follow_umask, replacing_folder
from ...model.config import ModelConfig
from ..loading.weights import (IGNORED_PREFIXES, INDEX_NAME, TensorReader, check_tensors, expected_tensors,
                               read_headers, stack_experts, weight_files)
from .format import _EXPERT_NAME, CONFIG_KEY, PARTS, QuantizationError, QuantSpec, read_spec
from .registry import expected_quantized, pack_part

# ------------------------------------------------------------------------- pre-quantized folder

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def quantize_folder(src: str | os.PathLike, dst: str | os.PathLike, method: str, group_size: int | None = None,
                    on_progress: Callable[[int, int], None] | None = None,
                    max_shard_bytes: int = 2_000_000_000) -> Path:
    """Write a pre-quantized copy of the checkpoint folder `src` to `dst` (which must not exist,
    or be empty): config.json with "dsvl2_quantization" added, the other small files copied,
    the non-expert tensors unchanged and the routed experts packed. Built in a temporary folder
    next to `dst` and renamed at the end, so a failure leaves nothing behind. Returns `dst`."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if str(method).lower() == "auto":  # auto depends on the machine that loads; a folder is read anywhere
        raise QuantizationError("quantization method 'auto' cannot write a folder: a quantized folder must say "
                                f"its method; use {quant_methods.known()}")
    spec = QuantSpec.make(method, group_size)
    if read_spec(src) is not None:
        raise QuantizationError(f"{src} is already quantized; quantize the original checkpoint")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise QuantizationError(f"{dst} already exists and is not empty; choose a new folder")
    cfg = ModelConfig.from_dir(src)
    infos = read_headers(weight_files(src))
    check_tensors(infos, expected_tensors(cfg), str(src))
    shapes, _ = expected_quantized(cfg, spec)  # fails early on sizes the method cannot take

    dst.parent.mkdir(parents=True, exist_ok=True)
    reader = TensorReader(infos)
    try:
        with replacing_folder(dst) as tmp:  # renamed to dst at the end; removed on any failure
            _write(tmp, src, cfg, spec, shapes, infos, reader, on_progress, max_shard_bytes, save_file)
    finally:
        reader.close()
    return dst


def _write(tmp: Path, src: Path, cfg: ModelConfig, spec: QuantSpec, shapes: dict, infos, reader: TensorReader,
           on_progress: Callable[[int, int], None] | None, max_shard_bytes: int, save_file) -> None:
    """The folder's files into `tmp`: config.json with the spec, the small files, the shards."""
    raw = json.loads((src / "config.json").read_text(encoding="utf-8"))
    raw[CONFIG_KEY] = spec.as_config()
    (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name not in ("config.json", INDEX_NAME) \
                and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copyfile(f, tmp / f.name)  # contents only: the copy gets the user's umask
            shutil.copystat(f, tmp / f.name, follow_symlinks=True)
            follow_umask(tmp / f.name)

    # output items in checkpoint order: non-expert tensors, and each MoE layer's packed experts
    # at the place of its float ones; the unused pooling head is kept as it is
    items, seen = [], set()
    for name in list(expected_tensors(cfg)) + [n for n in infos if n.startswith(IGNORED_PREFIXES)]:
        m = _EXPERT_NAME.match(name)
        if m is None:
            items.append(name)
        elif m.group(1) not in seen:
            seen.add(m.group(1))
            items.append(m.group(1))
    shards = _ShardWriter(tmp, max_shard_bytes, save_file)
    for done, item in enumerate(items, 1):
        if item.endswith(".mlp."):
            for part in PARTS:  # one part in float at a time
                w = stack_experts(reader, item, cfg.language.n_routed_experts, part)
                reader.close()  # let go of the float experts' file pages
                for key, t in pack_part(w, spec, part).items():
                    name = f"{item}experts.{spec.method}.{key}"
                    assert tuple(t.shape) == shapes[name], name  # our own invariant
                    shards.add(name, t)
                del w
        else:
            shards.add(item, reader.get(item))
        if on_progress is not None:
            on_progress(done, len(items))
    shards.finish(spec)


class _ShardWriter:
    """Collects tensors into safetensors shards of at most `limit` bytes, then names them
    model-0000K-of-0000N.safetensors and writes the index."""

    def __init__(self, folder: Path, limit: int, save_file):
        self.folder, self.limit, self.save_file = folder, limit, save_file
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.limit:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self.files):05d}.partial"
        self.save_file(self.pending, str(path), metadata={"format": "pt"})
        follow_umask(path)  # safetensors writes it private (0600)
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self, spec: QuantSpec) -> None:
        if self.pending:
            self._flush()
        weight_map = {}
        for i, (path, names) in enumerate(self.files, 1):
            final = f"model-{i:05d}-of-{len(self.files):05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total, CONFIG_KEY: spec.as_config()}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
