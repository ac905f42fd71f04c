"""What a command reads, turned into images before the model loads: image files, PDF pages,
stdin and pipes as a list of `Source`s, where each image came from (its provenance), which
command-line arguments name files, output file names per page, and atomic writes.

Provenance travels with the PIL image in `img.info` (set by `tag`, read by `image_origin`): the
chat session of the engine holds bare images, and this way an image attached anywhere (the
command line, `/image`, a PDF page) still says where it came from when its answer is recorded.
Only this module reads or writes those keys.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ...errors import InputError
from ...files import Replacement
from .images import load_image_with_notes, read_capped, read_fifo, stat_path
from .pdf import PdfDocument, check_dpi, is_pdf

# A last argument that does not exist is still a file (misspelt) when it has no whitespace and
# a dot-extension of 2-5 letters or digits (photo.jgp) or a path separator (scans/page1):
# "What is 2.5?", "Hello" and "e.g." stay prompts.
_FILE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{2,5}")
_INPUT, _PAGE = "dsvl2_input", "dsvl2_page"


# ---------------------------------------------------------------------------------- provenance

@dataclass(frozen=True)
class Origin:
    """Where an image came from: the argument that named it ("-" for stdin), its 1-based PDF
    page (None for an image file), and its size. `input` is None for an image of unknown origin."""

    input: str | None
    page: int | None
    size: tuple[int, int]

    def as_json(self) -> dict:
        return {"input": self.input, "page": self.page, "size": list(self.size)}


def tag(img: Image.Image, input_name: str, page: int | None = None) -> Image.Image:
    """Remember where an image came from (its file and page)."""
    img.info[_INPUT], img.info[_PAGE] = input_name, page
    return img


def image_origin(img: Image.Image) -> Origin:
    return Origin(img.info.get(_INPUT), img.info.get(_PAGE), img.size)


# ------------------------------------------------------------------------------------ sources

@dataclass
class Source:
    """One image to process: an image file (page None) or a PDF page, loaded when needed."""

    input: str
    page: int | None
    load: Callable[[], Image.Image]
    page_count: int = 1
    text: Callable[[], str] | None = None  # a PDF page's text layer (page selection ranks by it)

    def image(self) -> Image.Image:
        return tag(self.load(), self.input, self.page)

    @property
    def title(self) -> str:
        return self.input if self.page is None else f"{self.input} page {self.page}"

    def output_name(self, ext: str) -> str:
        """File name for this page's output: from the input's name and the page number only
        (never from model output), e.g. report-p007.txt."""
        stem = "stdin" if self.input == "-" else (Path(self.input).stem or "page")
        if self.page is None:
            return f"{stem}.{ext}"
        width = max(3, len(str(self.page_count)))
        return f"{stem}-p{self.page:0{width}d}.{ext}"


def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder (fsync'd, then renamed: dsvl2_cli/files.py), so
    readers (and an interrupted run) only ever see complete files; the user's umask for its mode.
    OSError becomes an InputError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = Replacement(path, fsync=True, normal_mode=True)
    except OSError as err:
        raise InputError(f"{path.parent}: cannot write there ({err.strerror or err})") from None
    try:
        with out:
            out.file.write(data)
    except OSError as err:
        raise InputError(f"{path}: cannot write ({err.strerror or err})") from None


# ---------------------------------------------------------------------------------- inputs

def read_stdin_bytes() -> bytes:
    data = read_capped(sys.stdin.buffer, "-", InputError)
    if not data:
        raise InputError("-: nothing on stdin; pipe an image or a PDF into it")
    return data


def _is_pipe(arg: str) -> bool:
    """A FIFO or socket path, e.g. /dev/fd/63 from the shell's `<(...)`: it can be read only once."""
    try:
        mode = os.stat(arg).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _read_pipe(arg: str) -> bytes:
    data = read_fifo(arg, arg, InputError)
    if not data:
        raise InputError(f"{arg}: the file is empty")
    return data


def load_image_arg(arg: str, warn: Callable[[str], None], data: bytes | None = None) -> Image.Image:
    """An image from a path, or from `data` (the bytes of stdin for "-", or of a pipe) when given,
    tagged with its origin; notes (animated, EXIF) go to `warn`."""
    if data is None and arg != "-" and Path(arg).is_file() and is_pdf(arg):  # (sniffing would drain a pipe)
        raise InputError(f"{arg}: is a PDF; use `dsvl2 ask {arg} QUESTION --pages N` or `dsvl2 ocr {arg}`")
    img, notes = load_image_with_notes(data if data is not None else arg, name=arg)
    for note in notes:
        warn(note)
    return tag(img, arg)


def collect_sources(files: list[str], pages: str | None, dpi: int, password: str | None,
                    warn: Callable[[str], None], stack: contextlib.ExitStack) -> list[Source]:
    """Every image to process, in order: image files as they are, PDFs page by page (`pages`
    selects them). Opens and checks everything up front, so bad input fails before the model
    loads; the PDFs stay open in `stack` and pages render when their Source loads."""
    check_dpi(dpi)
    sources: list[Source] = []
    any_pdf = False
    for arg in files:
        if arg != "-":
            stat_path(arg)  # missing, or a link loop: said before anything is read
        data = read_stdin_bytes() if arg == "-" else _read_pipe(arg) if _is_pipe(arg) else None
        if is_pdf(data) if data is not None else (is_pdf(arg) and not Path(arg).is_dir()):
            any_pdf = True
            doc = stack.enter_context(PdfDocument(data if data is not None else arg, password, name=arg))
            for p in doc.pages(pages):
                sources.append(Source(arg, p, functools.partial(doc.render, p, dpi), doc.page_count,
                                      functools.partial(doc.text, p)))
        else:
            sources.append(Source(arg, None, functools.partial(load_image_arg, arg, warn, data)))
    if pages is not None and not any_pdf:
        warn("--pages applies to PDF files only, and no PDF was given")
    return sources


def output_paths(sources: list[Source], out: Path, ext: str) -> list[Path]:
    """One output file in `out` per source; an InputError when two would share a name."""
    seen: dict[str, Source] = {}
    for src in sources:
        name = src.output_name(ext)
        if name in seen:
            raise InputError(f"{seen[name].title} and {src.title} would both be written to {out / name}; "
                             "run them separately")
        seen[name] = src
    return [out / src.output_name(ext) for src in sources]


# ------------------------------------------------------------------------------- arguments

def isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def chat_prompt(text: str | None, interactive: bool) -> str | None:
    """The prompt of a one-off chat: `text`, else the text piped on stdin; None (or a first
    message) for an interactive chat. An empty prompt is an InputError."""
    if interactive:
        return text
    if text is None and not isatty(sys.stdin):
        text = sys.stdin.read()
        if not text.strip():
            raise InputError("empty prompt on stdin; give a prompt argument or pipe some text")
    if text is not None and not text.strip():
        raise InputError("empty prompt; say what to ask about the images (an argument, -P TEXT or text on stdin)")
    return text


def load_images(files: list[str], warn: Callable[[str], None]) -> list[Image.Image]:
    """The images named by `files` ("-" once at most: stdin), tagged with their origin."""
    data = read_stdin_bytes() if "-" in files else None
    return [load_image_arg(f, warn, data if f == "-" else None) for f in files]


def split_images_and_prompt(args: list[str]) -> tuple[list[str], str | None]:
    """`[IMAGE]... [PROMPT]`: the last argument is the prompt unless it names a file, looks like
    one (then a missing file is an error, not a prompt) or is "-"."""
    if not args:
        return [], None
    last = args[-1]
    if last == "-" or _looks_like_file(last):
        return list(args), None
    return list(args[:-1]), last


def _looks_like_file(arg: str) -> bool:
    if not arg.strip():  # "" is an (empty) prompt, not the current folder
        return False
    try:
        if Path(arg).exists() or Path(arg).is_symlink():  # (a link loop "exists" as a link only)
            return True
    except (OSError, ValueError):  # e.g. a prompt too long to be a file name
        return False
    if any(c.isspace() for c in arg):
        return False
    return "/" in arg or os.sep in arg or bool(_FILE_SUFFIX.fullmatch(Path(arg).suffix))
