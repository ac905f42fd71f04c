"""Reliability through the CLI, images and PDFs: every bad or odd image and PDF input of the
hardening issue (map: test_reliability.py's docstring) gives one `error: ...` line naming the file
and what is wrong, an empty stdout and no partial output; odd but readable ones are read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pymupdf
import pytest
from helpers import write_pdf
from PIL import Image
from reliability_support import (
    ZERO_PAGE_PDF,
    encoded,
    fake_model_answer,
    files_in,
    gradient,
    huge_png_header,
    leftovers,
    make_pdf,
    seen_by_model,  # noqa: F401 - fixture
    three_pages,  # noqa: F401 - fixture
)
from subprocess_env import subprocess_env
from test_cli import _isolated, assert_clean, assert_one_line_error, model_args, run  # noqa: F401 - fixture

from dsvl2_cli.app.inputs import images as images_module
from dsvl2_cli.app.inputs.pdf import MAX_SIDE
from dsvl2_cli.dev.synthetic import write_image

pytestmark = pytest.mark.usefixtures("_isolated")


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
from dsvl2_cli.app import tasks
from dsvl2_cli.app.terminal import cli, render  # the CLI imports these lazily: load them before the limit
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
    env = subprocess_env()
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
    path = write_pdf(tmp_path / "scanned.pdf", [("", picture)], (200, 250))
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
