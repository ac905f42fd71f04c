"""PDF input: the --pages parser, encrypted/corrupt/empty documents, bounded rendering, and the
per-page output helpers (file names, atomic writes)."""

from __future__ import annotations

import os
import stat

import pymupdf
import pytest
from helpers import make_pdf
from hypothesis import given, settings
from hypothesis import strategies as st

from dsvl2_cli.app.inputs.sources import Source, write_atomic
from dsvl2_cli.app.inputs.pdf import MAX_SIDE, PdfDocument, check_dpi, is_pdf, parse_pages
from dsvl2_cli.errors import Dsvl2Error, InputError


# ------------------------------------------------------------------------------ parse_pages

@pytest.mark.parametrize("spec, expected", [
    ("1-3,7", [1, 2, 3, 7]),
    ("5", [5]),
    ("2-", [2, 3, 4, 5, 6, 7, 8]),
    ("-3", [1, 2, 3]),
    (" 1 - 2 , 4 ", [1, 2, 4]),
    ("8", [8]),
    ("7,1-2", [7, 1, 2]),        # the order given
    ("1-3,2-4", [1, 2, 3, 4]),   # no repeats
])
def test_parse_pages(spec, expected):
    assert parse_pages(spec, 8) == expected


@pytest.mark.parametrize("spec", ["5-2", "x", "0", "9", "", " ", "-", "1,,2", "1-2-3", "5 7", "1.5", "٣",
                                  "1_0", "3-99", "99999999999999999999999", "-0", "+1", "all"])
def test_parse_pages_rejects_with_the_page_count(spec):
    with pytest.raises(InputError, match="8 pages"):
        parse_pages(spec, 8)


def test_parse_pages_single_page_document_wording():
    with pytest.raises(InputError, match="has 1 page\\)"):
        parse_pages("2", 1)


@settings(max_examples=500, deadline=None)
@given(st.text(), st.integers(min_value=-3, max_value=50))
def test_parse_pages_raises_only_input_error(spec, count):
    try:
        pages = parse_pages(spec, count)
    except InputError:
        return
    assert pages and all(1 <= p <= count for p in pages) and len(set(pages)) == len(pages)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["1", "2", "3", "10", "-", ",", " ", "0", "x", "99"]), max_size=12).map("".join))
def test_parse_pages_on_range_like_soup(spec):
    try:
        pages = parse_pages(spec, 10)
    except InputError:
        return
    assert all(1 <= p <= 10 for p in pages)


# ------------------------------------------------------------------------------ documents

def test_open_and_render(tmp_path):
    pdf = make_pdf(tmp_path / "doc.pdf", pages=3)
    with PdfDocument(pdf) as doc:
        assert doc.page_count == 3
        assert doc.pages(None) == [1, 2, 3]
        assert doc.pages("2-") == [2, 3]
        img = doc.render(2, dpi=144)
        assert img.mode == "RGB" and img.size == (600, 800)


def test_render_caps_the_long_side(tmp_path):
    pdf = make_pdf(tmp_path / "poster.pdf", pages=1, size=(3000, 1000))  # 41 inches wide
    with PdfDocument(pdf) as doc:
        img = doc.render(1, dpi=1200)
    assert max(img.size) <= MAX_SIDE and max(img.size) >= MAX_SIDE - 2
    assert abs(img.width / img.height - 3.0) < 0.01


def test_bad_page_selection_names_the_file(tmp_path):
    pdf = make_pdf(tmp_path / "doc.pdf", pages=3)
    with PdfDocument(pdf) as doc, pytest.raises(InputError, match=r"doc\.pdf.*3 pages"):
        doc.pages("4")


def test_encrypted_without_and_with_wrong_password(tmp_path):
    pdf = make_pdf(tmp_path / "secret.pdf", encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="pw", owner_pw="own")
    with pytest.raises(InputError, match="encrypted.*--password"):
        PdfDocument(pdf)
    with pytest.raises(InputError, match="wrong password.*--password"):
        PdfDocument(pdf, password="nope")
    with PdfDocument(pdf, password="pw") as doc:
        assert doc.page_count == 3
        assert doc.render(1, dpi=72).size == (300, 400)


def test_corrupt_truncated_empty_and_missing(tmp_path):
    good = make_pdf(tmp_path / "good.pdf").read_bytes()
    cases = {
        "garbage.pdf": b"this is not a pdf at all",
        "truncated.pdf": good[:200],
        "empty.pdf": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=name.replace(".", r"\.")):
            PdfDocument(tmp_path / name)
    with pytest.raises(InputError, match="no such file"):
        PdfDocument(tmp_path / "missing.pdf")
    with pytest.raises(InputError, match="directory"):
        PdfDocument(tmp_path)


def test_zero_page_document(tmp_path):
    data = (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
            b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\n"
            b"trailer << /Root 1 0 R >>\n%%EOF\n")
    path = tmp_path / "zero.pdf"
    path.write_bytes(data)
    with pytest.raises(InputError, match="no pages"):
        PdfDocument(path)


def test_open_from_bytes(tmp_path):
    data = make_pdf(tmp_path / "doc.pdf", pages=2).read_bytes()
    assert is_pdf(data) and not is_pdf(b"\x89PNG\r\n")
    with PdfDocument(data, name="-") as doc:
        assert doc.name == "-" and doc.page_count == 2


def test_is_pdf_by_content_or_name(tmp_path):
    (tmp_path / "noext").write_bytes(make_pdf(tmp_path / "x.pdf").read_bytes())
    assert is_pdf(tmp_path / "noext") and is_pdf(tmp_path / "x.pdf") and is_pdf("missing.PDF")
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    assert not is_pdf(tmp_path / "a.png")


def test_check_dpi():
    assert check_dpi(144) == 144
    for bad in (0, -1, 5000):
        with pytest.raises(Dsvl2Error, match="--dpi"):
            check_dpi(bad)


# ------------------------------------------------------------------------------ outputs

def test_output_names_come_from_input_and_page():
    src = Source("scans/report.final.pdf", 7, lambda: None, page_count=12)
    assert src.output_name("txt") == "report.final-p007.txt"
    assert Source("a/photo.jpg", None, lambda: None).output_name("md") == "photo.md"
    assert Source("-", 3, lambda: None, page_count=2000).output_name("json") == "stdin-p0003.json"
    assert src.title == "scans/report.final.pdf page 7"


def test_write_atomic(tmp_path):
    target = tmp_path / "out" / "a.txt"
    write_atomic(target, b"hello\n")
    assert target.read_bytes() == b"hello\n"
    write_atomic(target, b"again\n")
    assert target.read_bytes() == b"again\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]  # no temporary files left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_write_atomic_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "a.txt", b"data")
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_error_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot write"):
        write_atomic(blocker / "sub" / "a.txt", b"data")
