"""Image loading: odd modes become RGB, bad files become one-line ImageErrors."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from dsvl2_cli.app.inputs import images
from dsvl2_cli.app.inputs.images import load_image, load_image_with_notes
from dsvl2_cli.errors import ImageError


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _save(tmp_path: Path, name: str, img: Image.Image, fmt: str | None = None, **kw) -> Path:
    path = tmp_path / name
    img.save(path, fmt, **kw)
    return path


def _gradient(w: int = 64, h: int = 48) -> Image.Image:
    img = Image.new("RGB", (w, h))
    img.putdata([((x * 4) % 256, (y * 5) % 256, 100) for y in range(h) for x in range(w)])
    return img


def _error(source) -> str:
    with pytest.raises(ImageError) as err:
        load_image(source)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# --- bad inputs --------------------------------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    msg = _error(path)
    assert str(path) in msg and "no such file" in msg


def test_directory(tmp_path: Path) -> None:
    assert "directory" in _error(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    msg = _error(path)
    assert str(path) in msg and "empty" in msg


def test_text_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello, I am not a picture\n")
    msg = _error(path)
    assert str(path) in msg and "not an image" in msg


@pytest.mark.parametrize("fmt,name", [("PNG", "cut.png"), ("JPEG", "cut.jpg")])
def test_truncated(tmp_path: Path, fmt: str, name: str) -> None:
    data = _png_bytes(_gradient(200, 150), fmt)
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    msg = _error(path)
    assert str(path) in msg and "truncated or corrupt" in msg


def test_truncated_bytes_source() -> None:
    data = _png_bytes(_gradient(200, 150))
    assert "<bytes>" in _error(data[: len(data) // 2])


def test_wrong_source_type() -> None:
    assert "int" in _error(42)


# --- sources ------------------------------------------------------------------------------------

def test_bytes_and_stream_sources(tmp_path: Path) -> None:
    data = _png_bytes(_gradient())
    assert load_image(data).size == (64, 48)
    stream = io.BytesIO(data)
    img = load_image(stream)
    assert img.size == (64, 48) and img.mode == "RGB"
    path = tmp_path / "a.png"
    path.write_bytes(data)
    assert load_image(str(path)).tobytes() == _gradient().tobytes()


# --- colour modes -------------------------------------------------------------------------------

def test_rgba_transparent_becomes_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    img.putpixel((0, 0), (0, 0, 0, 0))           # fully transparent black
    img.putpixel((1, 0), (0, 0, 0, 128))         # half transparent black -> grey
    out = load_image(_save(tmp_path, "a.png", img))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert all(120 <= c <= 135 for c in out.getpixel((1, 0)))
    assert out.getpixel((2, 2)) == (255, 0, 0)


def test_la_transparent_becomes_white(tmp_path: Path) -> None:
    img = Image.new("LA", (3, 3), (10, 255))
    img.putpixel((0, 0), (0, 0))
    out = load_image(_save(tmp_path, "la.png", img))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (10, 10, 10)


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (3, 3), 1)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    img.putpixel((0, 0), 0)
    out = load_image(_save(tmp_path, "p.png", img, transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((2, 2)) == (0, 255, 0)


def test_plain_palette_and_grey_and_bilevel(tmp_path: Path) -> None:
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * (254 * 3))
    assert load_image(_save(tmp_path, "p.png", pal)).getpixel((1, 1)) == (10, 20, 30)
    assert load_image(_save(tmp_path, "l.png", Image.new("L", (2, 2), 77))).getpixel((0, 0)) == (77, 77, 77)
    one = Image.new("1", (8, 2), 1)
    assert load_image(_save(tmp_path, "one.png", one)).getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = load_image(_save(tmp_path, "c.jpg", img, "JPEG", quality=95))
    r, g, b = out.getpixel((8, 8))
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    img = Image.new("I;16", (3, 1))
    for x, v in enumerate((0, 32768, 65535)):
        img.putpixel((x, 0), v)
    path = _save(tmp_path, "g16.png", img)
    assert Image.open(path).mode.startswith("I")
    out = load_image(path)
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert 126 <= out.getpixel((1, 0))[0] <= 129  # clipping would give 255
    assert out.getpixel((2, 0)) == (255, 255, 255)


# --- geometry and frames -----------------------------------------------------------------------

def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = _gradient(60, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = _save(tmp_path, "rot.jpg", img, "JPEG", exif=exif.tobytes())
    assert Image.open(path).size == (60, 20)
    assert load_image(path).size == (20, 60)


def test_animated_gif_first_frame_and_note(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    img, notes = load_image_with_notes(path)
    r, g, b = img.getpixel((4, 4))
    assert r > 200 and b < 50
    assert len(notes) == 1 and "first frame" in notes[0]
    assert load_image(path).info["dsvl2_notes"] == notes
    _, still_notes = load_image_with_notes(_save(tmp_path, "still.gif", frames[0]))
    assert still_notes == []


@pytest.mark.parametrize("size", [(1, 1), (1, 5000), (5000, 1)])
def test_tiny_and_extreme_aspect(tmp_path: Path, size: tuple[int, int]) -> None:
    out = load_image(_save(tmp_path, "x.png", Image.new("RGB", size, (1, 2, 3))))
    assert out.size == size and out.getpixel((0, 0)) == (1, 2, 3)


def test_decompression_bomb_refused_before_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path, "big.png", Image.new("L", (300, 200)))
    monkeypatch.setattr(images, "MAX_PIXELS", 50_000)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self))
    msg = _error(path)
    assert "300x200" in msg and "60,000 pixels" in msg and "50,000" in msg
    assert decoded == []  # refused from the header alone
    monkeypatch.undo()
    assert load_image(path).size == (300, 200)


def test_pillow_bomb_error_becomes_image_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path, "big.png", Image.new("L", (300, 200)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # Pillow raises above 2x its limit
    msg = _error(path)
    assert "pixels" in msg and str(path) in msg
