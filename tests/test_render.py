"""Pictures and terminal output: boxes drawn into images, the half-block terminal renderer, and
the UI's stdout/stderr split."""

from __future__ import annotations

import io
import sys

from PIL import Image
from rich.console import Console

from dsvl2_cli.app.terminal.pictures import HALF_BLOCK, PALETTE, DrawBox, HalfBlockImage, colour, draw_boxes, fit_cells
from dsvl2_cli.app.terminal.render import UI


def grey(w=200, h=100):
    return Image.new("RGB", (w, h), (128, 128, 128))


def test_colours_are_distinct_and_cycle():
    assert len(set(PALETTE)) == len(PALETTE)
    assert colour(0) != colour(1) and colour(len(PALETTE)) == colour(0)


def test_draw_boxes_outlines_and_labels():
    img = grey(400, 300)
    red, green = colour(0), colour(1)
    out = draw_boxes(img, [DrawBox((50, 100, 150, 250), "cup", red), DrawBox((200, 20, 380, 120), "", green)])
    assert out is not img and img.getpixel((50, 150)) == (128, 128, 128)  # the input is untouched
    assert out.getpixel((50, 180)) == red and out.getpixel((150, 180)) == red       # left, right edges
    assert out.getpixel((100, 250)) == red                                            # bottom edge
    assert out.getpixel((100, 180)) == (128, 128, 128)                                # inside stays
    assert out.getpixel((200, 70)) == green
    # the label tag sits above the box, filled with the box colour
    tag = [out.getpixel((x, y)) for x in range(52, 70) for y in range(90, 99)]
    assert tag.count(red) > len(tag) // 2


def test_draw_boxes_clips_and_converts():
    img = Image.new("L", (50, 40), 10)
    out = draw_boxes(img, [DrawBox((-10, -10, 500, 500), "everything", colour(2))])
    assert out.mode == "RGB" and out.size == (50, 40)


def test_fit_cells_keeps_aspect():
    assert fit_cells((200, 100), 80, 100) == (80, 20)     # cell = 1 px wide, 2 px tall
    assert fit_cells((100, 400), 80, 25) == (12, 25)      # height-bound: 50 px tall -> 12.5 px wide
    cols, rows = fit_cells((1, 1), 0, 0)
    assert cols >= 1 and rows >= 1


def render(renderable, width=40, height=30) -> Console:
    console = Console(file=io.StringIO(), width=width, height=height, force_terminal=True,
                      color_system="truecolor", record=True)
    console.print(renderable)
    return console


def test_half_block_image_is_sized_to_the_width_in_true_colour():
    top = Image.new("RGB", (80, 40), (255, 0, 0))
    top.paste((0, 0, 255), (0, 20, 80, 40))           # red upper half, blue lower half
    console = render(HalfBlockImage(top), width=40)
    text = console.export_text(styles=False)
    lines = [ln for ln in text.splitlines() if ln]
    assert len(lines) == 10 and all(len(ln) == 40 for ln in lines)  # 40 cols x 20 px tall = 10 rows
    assert set("".join(lines)) == {HALF_BLOCK}
    ansi = console.file.getvalue()
    assert "38;2;255;0;0" in ansi and "48;2;255;0;0" in ansi  # fg = upper pixel, bg = lower pixel
    assert "48;2;0;0;255" in ansi


def test_half_block_boxes_and_labels_over_the_picture():
    img = grey(400, 200)
    box = DrawBox((100, 50, 300, 150), "cup", (255, 0, 0))
    view = HalfBlockImage(img, [box], max_width=40)
    small = view.pixels(40, 10)
    assert small.getpixel((10, 7)) == (255, 0, 0)        # left edge at x = 100 * 40 / 400
    assert small.getpixel((20, 10)) == (128, 128, 128)   # inside
    text = render(view, width=80).export_text(styles=False)
    assert "cup" in text                                 # the label is written on the top edge's row
    assert text.splitlines()[2].find("cup") == 10      # y1 = 50 of 200 -> pixel row 5 -> cell row 2


def test_half_block_respects_max_rows():
    tall = grey(50, 1000)
    lines = [ln for ln in render(HalfBlockImage(tall, max_rows=12), width=80).export_text().splitlines() if ln]
    assert len(lines) == 12


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_ui_plain_when_not_a_terminal(monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    ui = UI()
    ui.start_answer()
    ui.answer_text("  Hello")
    ui.answer_text(" world")
    ui.end_line()
    ui.warn("careful")
    ui.status("timing")
    assert out.getvalue() == "Hello world\n"
    assert "\x1b[" not in err.getvalue() and "warning: careful" in err.getvalue() and "timing" in err.getvalue()
    assert not ui.out_tty


def test_ui_quiet_keeps_warnings(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    ui = UI(quiet=True)
    ui.status("timing")
    ui.warn("careful")
    assert "timing" not in err.getvalue() and "careful" in err.getvalue()


def test_no_color_turns_pictures_off(monkeypatch):
    monkeypatch.setattr(sys, "stdout", FakeTTY())
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert UI().out_tty
    monkeypatch.setenv("NO_COLOR", "1")
    assert not UI().out_tty
