"""Image loading: any file Pillow reads, turned into one RGB picture the processor can tile.

Paths, bytes and binary streams (stdin) are accepted; a pipe (a FIFO such as the shell's `<(...)`,
or stdin) is read once, up to MAX_STREAM_BYTES, and devices (/dev/zero, a terminal) are refused.
EXIF orientation is applied, transparency is composited on white, 16-bit and float images are
scaled to 8 bits, animated files give their first frame. Every failure a user can cause is an
`ImageError` with a one-line message.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import sys
import threading
import warnings
from pathlib import Path
from typing import BinaryIO, Union

from PIL import Image, ImageOps, UnidentifiedImageError

from ...errors import ImageError

# Refuse images above this many pixels before decoding them (Pillow's own default bomb limit,
# ~89.5M pixels, about 9500 x 9500). Tests lower it with monkeypatch.
MAX_PIXELS = 89_478_485
# A pipe, FIFO (`<(...)`) or stdin is read up to this many bytes; a file on disk is bounded by its size.
MAX_STREAM_BYTES = 1 << 30

ImageSource = Union[str, Path, bytes, bytearray, BinaryIO]

_HINT = "use a PNG, JPEG, WebP, GIF, BMP or TIFF image"


def load_image(source: ImageSource, name: str | None = None) -> Image.Image:
    """Open `source` as an RGB image; notes (e.g. "animated: first frame used") go to
    `img.info["dsvl2_notes"]` (a list of strings, empty when there is nothing to say)."""
    img, notes = load_image_with_notes(source, name)
    img.info["dsvl2_notes"] = notes
    return img


def load_image_with_notes(source: ImageSource, name: str | None = None) -> tuple[Image.Image, list[str]]:
    """Open `source` as a fully decoded RGB image and return it with notes for the user.

    `source` is a path, the file's bytes, or a binary file object (stdin is read to the end).
    Raises ImageError for a missing path, a directory, an empty/truncated/corrupt file, a
    non-image, or an image above MAX_PIXELS (checked from the header, before decoding).
    `name` is how messages refer to the image (default: the path, or "<bytes>").
    """
    source_name, data = _read_source(source)
    name = name or source_name
    if not data:
        raise ImageError(f"{name}: the file is empty; {_HINT}")
    notes: list[str] = []
    with warnings.catch_warnings():
        # Pillow warns above its own limit (our _check_pixels below says it better, with the
        # size) and raises above twice that; keep the warning off the user's terminal.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:  # above twice Pillow's limit: its header said so
            count = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(count.group(1)):,} pixels" if count else "too many pixels"
            raise ImageError(f"{name}: image is {size}, above the limit of {MAX_PIXELS:,} pixels; "
                             "refused without decoding it, resize it first") from exc
        except UnidentifiedImageError as exc:
            raise ImageError(f"{name}: not an image or an unsupported format; {_HINT}") from exc
        except Exception as exc:  # Pillow plugins raise many types for corrupt headers
            raise ImageError(f"{name}: cannot read the image header ({_describe(exc)}); {_HINT}") from exc
        _check_pixels(name, img.size)
        if getattr(img, "is_animated", False):
            notes.append(f"{name}: animated image, only the first frame is used")
        try:
            img.seek(0)
            img.load()  # force the full decode so truncated or corrupt data is caught here
        except Exception as exc:
            raise ImageError(f"{name}: the image data is truncated or corrupt ({_describe(exc)}); "
                             "re-export or re-download the file") from exc
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # a broken EXIF block should not make a readable picture unusable
        notes.append(f"{name}: unreadable EXIF orientation ignored")
    return _to_rgb(name, img), notes


def _read_source(source: ImageSource) -> tuple[str, bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>", bytes(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = str(source)
        st = stat_path(name)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"{name}: is a directory, not an image file")
        try:
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):  # /dev/zero, a terminal...
                raise ImageError(f"{name}: is a device, not an image file")
            if stat.S_ISREG(st.st_mode):
                if st.st_size == 0:
                    return name, b""
                with path.open("rb") as fh:
                    return name, fh.read()
            return name, read_fifo(path, name)  # a FIFO or pipe (/dev/fd/N from `<(...)`): no size until read
        except OSError as exc:
            raise ImageError(f"{name}: cannot read the file ({exc.strerror or exc})") from exc
    if hasattr(source, "read"):
        name = str(getattr(source, "name", "<stream>"))
        try:
            data = read_capped(source, name)
        except OSError as exc:
            raise ImageError(f"{name}: cannot read the stream ({exc})") from exc
        if isinstance(data, str):
            raise ImageError(f"{name}: opened in text mode; pass a binary stream (e.g. sys.stdin.buffer)")
        return name, bytes(data)
    raise ImageError(f"cannot open an image from a {type(source).__name__}; pass a path, bytes or a binary file")


WAIT_NOTICE_S = 0.5  # a FIFO whose writer has not come by then gets a notice on stderr


def stat_path(name: str) -> os.stat_result:
    """os.stat of a path the user gave, or an ImageError that says what is wrong with it."""
    try:
        return os.stat(name)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # Path.exists() says False here: "no such file" would mislead
            raise ImageError(f"{name}: symbolic link loop; fix or remove the link") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise ImageError(f"{name}: no such file; check the path") from None
        raise ImageError(f"{name}: cannot read the file ({exc.strerror or exc})") from None


def read_fifo(path: str | Path, name: str, error: type[Exception] = ImageError) -> bytes:
    """All of a FIFO's or pipe's input. Opening a FIFO waits for a writer; when none has come
    within half a second, say so on stderr (once), so that `dsvl2 ocr my.fifo` with no writer is
    not a silent hang. (A non-blocking probe cannot tell "no writer yet" from "a writer came and
    went", so the open itself is the rendezvous, as for `cat`.)"""
    timer = threading.Timer(WAIT_NOTICE_S, lambda: (sys.stderr.write(f"waiting for input on {name} ...\n"),
                                                    sys.stderr.flush()))
    timer.daemon = True
    timer.start()
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise error(f"{name}: cannot read ({exc.strerror or exc})") from None
    finally:
        timer.cancel()
    with fh:
        try:
            return read_capped(fh, name, error)
        except OSError as exc:
            raise error(f"{name}: cannot read ({exc.strerror or exc})") from None


def read_capped(stream: BinaryIO, name: str, error: type[Exception] = ImageError) -> bytes:
    """All of a stream that has no size (pipe, FIFO, stdin), refused above MAX_STREAM_BYTES."""
    data = stream.read(MAX_STREAM_BYTES + 1)
    if data is not None and len(data) > MAX_STREAM_BYTES:
        raise error(f"{name}: more than {MAX_STREAM_BYTES:,} bytes of input; refused (no image or PDF is that "
                    "large)")
    return data


def _check_pixels(name: str, size: tuple[int, int]) -> None:
    w, h = size
    if w * h > MAX_PIXELS:
        raise ImageError(f"{name}: image is {w}x{h} = {w * h:,} pixels, above the limit of "
                         f"{MAX_PIXELS:,} pixels; resize it first")
    if w < 1 or h < 1:
        raise ImageError(f"{name}: image has no pixels ({w}x{h})")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _to_rgb(name: str, img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _deep_to_l(img)
        img.info.pop("transparency", None)  # a 16-bit colour key means nothing at 8 bits
        mode = "L"
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        if mode == "RGB":
            return img
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{name}: cannot convert colour mode {mode} to RGB ({exc}); {_HINT}") from exc


def _deep_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float greyscale -> 8-bit, scaled rather than clipped."""
    if img.mode == "F":
        lo, hi = img.getextrema()
        scale = 255.0 if hi <= 1.0 else 255.0 / 65535 if hi <= 65535 else 255.0 / hi
        return img.point(lambda v: v * scale).convert("L")
    if img.mode != "I":
        img = img.convert("I")  # every I;16 variant widens losslessly to 32-bit
        scale = 255.0 / 65535
    else:
        lo, hi = img.getextrema()
        scale = 1.0 if hi <= 255 else 255.0 / 65535 if hi <= 65535 else 255.0 / hi
    return img.point(lambda v: v * scale).convert("L")
