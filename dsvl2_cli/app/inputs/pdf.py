"""PDF pages as images (PyMuPDF), the `--pages` range parser and the `--dpi` check. Turning
files, PDFs and stdin into the list of pages a command reads is inputs.py's job.

Every problem a user can cause is an `InputError` (a Dsvl2Error) with a one-line message:
an encrypted file without or with a wrong password (naming `--password`), a corrupt, truncated
(no %%EOF at its end, even where MuPDF could rebuild part of it) or empty file, a document with
no pages, a malformed or out-of-range page selection (stating the document's page count).
Pages are rendered at the requested dpi but never above `MAX_SIDE` pixels on their long side,
whatever the page size.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import InputError

if TYPE_CHECKING:  # PIL loads when a page renders: the CLI reads DEFAULT_DPI for its --help
    from PIL import Image

DEFAULT_DPI = 144
MAX_SIDE = 4096
MIN_DPI, MAX_DPI = 18, 1200

_RANGE = re.compile(r"^\s*([0-9]*)\s*(-?)\s*([0-9]*)\s*$", re.ASCII)


def parse_pages(spec: str, page_count: int) -> list[int]:
    """'1-3,7' -> [1, 2, 3, 7]: 1-based page numbers in the order given, without repeats.

    Items are separated by commas: "N" one page, "A-B" a range, "A-" to the last page, "-B" from
    the first. Raises InputError (and nothing else) for anything malformed or out of range; the
    message states the document's page count.
    """
    count = page_count if isinstance(page_count, int) and page_count > 0 else 0
    has = f"the document has {count} page{'s' if count != 1 else ''}"
    shown = repr(spec) if isinstance(spec, str) and len(spec) <= 40 else "the page selection"
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"--pages: empty page selection; use e.g. 1-3,7 ({has})")
    if count == 0:
        raise InputError(f"--pages {shown}: {has}")
    pages: list[int] = []
    seen: set[int] = set()
    for item in spec.split(","):
        m = _RANGE.match(item)
        valid = m and ((m.group(2) and (m.group(1) or m.group(3))) or (m.group(1) and not m.group(3)))
        if not valid:
            raise InputError(f"--pages {shown}: {_short(item)!r} is not a page or a range like 2-5 "
                             f"or 3- ({has})")
        first_s, dash, last_s = m.groups()
        if not dash:
            first = last = _number(first_s, shown, has)
        else:
            first = _number(first_s, shown, has) if first_s else 1
            last = _number(last_s, shown, has) if last_s else count
        if first < 1 or last < 1:
            raise InputError(f"--pages {shown}: pages are numbered from 1 ({has})")
        if first > count or last > count:
            raise InputError(f"--pages {shown}: page {max(first, last)} is out of range ({has})")
        if first > last:
            raise InputError(f"--pages {shown}: range {first}-{last} runs backwards; write {last}-{first} ({has})")
        for p in range(first, last + 1):
            if p not in seen:
                seen.add(p)
                pages.append(p)
    return pages


def _number(text: str, shown: str, has: str) -> int:
    if len(text.lstrip("0")) > 9:  # no document has a billion pages; avoids huge ints
        raise InputError(f"--pages {shown}: page {_short(text)} is out of range ({has})")
    return int(text)


def _short(text: str, limit: int = 20) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_pdf(data_or_path: bytes | str | Path) -> bool:
    """True for a file (or bytes) that starts like a PDF, or a path ending in .pdf."""
    if isinstance(data_or_path, (bytes, bytearray)):
        return b"%PDF-" in bytes(data_or_path[:1024])
    path = Path(data_or_path)
    if path.suffix.lower() == ".pdf":
        return True
    try:
        if not path.is_file():  # never sniff a pipe or a device: that would drain or block it
            return False
        with path.open("rb") as fh:
            return b"%PDF-" in fh.read(1024)
    except OSError:
        return False


def _quiet_mupdf(pymupdf) -> None:
    # MuPDF prints its own errors and warnings to stderr; ours say it in one line instead.
    try:
        pymupdf.TOOLS.mupdf_display_errors(False)
        pymupdf.TOOLS.mupdf_display_warnings(False)
    except Exception:  # noqa: BLE001 - older PyMuPDF: keep its messages
        pass


class PdfDocument:
    """An opened (and if needed unlocked) PDF. Use as a context manager or call close()."""

    def __init__(self, source: str | Path | bytes, password: str | None = None, name: str | None = None):
        import pymupdf

        _quiet_mupdf(pymupdf)
        self.name = name or ("<stdin>" if isinstance(source, (bytes, bytearray)) else str(source))
        if not isinstance(source, (bytes, bytearray)):
            path = Path(source)
            if not path.exists():
                raise InputError(f"{self.name}: no such file; check the path")
            if path.is_dir():
                raise InputError(f"{self.name}: is a directory, not a PDF file")
        try:
            if isinstance(source, (bytes, bytearray)):
                if not source:
                    raise InputError(f"{self.name}: the file is empty")
                self._doc = pymupdf.open(stream=bytes(source), filetype="pdf")
            else:
                self._doc = pymupdf.open(str(source), filetype="pdf")
        except InputError:
            raise
        except pymupdf.EmptyFileError:
            raise InputError(f"{self.name}: the file is empty") from None
        except Exception as exc:  # noqa: BLE001 - FileDataError, RuntimeError, OSError...
            raise InputError(f"{self.name}: cannot open as a PDF, the file is corrupt, truncated or not "
                             f"a PDF ({_first_line(exc)})") from None
        if getattr(self._doc, "is_repaired", False) and not _ends_like_a_pdf(source):
            # MuPDF rebuilds a cut-off file from what is left and renders the lost pages blank
            # (or drops them): refuse rather than read half a document.
            self.close()
            raise InputError(f"{self.name}: the PDF is truncated (it does not end with %%EOF; an unfinished "
                             "download or copy?); get the complete file")
        if self._doc.needs_pass:
            if password is None:
                self.close()
                raise InputError(f"{self.name}: the PDF is encrypted; give its password with --password")
            if not self._doc.authenticate(password):
                self.close()
                raise InputError(f"{self.name}: wrong password for this encrypted PDF; check --password")
        try:
            self.page_count = int(self._doc.page_count)
        except Exception as exc:  # noqa: BLE001
            self.close()
            raise InputError(f"{self.name}: cannot read the page list, the PDF is corrupt ({_first_line(exc)})") from None
        if self.page_count < 1:
            self.close()
            raise InputError(f"{self.name}: the PDF has no pages")

    def __enter__(self) -> "PdfDocument":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        doc = getattr(self, "_doc", None)
        if doc is not None:
            doc.close()
            self._doc = None

    def pages(self, spec: str | None) -> list[int]:
        """The 1-based pages a --pages value selects (all pages when None)."""
        if spec is None:
            return list(range(1, self.page_count + 1))
        try:
            return parse_pages(spec, self.page_count)
        except InputError as err:
            raise InputError(f"{self.name}: {err}") from None

    def render(self, page: int, dpi: int = DEFAULT_DPI, max_side: int = MAX_SIDE) -> Image.Image:
        """Page `page` (1-based) as an RGB image at `dpi`, its long side capped at `max_side` px."""
        import pymupdf
        from PIL import Image

        if not 1 <= page <= self.page_count:
            raise InputError(f"{self.name}: page {page} is out of range (the document has {self.page_count} pages)")
        try:
            pg = self._doc.load_page(page - 1)
            rect = pg.rect
            zoom = dpi / 72.0
            long_side = max(rect.width, rect.height, 1.0)
            zoom = min(zoom, max_side / long_side)
            pix = pg.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False, colorspace=pymupdf.csRGB)
            img = Image.frombytes("RGB", (pix.width, pix.height), pix.samples)
        except Exception as exc:  # noqa: BLE001 - a damaged page object or content stream
            raise InputError(f"{self.name}: page {page} cannot be rendered, the PDF is damaged "
                             f"({_first_line(exc)})") from None
        if img.width < 1 or img.height < 1:
            raise InputError(f"{self.name}: page {page} is empty (zero size)")
        return img


    def text(self, page: int) -> str:
        """Page `page`'s text layer ("" for a scanned page, or one whose text cannot be read)."""
        try:
            return self._doc.load_page(page - 1).get_text()
        except Exception:  # noqa: BLE001 - a damaged page: treated as having no text layer
            return ""


def _ends_like_a_pdf(source: str | Path | bytes) -> bool:
    """Whether the file's last KiB holds the %%EOF marker every complete PDF ends with."""
    try:
        if isinstance(source, (bytes, bytearray)):
            tail = bytes(source[-1024:])
        else:
            with open(source, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 1024))
                tail = fh.read()
    except OSError:
        return False
    return b"%%EOF" in tail


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def check_dpi(dpi: int) -> int:
    if not MIN_DPI <= dpi <= MAX_DPI:
        raise InputError(f"--dpi {dpi} is out of range; use {MIN_DPI} to {MAX_DPI} (default {DEFAULT_DPI})")
    return dpi
