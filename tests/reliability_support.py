"""Helpers of the reliability tests (test_reliability*.py): bad and odd inputs generated on the
spot, and a canned answer instead of the model's (its answers are random tokens anyway)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import helpers
import pytest
from PIL import Image

from dsvl2_cli.app import backends
from dsvl2_cli.engine.prompt import processor
from dsvl2_cli.engine.generate import Done, Prefilled, Stats, Token

REPO = Path(__file__).resolve().parents[1]


def leftovers(folder: Path) -> list[str]:
    """Temporary or hidden files (write_atomic's `.NAME.*.part`) under `folder`."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.suffix in (".part", ".tmp"))


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def gradient(w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h))
    img.putdata([((x * 7) % 256, (y * 5) % 256, (x + y) % 256) for y in range(h) for x in range(w)])
    return img


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def huge_png_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h 8-bit RGB pixels, with a few bytes of image data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def make_pdf(path: Path, pages: int = 3, size=(200, 260), **save_kw) -> Path:
    """helpers.make_pdf with the reliability tests' smaller pages."""
    return helpers.make_pdf(path, pages, size, at=(20, 40), fontsize=12, **save_kw)


@pytest.fixture(scope="module")
def three_pages(tmp_path_factory) -> Path:
    return make_pdf(tmp_path_factory.mktemp("three") / "three.pdf", pages=3)


ZERO_PAGE_PDF = (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
                 b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\n"
                 b"trailer << /Root 1 0 R >>\n%%EOF\n")


@pytest.fixture
def seen_by_model(monkeypatch):
    """The PIL images the processor turned into model input (processor.preprocess_image calls)."""
    seen: list[Image.Image] = []
    real = processor.preprocess_image

    def spy(img, settings, tiling, max_tiles=None):
        seen.append(img.copy())
        return real(img, settings, tiling, max_tiles)

    monkeypatch.setattr(processor, "preprocess_image", spy)
    return seen


def answer_events(vlm, prepared, text: str):
    """The events of an answer `text` (token ids of the real tokenizer), without running the model."""
    ids = tuple(vlm.tokenizer.encode(text))
    n = int(prepared.input_ids.numel())
    yield Prefilled(n, 0, sum(prepared.num_image_tokens), 0.01)
    for tid in ids:
        yield Token(tid, vlm.tokenizer.decode([tid]))
    yield Done("eos", text, ids, Stats(n, 0, sum(prepared.num_image_tokens), len(ids), 0.1, 1e3, 50.0, 0))


def fake_model_answer(monkeypatch, text: str) -> None:
    """Make every generation through backends.stream_generate answer `text` (the model's forward pass
    is not what these tests are about; the fixture model's answers are random tokens anyway)."""
    monkeypatch.setattr(backends, "stream_generate",
                        lambda vlm, prepared, config=None, prompt_cache=None: answer_events(vlm, prepared, text))
