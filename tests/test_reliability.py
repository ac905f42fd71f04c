"""Reliability: every input problem of the hardening issue, through the CLI.

A tool people put in shell pipelines must never crash with a traceback, hang, or write half a
result. Each test below is named after one item of the issue's list and runs `dsvl2` in-process
(test_cli.run) on bad files generated here, asserting the exit code, the one-line `error: ...`
(naming the file and what is wrong), an empty stdout on failure, and for `--out` that no partial
or temporary file is left. Library-level tests of the same inputs live in test_images.py,
test_pdf.py, test_weights.py, test_config.py and test_grounding.py; CLI tests that already cover
an item are referenced in a comment instead of repeated.

Map (issue item -> tests):
  images ......... test_image_bad_file_* (missing, directory, empty, truncated PNG/JPEG, text .png,
                   30000x30000 header), test_image_bomb_*, test_image_odd_but_readable* (animated
                   GIF/WebP, CMYK, 16-bit, palette, LA/RGBA, EXIF, 1x1, 1x5000), and pipes:
                   test_image_from_a_pipe_path, test_image_device_*, test_image_endless_stdin_*
  PDFs ........... test_pdf_*
  model folders .. test_model_folder_*
  prompts ........ test_prompt_*
  output ......... test_output_*
  parsing ........ test_parsing_* (+ hypothesis: test_grounding.py::test_never_raises_on_*,
                   test_pdf.py::test_parse_pages_raises_only_input_error / _on_range_like_soup)
  security ....... test_security_*
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pymupdf
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_cli import _isolated, assert_clean, assert_one_line_error, model_args, run  # noqa: F401 - fixture

from dsvl2_cli.app import backends, cli, tasks
from dsvl2_cli.app import images as images_module
from dsvl2_cli.app.pdf import MAX_SIDE
from dsvl2_cli.dev.synthetic import write_image
from dsvl2_cli.engine import hub, processor
from dsvl2_cli.engine.generate import Done, Prefilled, Stats, Token

pytestmark = pytest.mark.usefixtures("_isolated")

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ helpers

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
    doc = pymupdf.open()
    for i in range(pages):
        doc.new_page(width=size[0], height=size[1]).insert_text((20, 40), f"Page {i + 1}", fontsize=12)
    doc.save(str(path), **save_kw)
    doc.close()
    return path


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


# ================================================================================== images

def _missing(tmp: Path) -> Path:
    return tmp / "missing.png"


def _directory(tmp: Path) -> Path:
    (tmp / "folder.png").mkdir()
    return tmp / "folder.png"


def _empty(tmp: Path) -> Path:
    (tmp / "empty.png").write_bytes(b"")
    return tmp / "empty.png"


def _truncated_png(tmp: Path) -> Path:
    data = encoded(gradient(200, 150), "PNG")
    (tmp / "cut.png").write_bytes(data[: len(data) // 2])
    return tmp / "cut.png"


def _truncated_jpeg(tmp: Path) -> Path:
    data = encoded(gradient(200, 150), "JPEG", quality=90)
    (tmp / "cut.jpg").write_bytes(data[: len(data) // 2])
    return tmp / "cut.jpg"


def _text_as_png(tmp: Path) -> Path:
    (tmp / "notes.png").write_text("hello, I am a shopping list, not a picture\n")
    return tmp / "notes.png"


def _huge_header(tmp: Path) -> Path:
    (tmp / "bomb.png").write_bytes(huge_png_header(30000, 30000))
    return tmp / "bomb.png"


BAD_IMAGES = {
    # item: (builder, what the message says). Missing path and a text .png through `chat` are also in
    # test_cli.py::test_missing_and_unreadable_images.
    "missing_path": (_missing, "no such file"),
    "directory": (_directory, "is a directory"),
    "empty_file": (_empty, "empty"),
    "truncated_png": (_truncated_png, "truncated or corrupt"),
    "truncated_jpeg": (_truncated_jpeg, "truncated or corrupt"),
    "non_image_with_image_extension": (_text_as_png, "not an image"),
    "decompression_bomb_header": (_huge_header, "image is 900,000,000 pixels, above the limit of 89,478,485"),
}


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_image_bad_file_chat_ask_ground(monkeypatch, ckpt_tiny, tmp_path, kind):
    """chat, ask and ground refuse the file before the model loads: exit 1, one line naming it."""
    build, problem = BAD_IMAGES[kind]
    path = build(tmp_path)
    for args in (["chat", path, "describe it"], ["ask", path, "what does it say?"], ["ground", path, "the cup"]):
        r = run(monkeypatch, args[0], *model_args(ckpt_tiny), *args[1:])
        assert_one_line_error(r, str(path), problem)


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_image_bad_file_ocr_out_leaves_nothing(monkeypatch, ckpt_tiny, tmp_path, kind):
    """ocr --out: the bad file is reported and skipped, no output file (or temp file) for it; a
    good file next to it is still read, and the run exits 1."""
    build, problem = BAD_IMAGES[kind]
    path = build(tmp_path)
    good = write_image(tmp_path / "good.png", 40, 30, seed=1)
    out = tmp_path / "out"
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 2), "--out", out, path, good)
    if kind in ("missing_path",):  # checked up front, before the model loads: nothing is read at all
        assert_one_line_error(r, str(path), problem)
        assert not out.exists()
        return
    assert r.code == 1 and r.stdout == ""
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and str(path) in errors[0] and problem in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert files_in(out) == ["good.txt"] and leftovers(out) == []


def test_image_bomb_max_pixels_is_refused_before_decoding(monkeypatch, ckpt_tiny, tmp_path):
    """Above MAX_PIXELS (lowered here) the image is refused from its header, without decoding."""
    path = write_image(tmp_path / "big.png", 300, 200)
    monkeypatch.setattr(images_module, "MAX_PIXELS", 50_000)
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or real_load(self))
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny), path, "hi")
    assert_one_line_error(r, str(path), "300x200", "60,000 pixels", "50,000")
    assert decoded == []


def test_image_bomb_huge_header_allocates_nothing(ckpt_tiny, tmp_path):
    """A 30000x30000 PNG header (2.7 GB of RGB) with a tiny body, under an address-space limit of
    what the process already uses + 512 MB: the control allocation fails, the CLI still exits 1
    with its one-line message (no MemoryError, no decode)."""
    resource = pytest.importorskip("resource")
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux)")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(huge_png_header(30000, 30000))
    script = f"""
import resource, sys
from PIL import Image
from dsvl2_cli.app import cli, render, tasks  # the CLI imports these lazily: load them before the limit
import dsvl2_cli.engine.runtime  # and torch, which a local model's command imports after the image opens
vm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize:')) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 512 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    Image.new('RGB', (30000, 30000))
    print('control: allocated', file=sys.stderr)
except MemoryError:
    print('control: MemoryError', file=sys.stderr)
sys.exit(cli.main(['chat', '-m', {str(ckpt_tiny)!r}, '--dtype', 'float32', {str(bomb)!r}, 'hi']))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSVL2_")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert "control: MemoryError" in proc.stderr, proc.stderr  # the limit really bites
    assert proc.returncode == 1, proc.stderr
    rest = proc.stderr.replace("control: MemoryError", "")
    assert proc.stdout == "" and "Traceback" not in rest and "MemoryError" not in rest and "memory" not in rest
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and str(bomb) in errors[0] and "900,000,000 pixels" in errors[0]


def _fifo_writer(path: Path, data: bytes):
    """A FIFO at `path` that a thread fills with `data` (what the shell's `<(cat file)` gives)."""
    import threading

    os.mkfifo(path)

    def write():
        with open(path, "wb") as fh:
            fh.write(data)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_image_from_a_pipe_path(monkeypatch, ckpt_tiny, tmp_path):
    """`dsvl2 chat <(curl ...) "..."`: a FIFO has no size until read and can be read only once; it
    used to be refused as "the file is empty"."""
    picture = write_image(tmp_path / "a.png", 40, 30).read_bytes()
    thread = _fifo_writer(tmp_path / "chat.fifo", picture)
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny, 2), "--json", tmp_path / "chat.fifo", "hi")
    thread.join(5)
    assert r.code == 0, r.stderr
    assert r.json_lines[0]["images"][0]["size"] == [40, 30]
    thread = _fifo_writer(tmp_path / "ocr.fifo", picture)  # ocr sniffs for a PDF first: one read only
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 2), "--json", tmp_path / "ocr.fifo")
    thread.join(5)
    assert r.code == 0, r.stderr
    assert r.json_lines[0]["images"][0]["size"] == [40, 30]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_pdf_from_a_pipe_path(monkeypatch, ckpt_tiny, three_pages, tmp_path):
    thread = _fifo_writer(tmp_path / "doc.fifo", three_pages.read_bytes())
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 2), "--dpi", "36", "--json", "--pages", "2-",
            tmp_path / "doc.fifo")
    thread.join(5)
    assert r.code == 0, r.stderr
    assert [rec["page"] for rec in r.json_lines] == [2, 3]
    thread = _fifo_writer(tmp_path / "empty.fifo", b"")
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 2), tmp_path / "empty.fifo")
    thread.join(5)
    assert_one_line_error(r, "empty.fifo", "empty")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_image_device_is_refused_not_read_forever(monkeypatch, ckpt_tiny, tmp_path):
    for args in (["chat", "/dev/zero", "hi"], ["ocr", "/dev/zero"], ["ground", "/dev/zero", "x"]):
        r = run(monkeypatch, args[0], *model_args(ckpt_tiny, 2), *args[1:])
        assert_one_line_error(r, "/dev/zero", "is a device")


def test_image_endless_stdin_is_cut_off(monkeypatch, ckpt_tiny):
    """stdin (and pipes) are read up to images.MAX_STREAM_BYTES (1 GiB; lowered here)."""
    monkeypatch.setattr(images_module, "MAX_STREAM_BYTES", 1000)
    for args in (["chat", "-", "hi"], ["ocr", "-"], ["ground", "-", "x"]):
        r = run(monkeypatch, args[0], *model_args(ckpt_tiny, 2), *args[1:], input=b"\0" * 5000)
        assert_one_line_error(r, "-: more than 1,000 bytes")


def _animated_gif(tmp: Path) -> Path:
    frames = [Image.new("RGB", (48, 32), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return tmp / "anim.gif"


def _animated_webp(tmp: Path) -> Path:
    from PIL import features

    if not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    frames = [Image.new("RGB", (48, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp / "anim.webp", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    return tmp / "anim.webp"


@pytest.mark.parametrize("build", [_animated_gif, _animated_webp], ids=["animated_gif", "animated_webp"])
def test_image_odd_but_readable_animated_first_frame_said_so(monkeypatch, ckpt_tiny, tmp_path, seen_by_model,
                                                            build):
    path = build(tmp_path)
    assert Image.open(path).is_animated
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny, 2), "--json", path, "hi")
    assert r.code == 0, r.stderr
    assert_clean(r)
    assert f"warning: {path}: animated image, only the first frame is used" in r.stderr
    assert r.json_lines[0]["images"][0]["size"] == [48, 32]
    red, green, blue = seen_by_model[0].getpixel((10, 10))
    assert red > 200 and blue < 50  # the first (red) frame


def _cmyk_jpeg(tmp: Path) -> Path:
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp / "cmyk.jpg", "JPEG", quality=95)  # red
    return tmp / "cmyk.jpg"


def _png16(tmp: Path) -> Path:
    img = Image.new("I;16", (40, 30))
    for x in range(40):
        for y in range(30):
            img.putpixel((x, y), 65535 if x >= 20 else 32768)
    img.save(tmp / "deep.png")
    assert Image.open(tmp / "deep.png").mode.startswith("I")
    return tmp / "deep.png"


def _palette_transparent(tmp: Path) -> Path:
    img = Image.new("P", (40, 30), 1)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * (254 * 3))
    for x in range(20):
        for y in range(30):
            img.putpixel((x, y), 0)  # the transparent (black) index
    img.save(tmp / "pal.png", transparency=0)
    return tmp / "pal.png"


def _la(tmp: Path) -> Path:
    img = Image.new("LA", (40, 30), (10, 255))
    for x in range(20):
        for y in range(30):
            img.putpixel((x, y), (0, 0))  # transparent black
    img.save(tmp / "la.png")
    return tmp / "la.png"


def _rgba(tmp: Path) -> Path:
    img = Image.new("RGBA", (40, 30), (0, 0, 200, 255))
    for x in range(20):
        for y in range(30):
            img.putpixel((x, y), (0, 0, 0, 0))  # transparent black
    img.save(tmp / "rgba.png")
    return tmp / "rgba.png"


def _exif_rotated(tmp: Path) -> Path:
    img = Image.new("RGB", (60, 20), (200, 0, 0))
    img.paste((0, 0, 200), (0, 0, 30, 20))  # left half blue: after rotating 90 CW it is the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp / "rot.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    return tmp / "rot.jpg"


def _one_pixel(tmp: Path) -> Path:
    Image.new("RGB", (1, 1), (9, 99, 199)).save(tmp / "dot.png")
    return tmp / "dot.png"


def _sliver(tmp: Path) -> Path:
    Image.new("RGB", (1, 5000), (9, 99, 199)).save(tmp / "sliver.png")
    return tmp / "sliver.png"


def _wide_sliver(tmp: Path) -> Path:
    Image.new("RGB", (5000, 1), (9, 99, 199)).save(tmp / "wide.png")
    return tmp / "wide.png"


def _check_cmyk(img):
    r, g, b = img.getpixel((20, 15))
    assert r > 200 and g < 60 and b < 60


def _check_png16(img):
    assert 120 <= img.getpixel((5, 5))[0] <= 135 and img.getpixel((30, 5)) == (255, 255, 255)  # scaled, not clipped


def _check_white_left(colour):
    def check(img):
        assert img.getpixel((5, 5)) == (255, 255, 255)  # transparent: composited on white, not black
        assert img.getpixel((30, 5)) == colour
    return check


def _check_solid(img):
    assert set(img.getdata()) == {(9, 99, 199)}


def _check_rotated(img):
    top, bottom = img.getpixel((10, 10)), img.getpixel((10, 50))
    assert top[2] > 150 and top[0] < 80 and bottom[0] > 150 and bottom[2] < 80


ODD_IMAGES = {
    "cmyk_jpeg": (_cmyk_jpeg, (40, 30), _check_cmyk),
    "16bit_png": (_png16, (40, 30), _check_png16),
    "palette_with_transparency": (_palette_transparent, (40, 30), _check_white_left((0, 200, 0))),
    "la_on_white": (_la, (40, 30), _check_white_left((10, 10, 10))),
    "rgba_on_white": (_rgba, (40, 30), _check_white_left((0, 0, 200))),
    "exif_rotation_6": (_exif_rotated, (20, 60), _check_rotated),
    "tiny_1x1": (_one_pixel, (1, 1), _check_solid),
    "extreme_aspect_1x5000": (_sliver, (1, 5000), _check_solid),
    "extreme_aspect_5000x1": (_wide_sliver, (5000, 1), _check_solid),
}


@pytest.mark.parametrize("kind", list(ODD_IMAGES))
def test_image_odd_but_readable(monkeypatch, ckpt_tiny, tmp_path, seen_by_model, kind):
    """Odd colour modes and geometries are answered (exit 0); the model's input is the RGB picture
    as displayed: modes converted, transparency on white, EXIF rotation applied."""
    build, size, check = ODD_IMAGES[kind]
    path = build(tmp_path)
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny, 2), "--json", path, "hi")
    assert r.code == 0, r.stderr
    assert_clean(r)
    (rec,) = r.json_lines
    assert rec["images"][0]["size"] == list(size)
    img = seen_by_model[-1]  # (the chat session prepares the prompt twice: to validate, then to answer)
    assert all(seen.tobytes() == img.tobytes() for seen in seen_by_model)
    assert img.mode == "RGB" and img.size == size
    check(img)


# ==================================================================================== PDFs

@pytest.fixture(scope="module")
def secret_pdf(tmp_path_factory) -> Path:
    return make_pdf(tmp_path_factory.mktemp("secret") / "secret.pdf", pages=2,
                    encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="open sesame", owner_pw="owner")


@pytest.fixture(scope="module")
def three_pages(tmp_path_factory) -> Path:
    return make_pdf(tmp_path_factory.mktemp("three") / "three.pdf", pages=3)


@pytest.mark.parametrize("command", ["ocr", "ask"])
@pytest.mark.parametrize("password, problem", [(None, "encrypted; give its password with --password"),
                                               ("wrong", "wrong password")],
                         ids=["without_password", "wrong_password"])
def test_pdf_encrypted(monkeypatch, ckpt_tiny, secret_pdf, tmp_path, command, password, problem):
    out = tmp_path / "out"
    args = ["--out", out] if command == "ocr" else []
    extra = ["--password", password] if password else []
    tail = [secret_pdf] if command == "ocr" else [secret_pdf, "what is it?"]
    r = run(monkeypatch, command, *model_args(ckpt_tiny, 2), *args, *extra, *tail)
    assert_one_line_error(r, str(secret_pdf), problem)
    assert not out.exists()


def test_pdf_encrypted_with_right_password(monkeypatch, ckpt_tiny, secret_pdf, tmp_path):
    out = tmp_path / "out"
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 2), "--dpi", "36", "--password", "open sesame", "--out", out,
            secret_pdf)
    assert r.code == 0, r.stderr
    assert files_in(out) == ["secret-p001.txt", "secret-p002.txt"] and leftovers(out) == []


def _corrupt(tmp: Path, good: bytes) -> Path:
    (tmp / "corrupt.pdf").write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 8)
    return tmp / "corrupt.pdf"


def _truncated(tmp: Path, good: bytes) -> Path:
    (tmp / "half.pdf").write_bytes(good[: len(good) // 2])
    return tmp / "half.pdf"


def _zero_pages(tmp: Path, good: bytes) -> Path:
    (tmp / "zero.pdf").write_bytes(ZERO_PAGE_PDF)  # pymupdf refuses to save a 0-page document
    return tmp / "zero.pdf"


def _empty_pdf(tmp: Path, good: bytes) -> Path:
    (tmp / "empty.pdf").write_bytes(b"")
    return tmp / "empty.pdf"


def _not_a_pdf(tmp: Path, good: bytes) -> Path:
    (tmp / "letter.pdf").write_text("Dear reader, this is plain text.\n")
    return tmp / "letter.pdf"


BAD_PDFS = {
    "corrupt": (_corrupt, "cannot"),
    "truncated": (_truncated, "truncated"),
    "zero_pages": (_zero_pages, "no pages"),
    "empty_file": (_empty_pdf, "empty"),
    "text_named_pdf": (_not_a_pdf, "cannot open as a PDF"),
}


@pytest.mark.parametrize("kind", list(BAD_PDFS))
def test_pdf_bad_file(monkeypatch, ckpt_tiny, three_pages, tmp_path, kind):
    """Corrupt, truncated, zero-page and empty PDFs: exit 1 before the model loads, for ocr --out
    (nothing written) and ask."""
    build, problem = BAD_PDFS[kind]
    path = build(tmp_path, three_pages.read_bytes())
    out = tmp_path / "out"
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 2), "--out", out, path)
    assert_one_line_error(r, str(path), problem)
    assert not out.exists()
    assert_one_line_error(run(monkeypatch, "ask", *model_args(ckpt_tiny, 2), path, "what is it?"), str(path), problem)


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.8, 0.97])
def test_pdf_truncated_anywhere_is_refused_not_half_read(monkeypatch, ckpt_tiny, three_pages, tmp_path, keep):
    """MuPDF rebuilds a cut-off PDF from what is left (page 2 without its text, page 3 as a blank
    US-letter page...): dsvl2 refuses it instead of reading half a document."""
    data = three_pages.read_bytes()
    path = tmp_path / "cut.pdf"
    path.write_bytes(data[: int(len(data) * keep)])
    out = tmp_path / "out"
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 2), "--dpi", "36", "--out", out, path)
    assert_one_line_error(r, str(path), "truncated")
    assert not out.exists()
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 2), "--dpi", "36", "-", input=data[: int(len(data) * keep)])
    assert_one_line_error(r, "-: ", "truncated")


@pytest.mark.parametrize("spec, problem", [
    ("5-2", "page 5 is out of range"),
    ("3-1", "runs backwards"),
    ("x", "'x' is not a page or a range"),
    ("0", "numbered from 1"),
    ("99", "page 99 is out of range"),
    ("1,,2", "is not a page or a range"),
    ("", "empty page selection"),
])
def test_pdf_page_selection_out_of_range_or_malformed(monkeypatch, ckpt_tiny, three_pages, tmp_path, spec, problem):
    out = tmp_path / "out"
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 2), "--pages", spec, "--out", out, three_pages)
    assert_one_line_error(r, str(three_pages), problem, "the document has 3 pages")
    assert not out.exists()
    r = run(monkeypatch, "ask", *model_args(ckpt_tiny, 2), "--pages", spec, three_pages, "what?")
    assert_one_line_error(r, str(three_pages), problem)


def test_pdf_scanned_page_without_text_layer_is_read(monkeypatch, ckpt_tiny, tmp_path, seen_by_model):
    picture = write_image(tmp_path / "scan.png", 160, 200, seed=4)
    path = tmp_path / "scanned.pdf"
    doc = pymupdf.open()
    doc.new_page(width=200, height=250).insert_image(pymupdf.Rect(0, 0, 200, 250), filename=str(picture))
    doc.save(str(path))
    doc.close()
    with pymupdf.open(str(path)) as check:
        assert check[0].get_text().strip() == ""  # really no text layer
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 3), "--dpi", "72", "--json", path)
    assert r.code == 0, r.stderr
    (rec,) = r.json_lines
    assert rec["page"] == 1 and rec["images"][0]["size"] == [200, 250]
    assert len(set(seen_by_model[-1].getdata())) > 10  # the page was rendered, picture and all (last:
    # the ocr command first plans its prompt with an untiled stand-in, before the model loads)


def test_pdf_huge_page_renders_within_the_cap(monkeypatch, ckpt_tiny, tmp_path):
    """A 20000 x 20000 pt page (about 7 m wide) at --dpi 300 would be 83333 px a side; it renders
    at MAX_SIDE (4096) px instead."""
    path = make_pdf(tmp_path / "poster.pdf", pages=1, size=(20000, 20000))
    fake_model_answer(monkeypatch, "a poster")  # the render is under test, not 10 vision tiles
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 1), "--dpi", "300", "--json", path)
    assert r.code == 0, r.stderr
    w, h = r.json_lines[0]["images"][0]["size"]
    assert max(w, h) <= MAX_SIDE and min(w, h) >= MAX_SIDE - 2


# =========================================================================== model folders

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _no_config(folder: Path) -> tuple[str, str]:
    (folder / "config.json").unlink()
    return "config.json", "not found"


def _bad_json(folder: Path) -> tuple[str, str]:
    (folder / "config.json").write_text('{"model_type": "deepseek_vl_v2", ')
    return "config.json", "not valid JSON"


def _unknown_model_type(folder: Path) -> tuple[str, str]:
    raw = json.loads((folder / "config.json").read_text())
    raw["model_type"] = "mystery_vlm"
    (folder / "config.json").write_text(json.dumps(raw))
    return "config.json", "model_type is 'mystery_vlm'"


def _missing_shard(folder: Path) -> tuple[str, str]:
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    return shard.name, "missing"


def _truncated_header(folder: Path) -> tuple[str, str]:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:40])  # cut inside the JSON header
    return "model.safetensors", "not a readable safetensors file"


def _corrupted_header(folder: Path) -> tuple[str, str]:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8:8 + n] = b"{" + b"\xff" * (n - 1)  # same length, not JSON
    path.write_bytes(bytes(data))
    return "model.safetensors", "not a readable safetensors file"


def _header_claims_exabytes(folder: Path) -> tuple[str, str]:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    return "model.safetensors", "not a readable safetensors file"


def _truncated_data(folder: Path) -> tuple[str, str]:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "model.safetensors", "not a readable safetensors file"


def _wrong_shape(folder: Path) -> tuple[str, str]:
    _rewrite(folder / "model.safetensors", lambda t: t.update(image_newline=torch.zeros(3)))
    return "model.safetensors", "tensor image_newline in model.safetensors has shape [3]"


def _wrong_dtype(folder: Path) -> tuple[str, str]:
    def edit(t):
        t["view_seperator"] = torch.zeros_like(t["view_seperator"], dtype=torch.int32)
    _rewrite(folder / "model.safetensors", edit)
    # (weights.check_tensors names the folder, not model.safetensors, for a wrong dtype)
    return str(folder), "view_seperator in model.safetensors has dtype I32"


def _missing_tensor(folder: Path) -> tuple[str, str]:
    _rewrite(folder / "model.safetensors", lambda t: t.pop("language.model.norm.weight"))
    return str(folder), "missing tensor(s) language.model.norm.weight"


def _no_tokenizer(folder: Path) -> tuple[str, str]:
    (folder / "tokenizer.json").unlink()
    return "tokenizer.json", "not found"


def _bad_tokenizer(folder: Path) -> tuple[str, str]:
    (folder / "tokenizer.json").write_text("[1, 2")
    return "tokenizer.json", "cannot read JSON"


def _llama_config(folder: Path) -> tuple[str, str]:
    """Some other model: a LLaMA config.json and LLaMA-named safetensors."""
    for p in folder.glob("*.safetensors"):
        p.unlink()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 512}))
    save_file({"model.embed_tokens.weight": torch.zeros(512, 64), "lm_head.weight": torch.zeros(512, 64),
               "model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)}, folder / "model.safetensors")
    return "config.json", "not a DeepSeek-VL2 checkpoint"


def _llama_weights_deepseek_config(folder: Path) -> tuple[str, str]:
    """A DeepSeek-VL2 config.json over another model's safetensors."""
    save_file({"model.embed_tokens.weight": torch.zeros(512, 64), "lm_head.weight": torch.zeros(512, 64)},
              folder / "model.safetensors")
    return str(folder), "missing tensor(s)"


MODEL_DEFECTS = {
    # name: (fixture, defect); every message names the file (or the folder, for tensors that are
    # missing/mis-typed across all shards) and what is wrong.
    "missing_config_json": ("ckpt_tiny", _no_config),
    "invalid_json": ("ckpt_tiny", _bad_json),
    "unknown_model_type": ("ckpt_tiny", _unknown_model_type),
    "missing_shard": ("ckpt_vl2", _missing_shard),
    "truncated_safetensors_header": ("ckpt_tiny", _truncated_header),
    "corrupted_safetensors_header": ("ckpt_tiny", _corrupted_header),
    "safetensors_header_length_absurd": ("ckpt_tiny", _header_claims_exabytes),
    "truncated_safetensors_data": ("ckpt_tiny", _truncated_data),
    "tensor_wrong_shape": ("ckpt_tiny", _wrong_shape),
    "tensor_wrong_dtype": ("ckpt_tiny", _wrong_dtype),
    "tensor_missing": ("ckpt_tiny", _missing_tensor),
    "missing_tokenizer_json": ("ckpt_tiny", _no_tokenizer),
    "invalid_tokenizer_json": ("ckpt_tiny", _bad_tokenizer),
    "other_model_llama": ("ckpt_tiny", _llama_config),
    "other_model_weights_under_deepseek_config": ("ckpt_tiny", _llama_weights_deepseek_config),
}


@pytest.mark.parametrize("defect", list(MODEL_DEFECTS))
def test_model_folder(monkeypatch, request, tmp_path, defect):
    fixture, breaker = MODEL_DEFECTS[defect]
    folder = _copy(request.getfixturevalue(fixture), tmp_path / "model")
    names, problem = breaker(folder)
    image = write_image(tmp_path / "a.png", 32, 32)
    r = run(monkeypatch, "chat", *model_args(folder), image, "hi")
    assert_one_line_error(r, names, problem)
    out = tmp_path / "out"
    r = run(monkeypatch, "ocr", *model_args(folder), "--out", out, image)
    assert_one_line_error(r, names, problem)
    assert not out.exists()


@pytest.mark.parametrize("defect", ["missing_config_json", "invalid_json", "unknown_model_type", "other_model_llama"])
def test_model_folder_info(monkeypatch, ckpt_tiny, tmp_path, defect):
    """`dsvl2 info` reads only config.json; its defects are reported the same way."""
    folder = _copy(ckpt_tiny, tmp_path / "model")
    names, problem = MODEL_DEFECTS[defect][1](folder)
    assert_one_line_error(run(monkeypatch, "info", "-m", folder), names, problem)


def test_model_folder_is_a_file(monkeypatch, tmp_path):
    # a missing folder is test_cli.py::test_model_not_found
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    assert_one_line_error(run(monkeypatch, "info", "-m", f), str(f), "is a file")


# ================================================================================= prompts

def test_prompt_longer_than_the_context(monkeypatch, ckpt_tiny, tmp_path):
    """5000 words and an image do not fit the fixture's 4096-token context: exit 1 naming the
    token counts. (Too many images: test_cli.py::test_context_too_long_is_one_line.)"""
    image = write_image(tmp_path / "a.png", 64, 48)
    words = " ".join(f"word{i % 97}" for i in range(5000))
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny), image, words)
    assert_one_line_error(r, "tokens (images 421, text", "but the context holds 4096")
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny), image, input=words)  # the same prompt on stdin
    assert_one_line_error(r, "but the context holds 4096")
    r = run(monkeypatch, "ask", *model_args(ckpt_tiny), image, words)
    assert_one_line_error(r, "but the context holds 4096")


def test_prompt_longer_than_the_context_ocr_out(monkeypatch, ckpt_tiny, tmp_path):
    image = write_image(tmp_path / "a.png", 64, 48)
    out = tmp_path / "out"
    words = " ".join(["lorem"] * 5000)
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny), "--out", out, "-P", words, image)
    assert_one_line_error(r, str(image), "but the context holds 4096")
    assert not out.exists() or (files_in(out) == [] and leftovers(out) == [])


@pytest.mark.parametrize("how", ["option", "argument", "blank_option", "stdin", "stdin_blank"])
def test_prompt_empty(monkeypatch, ckpt_tiny, tmp_path, how):
    image = write_image(tmp_path / "a.png", 32, 32)
    args, stdin = {
        "option": (["-P", "", image], b""),
        "argument": ([image, ""], b"text on stdin is not read when a prompt argument is given\n"),
        "blank_option": (["-P", "  \n ", image], b""),
        "stdin": ([image], b""),
        "stdin_blank": ([image], b"\n\n  \n"),
    }[how]
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny), *args, input=stdin)
    assert_one_line_error(r, "empty prompt")


def test_prompt_empty_without_images(monkeypatch, ckpt_tiny):
    assert_one_line_error(run(monkeypatch, "chat", *model_args(ckpt_tiny), "-P", ""), "empty prompt")
    assert_one_line_error(run(monkeypatch, "ask", *model_args(ckpt_tiny), "x.png", "  "), "empty question")
    r = run(monkeypatch, "ground", *model_args(ckpt_tiny), "x.png", " ")
    assert r.code == 2 and r.stdout == "" and "Traceback" not in r.stderr  # a usage error: say what to find


@pytest.mark.parametrize("prompt, n_images, needle", [
    ("<image> and <image>: compare", 1, "2 <image> placeholder(s) but 1 image(s)"),
    ("What is in <image>?", 0, "1 <image> placeholder(s) but 0 image(s)"),
    ("Only <image> here", 2, "1 <image> placeholder(s) but 2 image(s)"),
])
def test_prompt_image_placeholder_count_mismatch(monkeypatch, ckpt_tiny, tmp_path, prompt, n_images, needle):
    # (also test_cli_conversation.py::test_placeholders_in_plain_prompt and ::test_bad_conversation_exits_1_...)
    paths = [write_image(tmp_path / f"{i}.png", 32, 32, seed=i) for i in range(n_images)]
    assert_one_line_error(run(monkeypatch, "chat", *model_args(ckpt_tiny), "-P", prompt, *paths), needle)
    if n_images:
        assert_one_line_error(run(monkeypatch, "ask", *model_args(ckpt_tiny), *paths, prompt), needle)


# ================================================================================== output

def _interrupt_on_call(monkeypatch, n: int, partial: str = "") -> None:
    """backends.stream_generate: whole answers ("page text"), except the n-th call yields `partial`
    then Ctrl-C."""
    calls = {"n": 0}

    def gen(vlm, prepared, config=None, prompt_cache=None):
        calls["n"] += 1
        if calls["n"] == n:
            yield Prefilled(int(prepared.input_ids.numel()), 0, 421, 0.01)
            if partial:
                yield Token(5, partial)
            raise KeyboardInterrupt
        yield from answer_events(vlm, prepared, "page text")

    monkeypatch.setattr(backends, "stream_generate", gen)


def test_output_out_files_are_atomic_when_interrupted(monkeypatch, ckpt_tiny, three_pages, tmp_path):
    """Ctrl-C while page 2 is being read: exit 130, page 1's file complete, no page-2 file, no temp."""
    real = backends.stream_generate
    _interrupt_on_call(monkeypatch, 2, "half of page two")
    out = tmp_path / "out"
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 3), "--dpi", "36", "--batch", "1", "--out", out, three_pages)
    assert r.code == 130, r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr and "interrupted" in r.stderr
    assert files_in(out) == ["three-p001.txt"] and leftovers(out) == []
    assert (out / "three-p001.txt").read_text() == "page text\n"
    # the run resumes where it stopped (with the real model this time)
    monkeypatch.setattr(backends, "stream_generate", real)
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 3), "--dpi", "36", "--out", out, "--skip-existing", three_pages)
    assert r.code == 0, r.stderr
    assert files_in(out) == ["three-p001.txt", "three-p002.txt", "three-p003.txt"] and leftovers(out) == []


def test_output_interrupted_while_writing_the_file(monkeypatch, ckpt_tiny, three_pages, tmp_path):
    """Ctrl-C inside the write of page 2's file (after its temp file exists): exit 130, the temp
    file is removed and page 2's file does not exist."""
    real_fsync, calls = os.fsync, {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:
            assert any(p.name.endswith(".part") for p in (tmp_path / "out").iterdir())
            raise KeyboardInterrupt
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fake_model_answer(monkeypatch, "page text")
    out = tmp_path / "out"
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 2), "--dpi", "36", "--batch", "1", "--out", out, three_pages)
    assert r.code == 130 and "Traceback" not in r.stderr
    assert files_in(out) == ["three-p001.txt"] and leftovers(out) == []


def test_output_ctrl_c_while_streaming_ocr_flushes(monkeypatch, ckpt_tiny, three_pages):
    """Streaming OCR to stdout: page 1 whole, page 2's partial text on a finished line, exit 130.
    (chat: test_cli.py::test_ctrl_c_flushes_what_was_generated; a real SIGINT:
    test_cli_e2e.py::test_sigint_at_the_chat_prompt_exits_130.)"""
    _interrupt_on_call(monkeypatch, 2, "partial text")
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 3), "--dpi", "36", "--batch", "1", three_pages)
    assert r.code == 130 and "Traceback" not in r.stderr and "interrupted" in r.stderr
    assert r.stdout.startswith(f"==> {three_pages} page 1 <==\npage text\n")
    assert r.stdout.endswith(f"==> {three_pages} page 2 <==\npartial text\n")
    assert "page 3" not in r.stdout


def test_output_ctrl_c_while_streaming_ask_flushes(monkeypatch, ckpt_tiny, three_pages):
    _interrupt_on_call(monkeypatch, 1, "the answer so f")
    r = run(monkeypatch, "ask", *model_args(ckpt_tiny, 3), "--dpi", "36", "--pages", "1", three_pages, "what?")
    assert r.code == 130 and r.stdout == "the answer so f\n" and "Traceback" not in r.stderr


def test_output_ctrl_c_while_loading_the_model(monkeypatch, ckpt_tiny, tmp_path):
    def interrupted(path, *, device, dtype, quantize=None, on_progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_weights", interrupted)
    out = tmp_path / "out"
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny), "--out", out, write_image(tmp_path / "a.png", 20, 20))
    assert r.code == 130 and r.stdout == "" and "Traceback" not in r.stderr
    assert not out.exists()


def test_output_closed_stdout_pipe_ends_quietly(ckpt_tiny, tmp_path):
    """`dsvl2 ocr doc.pdf | head -c 1`: the reader takes one byte and goes; the next write gets
    EPIPE and dsvl2 exits 141 (128 + SIGPIPE, as `head` pipelines expect) with nothing on stderr
    but its usual status lines. (Closed before the first byte: test_cli_e2e.py.)"""
    pdf = make_pdf(tmp_path / "doc.pdf", pages=4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSVL2_")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "dsvl2_cli", "ocr", "-m", str(ckpt_tiny), "--dtype", "float32",
                             "--max-tokens", "4", "--dpi", "36", "--batch", "1", str(pdf)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.read(1)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert first == b"="  # the first page's header had started
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err
    assert "error:" not in err


# ================================================================================= parsing

ADVERSARIAL = [
    "<|ref|>../../etc/x<|/ref|><|det|>[[10, 20, 300, 400]]<|/det|>",
    "<|ref|>__import__('os').system('touch PWNED')<|/ref|><|det|>[[eval('1'), 2, 3, 4]]<|/det|>",
    "<|det|>[[" + "9" * 5000 + ", -1e999, nan, inf]]<|det|><|ref|><|/det|>]]]]]][[[[",
    "<|ref|>\x00\udcff\u202e<|/ref|><|det|>[[1,2,3,4],[5,6,7]]<|/det|>==> evil.pdf page 9 <==",
    "<|grounding|><|/ref|><|/det|>" * 50,
]


@pytest.mark.parametrize("answer", ADVERSARIAL, ids=[f"answer{i}" for i in range(len(ADVERSARIAL))])
def test_parsing_grounding_answer_never_evaluated_or_written(monkeypatch, ckpt_tiny, tmp_path, answer):
    """Whatever the model answers, `ground` parses it without evaluating anything, exits 0,
    writes only the --save file the user named, and reports what it could not read."""
    monkeypatch.chdir(tmp_path)
    answer = answer.encode("utf-8", "replace").decode("utf-8", "replace")
    fake_model_answer(monkeypatch, answer)
    image = write_image(tmp_path / "scene.png", 120, 90)
    saved = tmp_path / "boxes.png"
    r = run(monkeypatch, "ground", *model_args(ckpt_tiny), "--json", "--save", saved, image, "the cup")
    assert r.code == 0, r.stderr
    assert_clean(r)
    (rec,) = r.json_lines
    for b in rec["boxes"]:
        x1, y1, x2, y2 = b["box_999"]
        assert 0 <= x1 <= x2 <= 999 and 0 <= y1 <= y2 <= 999
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["boxes.png", "scene.png"]  # no PWNED, no x
    assert not (tmp_path / "../../etc/x").resolve().exists()
    r = run(monkeypatch, "ground", *model_args(ckpt_tiny), image, "the cup")  # plain text output too
    assert r.code == 0 and "Traceback" not in r.stderr


def test_parsing_ocr_output_with_paths_and_page_markers(monkeypatch, ckpt_tiny, three_pages, tmp_path):
    """OCR text that looks like paths or page markers is only text: file names come from the
    input's name and page number, never from model output."""
    monkeypatch.chdir(tmp_path)
    text = "==> ../../escape.txt page 1 <==\n/tmp/../../etc/passwd\n<|ref|>x<|/ref|>"
    fake_model_answer(monkeypatch, text)
    out = tmp_path / "out"
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny), "--dpi", "36", "--pages", "2", "--out", out, three_pages)
    assert r.code == 0, r.stderr
    assert files_in(out) == ["three-p002.txt"] and leftovers(out) == []
    assert (out / "three-p002.txt").read_text() == text + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ================================================================================ security

class _Marker:
    """Unpickling this creates the file `path` (open(path, "w")): proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_security_pickle_only_folder_is_refused_unopened(monkeypatch, ckpt_tiny, tmp_path):
    marker = tmp_path / "UNPICKLED"
    folder = _copy(ckpt_tiny, tmp_path / "model")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker(marker)))
    pickle.loads((folder / "pytorch_model.bin").read_bytes()).close()  # the trap works...
    marker.unlink()
    r = run(monkeypatch, "chat", *model_args(folder), "hi")
    assert_one_line_error(r, "pytorch_model.bin", "safetensors only", "never unpickles")
    assert not marker.exists()  # ...and was never sprung


def test_security_pickle_next_to_safetensors_is_ignored(monkeypatch, ckpt_tiny, tmp_path):
    marker = tmp_path / "UNPICKLED"
    folder = _copy(ckpt_tiny, tmp_path / "model")
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (folder / name).write_bytes(pickle.dumps(_Marker(marker)))
    r = run(monkeypatch, "chat", *model_args(folder, 2), "hi")
    assert r.code == 0, r.stderr
    assert not marker.exists()


def test_security_remote_code_is_never_imported(monkeypatch, ckpt_tiny, tmp_path):
    """modeling_*.py / configuration_*.py in the folder and auto_map in config.json: loaded,
    answered, and not one line of the folder's Python ran."""
    marker = tmp_path / "IMPORTED"
    folder = _copy(ckpt_tiny, tmp_path / "model")
    payload = f"open({str(marker)!r}, 'w').close()\n"
    for name in ("modeling_deepseek.py", "configuration_deepseek.py", "modeling_deepseek_vl_v2.py",
                 "processing_deepseek_vl_v2.py", "__init__.py"):
        (folder / name).write_text(payload)
    raw = json.loads((folder / "config.json").read_text())
    raw["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                       "AutoModelForCausalLM": "modeling_deepseek_vl_v2.DeepseekVLV2ForCausalLM"}
    raw["trust_remote_code"] = True
    (folder / "config.json").write_text(json.dumps(raw))
    image = write_image(tmp_path / "a.png", 32, 32)
    before = set(sys.modules)
    r = run(monkeypatch, "chat", *model_args(folder, 2), image, "hi")
    assert r.code == 0, r.stderr
    assert run(monkeypatch, "info", "-m", folder).code == 0
    assert not marker.exists()
    assert not [m for m in set(sys.modules) - before if "deepseek" in m or "processing_" in m]


def test_security_downloads_fetch_no_code_or_pickles():
    """`dsvl2 pull` / hub downloads take JSON, safetensors and tokenizer files only."""
    from huggingface_hub.utils import (
        filter_repo_objects,  # what snapshot_download filters with
    )

    def fetched(name):
        return list(filter_repo_objects([name], allow_patterns=hub.ALLOW_PATTERNS,
                                        ignore_patterns=getattr(hub, "IGNORE_PATTERNS", None))) == [name]

    for name in ("config.json", "model.safetensors", "model-00001-of-000002.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "processor_config.json", "model.safetensors.index.json"):
        assert fetched(name), name
    for name in ("pytorch_model.bin", "modeling_deepseek.py", "configuration_deepseek.py", "model.ckpt",
                 "training_args.bin", "optimizer.pt", "tokenizer_remote.py", "tokenizer.pkl", "tokenizer.bin"):
        assert not fetched(name), name


def test_security_no_unsafe_loaders_in_the_source():
    """No pickle, torch.load, eval/exec or remote-code switches anywhere in the package."""
    import re

    bad = re.compile(r"\bimport pickle\b|\bpickle\.|\btorch\.load\(|(?<![.\w])eval\(|(?<![.\w])exec\(|"
                     r"trust_remote_code\s*=\s*True|import_module\(|__import__\(|\brunpy\b|spec_from_file_location")
    hits = [f"{p.name}:{i}: {line.strip()}" for p in sorted((REPO / "dsvl2_cli").glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert hits == []


def test_security_save_path_comes_from_the_user_only(monkeypatch, ckpt_tiny, tmp_path):
    """--save writes exactly the path given; a label naming a path is drawn, not written to."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    fake_model_answer(monkeypatch, f"<|ref|>{target}<|/ref|><|det|>[[1, 2, 300, 400]]<|/det|>")
    image = write_image(tmp_path / "scene.png", 100, 80)
    r = run(monkeypatch, "ground", *model_args(ckpt_tiny), "--save", tmp_path / "drawn.png", image, "x")
    assert r.code == 0, r.stderr
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drawn.png", "scene.png", "victim.txt"]
    # --save into a folder that cannot be written: one line, nothing left behind
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    r = run(monkeypatch, "ground", *model_args(ckpt_tiny), "--save", blocker / "x.png", image, "x")
    assert_one_line_error(r, "blocker", "cannot write")
