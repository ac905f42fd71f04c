"""Plain helpers shared by the test modules (the fixtures are in conftest.py): deterministic random
pictures, loading a synthetic checkpoint on the CPU, small PDFs, and private copies of a checkpoint
for the memory-mapping tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from PIL import Image


def picture(w: int, h: int, seed: int = 0, *, randint: bool = False) -> Image.Image:
    """A w x h RGB image of seeded uniform noise: torch.rand scaled by 255, or with `randint`
    torch.randint(0, 256) (another image for the same seed; each test keeps the one it was
    written with)."""
    g = torch.Generator().manual_seed(seed)
    if randint:
        return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB")


def load_vlm(path, dtype: str = "float32", **kw):
    """dsvl2_cli.load on the CPU: the VLModel of a (synthetic) checkpoint folder."""
    import dsvl2_cli

    return dsvl2_cli.load(path, dtype=dtype, device="cpu", **kw)


def load_module(folder, dtype: torch.dtype = torch.bfloat16, **kw):
    """The engine's load_model on the CPU with the folder's own config: the bare language+vision
    module, no processor."""
    from dsvl2_cli.engine.runtime import load_model
    from dsvl2_cli.model.config import ModelConfig

    return load_model(folder, ModelConfig.from_dir(folder), dtype, torch.device("cpu"), **kw)


def write_pdf(path: Path, pages, size=(300, 400), *, at=(30, 50), fontsize: float = 11, image_rect=None,
              **save_kw) -> Path:
    """A PDF with a page of `size` points for each of `pages`: a text (written at `at`; an empty one
    leaves the page without a text layer) or a (text, picture file) pair, the picture drawn after the
    text on `image_rect` (default: the whole page). `save_kw` go to pymupdf's save (encryption...)."""
    import pymupdf

    doc = pymupdf.open()
    for spec in pages:
        text, image = (spec, None) if isinstance(spec, str) else spec
        page = doc.new_page(width=size[0], height=size[1])
        if text:
            page.insert_text(at, text, fontsize=fontsize)
        if image is not None:
            page.insert_image(pymupdf.Rect(image_rect or (0, 0, *size)), filename=str(image))
    doc.save(str(path), **save_kw)
    doc.close()
    return path


def make_pdf(path: Path, pages: int = 3, size=(300, 400), *, at=(30, 50), fontsize: float = 14, **save_kw) -> Path:
    """A PDF of `pages` pages reading "Page 1", "Page 2", ... (see write_pdf)."""
    return write_pdf(path, [f"Page {i + 1}" for i in range(pages)], size, at=at, fontsize=fontsize, **save_kw)


def fresh_copy(src, tmp_path, monkeypatch) -> Path:
    """A private copy of a fixture checkpoint and an empty mapped-layout folder."""
    monkeypatch.setenv("DSVL2_MMAP_DIR", str(tmp_path / "mapped"))
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def mapping_ranges(path) -> list[tuple[int, int]]:
    """(start, end) address ranges of `path` in this process's memory map."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.rstrip().endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out
