"""`dsvl2 cache`: the three kinds of cached data listed (prompts, page texts, mapped layouts with
the model each was built from), cleared kind by kind, stale mapped layouts pruned (on demand and
when a new one is written), removal record first and safe while a model maps the file, and
errors as one line."""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from pathlib import Path

import pytest
import torch
from helpers import load_module
from test_cli import _isolated, assert_clean, assert_one_line_error, run  # noqa: F401 - fixture reused

from dsvl2_cli import settings
from dsvl2_cli.engine.loading import mapped_store


@pytest.fixture
def caches(monkeypatch, tmp_path) -> dict[str, Path]:
    """Every cache folder under tmp_path: saved prompts, their page texts, mapped layouts."""
    prompts = tmp_path / "prompt-cache"  # conftest's private prompt folder (the page texts live inside)
    monkeypatch.setenv("DSVL2_MMAP_DIR", str(tmp_path / "mapped"))
    assert settings.prompt_cache_dir() == prompts
    return {"prompts": prompts, "pages": prompts / "page-text", "mapped": tmp_path / "mapped"}


def _model(src, where: Path) -> Path:
    """A copy of `src` with a fingerprint of its own (copytree keeps the files' times)."""
    shutil.copytree(src, where)
    t = 1_000_000 + zlib.crc32(where.name.encode())
    os.utime(where / "config.json", (t, t))
    return where


def _fake_prompt_and_page(caches):
    caches["pages"].mkdir(parents=True)
    (caches["prompts"] / ("a" * 40 + ".prefix.safetensors")).write_bytes(b"p" * 100)
    (caches["pages"] / ("b" * 40 + ".txt")).write_text("page text", encoding="utf-8")


def _records(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.done.json"))


def test_lists_all_three_kinds_in_text_and_json(ckpt_tiny, caches, tmp_path, monkeypatch):
    r = run(monkeypatch, "cache")
    assert r.code == 0 and r.stdout.splitlines() == [
        f"0 saved prompt(s), 0 bytes of 1.9 GiB in {caches['prompts']}",
        f"0 page text(s), 0 bytes in {caches['pages']}", f"0 mapped layout(s), 0 bytes in {caches['mapped']}"]
    _fake_prompt_and_page(caches)
    folder = _model(ckpt_tiny, tmp_path / "model")
    load_module(folder)
    load_module(folder, quantize="int4")
    r = run(monkeypatch, "cache")
    assert r.code == 0
    assert_clean(r)
    lines = r.stdout.splitlines()
    assert len(lines) == 6 and "a" * 40 in lines[0] and lines[1].startswith("1 saved prompt(s), 100 bytes")
    assert lines[2] == f"1 page text(s), 9 bytes in {caches['pages']}"
    assert {ln.split()[4] for ln in lines[3:5]} == {"bf16"} and all(ln.endswith(str(folder)) for ln in lines[3:5])
    assert any(" int4g128-cpu-" in ln for ln in lines[3:5])
    assert lines[5].startswith("2 mapped layout(s)") and "stale" not in lines[5]

    listed = json.loads(run(monkeypatch, "cache", "--json").stdout)
    assert listed["total_bytes"] == 100 and listed["entries"][0]["bytes"] == 100  # the prompt keys as before
    assert listed["pages"]["entries"][0]["bytes"] == 9 and listed["pages"]["folder"] == str(caches["pages"])
    entries = listed["mapped"]["entries"]
    assert {e["quant"] is None for e in entries} == {True, False}
    data_bytes = sum(p.stat().st_size for p in caches["mapped"].iterdir())
    assert listed["mapped"]["total_bytes"] == data_bytes == sum(e["bytes"] for e in entries)
    for e in entries:
        assert (e["source"], e["source_exists"], e["dtype"], e["state"], e["stale"]) == \
            (str(folder), True, "bf16", "ready", False)
        assert time.strptime(e["last_used"], "%Y-%m-%dT%H:%M:%S")


def test_clear_each_kind_and_all(ckpt_tiny, caches, tmp_path, monkeypatch):
    _fake_prompt_and_page(caches)
    load_module(_model(ckpt_tiny, tmp_path / "model"))
    r = run(monkeypatch, "cache", "clear")  # as before: the saved prompts only, and the same line
    assert r.code == 0 and r.stdout == f"removed 1 saved prompt(s), 100 bytes, from {caches['prompts']}\n"
    assert list(caches["pages"].iterdir()) and _records(caches["mapped"])
    r = run(monkeypatch, "cache", "clear", "pages")
    assert r.code == 0 and r.stdout == f"removed 1 page text(s), 9 bytes, from {caches['pages']}\n"
    assert not list(caches["pages"].iterdir()) and _records(caches["mapped"])
    size = sum(p.stat().st_size for p in caches["mapped"].iterdir())
    r = run(monkeypatch, "cache", "clear", "mapped", "--json")
    assert r.code == 0 and json.loads(r.stdout) == {"removed": [
        {"kind": "mapped", "entries": 1, "bytes": size, "folder": str(caches["mapped"])}]}
    assert not list(caches["mapped"].iterdir())
    _fake_prompt_and_page(caches) if not caches["pages"].exists() else None
    (caches["prompts"] / ("c" * 40 + ".prefix.safetensors")).write_bytes(b"p")
    (caches["pages"] / "d.txt").write_text("x")
    r = run(monkeypatch, "cache", "clear", "all")
    assert r.code == 0 and [ln.split(",")[0] for ln in r.stdout.splitlines()] == [
        "removed 1 saved prompt(s)", "removed 1 page text(s)", "removed 0 mapped layout(s)"]
    for bad in (("clear", "bogus"), ("prune", "mapped"), ("list", "all"), ("bogus",)):
        r = run(monkeypatch, "cache", *bad)
        assert r.code == 2 and "Traceback" not in r.stderr, bad


def test_prune_removes_the_layout_of_a_deleted_model_only(ckpt_tiny, caches, tmp_path, monkeypatch):
    gone, kept = _model(ckpt_tiny, tmp_path / "gone"), _model(ckpt_tiny, tmp_path / "kept")
    load_module(gone)
    load_module(kept)
    shutil.rmtree(gone)
    listed = json.loads(run(monkeypatch, "cache", "--json").stdout)["mapped"]
    states = {e["source"]: (e["state"], e["source_exists"]) for e in listed["entries"]}
    assert states == {str(gone): ("source missing", False), str(kept): ("ready", True)}
    assert "1 stale" in run(monkeypatch, "cache").stdout.splitlines()[-1]
    stale_bytes = listed["stale_bytes"]
    r = run(monkeypatch, "cache", "prune")
    assert r.code == 0 and r.stdout == f"removed 1 mapped layout(s), {stale_bytes:,} bytes, from {caches['mapped']}\n"
    left = [json.loads(p.read_text())["source"] for p in _records(caches["mapped"])]
    assert left == [str(kept)] and len(list(caches["mapped"].glob("*.safetensors"))) == 1
    assert run(monkeypatch, "cache", "prune").stdout.startswith("removed 0 mapped layout(s)")


def test_writing_a_layout_prunes_stale_ones(ckpt_tiny, caches, tmp_path, monkeypatch):
    gone, changed = _model(ckpt_tiny, tmp_path / "gone"), _model(ckpt_tiny, tmp_path / "changed")
    load_module(gone, quantize="int8")
    load_module(changed)
    shutil.rmtree(gone)
    os.utime(changed / "config.json", (5, 5))  # another fingerprint: its entry is stale too
    assert {e.state for e in mapped_store.entries(caches["mapped"])} == {"source missing", "source changed"}
    load_module(_model(ckpt_tiny, tmp_path / "new"))  # writes an entry, and prunes
    (entry,) = mapped_store.entries(caches["mapped"])
    assert entry.source == str(tmp_path / "new") and entry.state == "ready"


def test_leftovers_of_an_interrupted_write_wait_an_hour(caches):
    caches["mapped"].mkdir()
    tmp, orphan = caches["mapped"] / ".tmp-abc.safetensors", caches["mapped"] / ("f" * 32 + "-bf16.safetensors")
    tmp.write_bytes(b"x" * 10)
    orphan.write_bytes(b"y" * 10)
    assert {e.state for e in mapped_store.entries(caches["mapped"])} == {"being written"}
    assert mapped_store.prune(caches["mapped"]) == (0, 0) and mapped_store.clear(caches["mapped"]) == (0, 0)
    old = time.time() - 2 * mapped_store.LEFTOVER_AGE
    for p in (tmp, orphan):
        os.utime(p, (old, old))
    assert {e.state for e in mapped_store.entries(caches["mapped"])} == {"incomplete"}
    assert mapped_store.prune(caches["mapped"]) == (2, 20) and not list(caches["mapped"].iterdir())


def test_removal_takes_the_record_first_and_a_mapped_model_keeps_working(ckpt_tiny, caches, tmp_path, monkeypatch):
    folder = _model(ckpt_tiny, tmp_path / "model")
    model = load_module(folder)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    order = []
    real_unlink = Path.unlink

    def unlink(self, *a, **k):
        order.append(self.name)
        return real_unlink(self, *a, **k)
    monkeypatch.setattr(Path, "unlink", unlink)
    assert run(monkeypatch, "cache", "clear", "mapped").code == 0
    assert len(order) == 2 and order[0].endswith(".done.json") and order[1].endswith(".safetensors")
    # Linux: the unlinked file's pages stay mapped, so the loaded model reads the same weights
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_a_removal_that_fails_is_one_line_and_leaves_no_complete_entry(ckpt_tiny, caches, tmp_path, monkeypatch):
    load_module(_model(ckpt_tiny, tmp_path / "model"))
    real_unlink = Path.unlink

    def unlink(self, *a, **k):
        if self.suffix == ".safetensors":
            raise PermissionError(13, "Permission denied")
        return real_unlink(self, *a, **k)
    monkeypatch.setattr(Path, "unlink", unlink)
    r = run(monkeypatch, "cache", "clear", "mapped")
    assert_one_line_error(r, "cannot remove it (Permission denied)")
    assert not _records(caches["mapped"])  # the record went first: what is left is no entry a load maps
    monkeypatch.setattr(Path, "unlink", real_unlink)
    (entry,) = mapped_store.entries(caches["mapped"])
    assert entry.state == "being written"  # a data file without its record: removed by prune after an hour
