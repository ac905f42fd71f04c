"""Boxes on pictures: drawn into a full-size copy of the image (`draw_boxes`, for `ground
--save`, encoded by the file name's extension), and the image shown in a terminal.

`HalfBlockImage` is a Rich renderable: each character cell is "▀" with the upper pixel as the
foreground and the lower pixel as the background colour (24-bit), so one cell shows two
square-ish pixels in any true-colour terminal. Boxes are drawn at the terminal's resolution
(one pixel wide lines stay visible however much the picture is scaled) and their labels are
written as text on the cells of the box's top edge.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont
from rich.color import Color
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style

from ...errors import InputError

HALF_BLOCK = "▀"

# Distinct, saturated colours that stand out on photos; one per label, in order.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 59, 48), (52, 199, 89), (0, 122, 255), (255, 204, 0), (175, 82, 222),
    (255, 149, 0), (90, 200, 250), (255, 45, 85), (162, 132, 94), (0, 199, 190),
)


def colour(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


@dataclass(frozen=True)
class DrawBox:
    """A box to draw: pixel corners in the image's own coordinates, a label, a colour."""

    xyxy: tuple[int, int, int, int]
    label: str
    colour: tuple[int, int, int]


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = fill
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def draw_boxes(image: Image.Image, boxes: Sequence[DrawBox]) -> Image.Image:
    """A copy of `image` with each box outlined in its colour and its label on a filled tag."""
    out = image.convert("RGB")
    if out is image:
        out = image.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    width = max(2, round(max(w, h) / 300))
    font = _font(max(12, round(max(w, h) / 45)))
    for b in boxes:
        x1, y1, x2, y2 = _clip(b.xyxy, w, h)
        draw.rectangle([x1, y1, x2, y2], outline=b.colour, width=width)
    for b in boxes:  # labels last, so no outline crosses them
        if not b.label:
            continue
        x1, y1, x2, y2 = _clip(b.xyxy, w, h)
        left, top, right, bottom = draw.textbbox((0, 0), b.label, font=font)
        tw, th = right - left, bottom - top
        pad = max(2, th // 4)
        ty = y1 - th - 2 * pad if y1 - th - 2 * pad >= 0 else y1  # above the box, else inside
        tx = min(max(0, x1), max(0, w - tw - 2 * pad))
        draw.rectangle([tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad], fill=b.colour)
        draw.text((tx + pad - left, ty + pad - top), b.label, fill=_text_colour(b.colour), font=font)
    return out


def _clip(xyxy, w: int, h: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = xyxy
    return (min(max(0, x1), w - 1), min(max(0, y1), h - 1), min(max(0, x2), w - 1), min(max(0, y2), h - 1))


def fit_cells(size: tuple[int, int], max_cols: int, max_rows: int) -> tuple[int, int]:
    """(columns, rows) of half-block cells showing an image of `size` as large as fits while
    keeping its aspect (a cell is 1 pixel wide and 2 pixels tall)."""
    w, h = size
    max_cols, max_rows = max(1, max_cols), max(1, max_rows)
    scale = min(max_cols / w, (2 * max_rows) / h)
    cols = max(1, min(max_cols, round(w * scale)))
    rows = max(1, min(max_rows, round(h * scale / 2)))
    return cols, rows


class HalfBlockImage:
    """A PIL image (optionally with boxes) as a Rich renderable, sized to the available width.

    `max_rows` caps the height in text lines (default: the console's height minus a few lines).
    """

    def __init__(self, image: Image.Image, boxes: Sequence[DrawBox] = (), *, max_width: int | None = None,
                 max_rows: int | None = None):
        self.image = image.convert("RGB")
        self.boxes = list(boxes)
        self.max_width = max_width
        self.max_rows = max_rows

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        cols, _ = self._cells(console, options)
        return Measurement(cols, cols)

    def _cells(self, console: Console, options: ConsoleOptions) -> tuple[int, int]:
        max_cols = min(options.max_width, self.max_width or options.max_width)
        max_rows = self.max_rows or max(8, (options.height or console.height) - 4)
        return fit_cells(self.image.size, max_cols, max_rows)

    def pixels(self, cols: int, rows: int) -> Image.Image:
        """The picture at cell resolution (cols x 2*rows pixels) with the boxes drawn in."""
        small = self.image.resize((cols, rows * 2), Image.Resampling.BOX)
        if self.boxes:
            draw = ImageDraw.Draw(small)
            sx, sy = cols / self.image.width, rows * 2 / self.image.height
            for b in self.boxes:
                x1, y1, x2, y2 = b.xyxy
                rect = [int(x1 * sx), int(y1 * sy), min(cols - 1, int(x2 * sx)), min(rows * 2 - 1, int(y2 * sy))]
                draw.rectangle(rect, outline=b.colour, width=1)
        return small

    def labels_at(self, cols: int, rows: int) -> dict[tuple[int, int], tuple[str, Style]]:
        """(row, col) -> (character, style) for label text written over the picture."""
        cells: dict[tuple[int, int], tuple[str, Style]] = {}
        sx, sy = cols / self.image.width, rows * 2 / self.image.height
        for b in self.boxes:
            if not b.label:
                continue
            x1, y1 = b.xyxy[0], b.xyxy[1]
            row = min(rows - 1, max(0, int(y1 * sy) // 2))
            col = min(cols - 1, max(0, int(x1 * sx)))
            text = b.label[: max(1, cols - col)]
            style = Style(color=rgb(_text_colour(b.colour)), bgcolor=rgb(b.colour), bold=True)
            for i, ch in enumerate(text):
                cells[(row, col + i)] = (ch, style)
        return cells

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        cols, rows = self._cells(console, options)
        small = self.pixels(cols, rows)
        px = small.load()
        labels = self.labels_at(cols, rows)
        for r in range(rows):
            for c in range(cols):
                if (r, c) in labels:
                    ch, style = labels[(r, c)]
                    yield Segment(ch, style)
                else:
                    yield Segment(HALF_BLOCK, Style(color=rgb(px[c, 2 * r]), bgcolor=rgb(px[c, 2 * r + 1])))
            yield Segment.line()


def rgb(value) -> Color:
    """A Rich colour from an (r, g, b) tuple."""
    return Color.from_rgb(*value[:3])


def image_format(path) -> str:
    """Pillow's format name for a file name's extension (an InputError for unknown ones)."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise InputError(f"--save {path}: unknown image type {path.suffix or '(no extension)'}; use .png or .jpg")
    return fmt


def encode_image(img: Image.Image, path) -> bytes:
    """The bytes of `img` in the format `path`'s extension names."""
    buf = io.BytesIO()
    img.save(buf, format=image_format(path))
    return buf.getvalue()
