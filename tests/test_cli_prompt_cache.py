"""The persistent prompt cache through the command line: reuse across runs with the same ids as
--no-cache, misses for another image or dtype, damaged entries replaced with a one-line warning,
`dsvl2 cache` and `cache clear`, two processes at once; and the prefill progress on stderr."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsvl2_cli import settings
from dsvl2_cli.app.terminal.render import UI, AnswerView, prefill_text, render_answer
from dsvl2_cli.app.tasks import Answer
from dsvl2_cli.dev.synthetic import write_image
from dsvl2_cli.engine.generate import Done, Prefilling, Stats, Token
from test_cli import _isolated, assert_clean, model_args, run  # noqa: F401 - fixture reused

REAL_PROMPT_CACHE_DIR = settings.prompt_cache_dir  # conftest points it elsewhere; these tests use XDG


@pytest.fixture
def xdg(monkeypatch, tmp_path) -> Path:
    """$XDG_CACHE_HOME in a fresh folder, and the real location rule: XDG/dsvl2/prompts."""
    monkeypatch.setattr(settings, "prompt_cache_dir", REAL_PROMPT_CACHE_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DSVL2_CACHE", raising=False)
    monkeypatch.delenv("DSVL2_PROMPT_CACHE_BYTES", raising=False)
    return tmp_path / "xdg" / "dsvl2" / "prompts"


@pytest.fixture
def photo(tmp_path) -> Path:
    return write_image(tmp_path / "photo.png", 64, 48, seed=1)


def ask(monkeypatch, ckpt, image, question, *extra):
    r = run(monkeypatch, "chat", *model_args(ckpt, 6), "--json", *extra, image, question)
    assert r.code == 0, r.stderr
    assert_clean(r)
    rec, = r.json_lines
    return rec, r


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.prefix.safetensors")) if folder.is_dir() else []


def test_a_second_run_reuses_the_image_and_gives_the_same_ids(monkeypatch, ckpt_tiny, xdg, photo):
    first, _ = ask(monkeypatch, ckpt_tiny, photo, "What is this?")
    assert first["usage"]["cached_tokens"] == 0 and len(entries(xdg)) == 1
    second, r = ask(monkeypatch, ckpt_tiny, photo, "Describe the colours.")
    assert 0 < second["usage"]["cached_tokens"] < second["usage"]["prompt_tokens"]
    assert "cached" in r.stderr  # the timing line says so
    plain, _ = ask(monkeypatch, ckpt_tiny, photo, "Describe the colours.", "--no-cache")
    assert plain["usage"]["cached_tokens"] == 0  # --no-cache reads nothing...
    assert plain["token_ids"] == second["token_ids"]
    assert plain["text"] == second["text"]


def test_no_cache_writes_nothing(monkeypatch, ckpt_tiny, xdg, photo):
    ask(monkeypatch, ckpt_tiny, photo, "What is this?", "--no-cache")
    assert entries(xdg) == []


def test_another_image_under_the_same_name_misses(monkeypatch, ckpt_tiny, xdg, photo):
    ask(monkeypatch, ckpt_tiny, photo, "What is this?")
    write_image(photo, 64, 48, seed=7)  # same path and size, other pixels
    rec, _ = ask(monkeypatch, ckpt_tiny, photo, "What is this?")
    assert rec["usage"]["cached_tokens"] == 0 and len(entries(xdg)) == 2


def test_another_dtype_misses(monkeypatch, ckpt_tiny, xdg, photo):
    ask(monkeypatch, ckpt_tiny, photo, "What is this?")
    r = run(monkeypatch, "chat", "-m", ckpt_tiny, "--dtype", "bfloat16", "--max-tokens", "2", "--json", photo,
            "What is this?")
    assert r.code == 0, r.stderr
    assert r.json_lines[0]["usage"]["cached_tokens"] == 0 and len(entries(xdg)) == 2


def test_a_truncated_entry_warns_once_and_is_replaced(monkeypatch, ckpt_tiny, xdg, photo):
    first, _ = ask(monkeypatch, ckpt_tiny, photo, "What is this?")
    entry, = entries(xdg)
    entry.write_bytes(entry.read_bytes()[:1000])
    again, r = ask(monkeypatch, ckpt_tiny, photo, "What is this?")
    warnings = [ln for ln in r.stderr.splitlines() if "prompt cache entry" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "ignored and removed" in warnings[0]
    assert again["usage"]["cached_tokens"] == 0 and again["token_ids"] == first["token_ids"]
    assert entries(xdg) == [entry] and entry.stat().st_size > 1000  # written anew
    third, r = ask(monkeypatch, ckpt_tiny, photo, "What is this?")
    assert third["usage"]["cached_tokens"] > 0 and "prompt cache" not in r.stderr
    assert third["token_ids"] == first["token_ids"]


def test_cache_lists_and_clear_empties(monkeypatch, ckpt_tiny, xdg, photo):
    r = run(monkeypatch, "cache")
    assert r.code == 0 and r.stdout.splitlines()[0].startswith("0 saved prompt(s)")
    ask(monkeypatch, ckpt_tiny, photo, "What is this?")
    entry, = entries(xdg)
    r = run(monkeypatch, "cache", env={"DSVL2_PROMPT_CACHE_BYTES": "1G"})
    lines = r.stdout.splitlines()  # the saved prompts first, then page texts and mapped layouts (test_cli_cache)
    assert r.code == 0 and entry.name in lines[0]
    assert lines[1].startswith("1 saved prompt(s)") and "of 1.0 GiB" in lines[1] and str(xdg) in lines[1]
    assert lines[2].startswith("0 page text(s)") and str(xdg / "page-text") in lines[2]
    listed = json.loads(run(monkeypatch, "cache", "--json").stdout)
    assert listed["entries"][0]["bytes"] == entry.stat().st_size == listed["total_bytes"]
    r = run(monkeypatch, "cache", "clear")
    assert r.code == 0 and f"removed 1 saved prompt(s), {entry.stat().st_size if entry.exists() else listed['total_bytes']:,} bytes" in r.stdout
    assert entries(xdg) == []
    assert run(monkeypatch, "cache", "bogus").code == 2


def test_a_bad_cap_is_a_one_line_error(monkeypatch, ckpt_tiny, xdg, photo):
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny), photo, "hi", env={"DSVL2_PROMPT_CACHE_BYTES": "lots"})
    assert r.code == 1 and r.stderr.count("error: ") == 1 and "DSVL2_PROMPT_CACHE_BYTES" in r.stderr
    assert "Traceback" not in r.stderr


def test_two_processes_at_once_never_fail_and_agree(ckpt_tiny, tmp_path, photo):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("DSVL2_CACHE", None)
    cmd = [sys.executable, "-m", "dsvl2_cli", "chat", *model_args(ckpt_tiny, 4), "--json", "-q", str(photo),
           "What is this?"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert not any("prompt cache" in err for _, err in outs), outs  # neither saw half an entry
    ids = [json.loads(out)["token_ids"] for out, _ in outs]
    assert ids[0] == ids[1]
    assert len(entries(tmp_path / "xdg" / "dsvl2" / "prompts")) == 1


# ------------------------------------------------------------------------------ prefill progress

def test_prefill_text_counts_and_estimates():
    assert prefill_text(Prefilling("vision", 0, 10), 0.0) == "image tiles 0/10"
    assert prefill_text(Prefilling("vision", 2, 10), 4.0) == "image tiles 2/10 · 16 s left"
    assert prefill_text(Prefilling("prompt", 512, 1024), 1.0) == "prompt 512/1024 · 1 s left"
    assert prefill_text(Prefilling("prompt", 1024, 1024), 2.0) == "prompt 1024/1024"


class _Recorder:
    """A stand-in spinner that records what it was told to show."""

    def __init__(self):
        self.task_ids, self.shown, self.stopped = [0], [], False

    def update(self, task, description=None, **_):
        self.shown.append(description)

    def stop(self):
        self.stopped = True


def _answer() -> Answer:
    done = Done("eos", " hello", (5, 6), Stats(10, 0, 4, 2, 0.1, 100.0, 10.0, 0))
    return Answer(done, {"text": "hello"})


@pytest.mark.parametrize("stream", [True, False])
def test_render_shows_the_progress_on_the_spinner_and_leaves_stdout_alone(monkeypatch, capsys, stream):
    recorder = _Recorder()

    @contextlib.contextmanager
    def spinner(self, message):
        yield recorder

    monkeypatch.setattr(UI, "spinner", spinner)
    progress = [Prefilling("vision", 0, 5), Prefilling("vision", 4, 5), Prefilling("vision", 5, 5),
                Prefilling("prompt", 0, 10), Prefilling("prompt", 10, 10)]
    tokens = [Token(5, " hel"), Token(6, "lo")]
    render_answer(iter([*progress, *tokens, _answer()]), UI(), AnswerView(stream=stream))
    with_progress = capsys.readouterr().out
    render_answer(iter([*tokens, _answer()]), UI(), AnswerView(stream=stream))
    assert capsys.readouterr().out == with_progress == "hello\n"
    shown = [s for s in recorder.shown if s and ("tiles" in s or "prompt" in s.split(" · ", 1)[-1])]
    assert shown[0] == "reading the prompt · image tiles 0/5"
    assert shown[2].startswith("reading the prompt · image tiles 5/5")
    assert shown[3] == "reading the prompt · prompt 0/10" and shown[-1] == "reading the prompt · prompt 10/10"
