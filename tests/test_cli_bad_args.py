"""Issue 16 through the CLI: a misspelt image path, a symbolic link loop, a FIFO with no writer,
pull's advice, and conversation images named in --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from dsvl2_cli.dev.synthetic import write_image
from test_cli import run  # noqa: F401 - the in-process runner and its isolation
from test_cli import _isolated  # noqa: F401
from test_cli_startup import REPO, env


@pytest.mark.parametrize("arg", ["photo.jgp", "scans/page1"])
def test_a_missing_file_like_argument_is_an_error_not_a_prompt(monkeypatch, arg):
    r = run(monkeypatch, "chat", arg)
    assert r.code == 1 and r.stdout == ""
    assert r.stderr.strip() == f"error: {arg}: no such file; check the path"


@pytest.mark.parametrize("prompt", ["Hello", "What is 2.5?"])
def test_a_prompt_stays_a_prompt(monkeypatch, ckpt_tiny, prompt):
    r = run(monkeypatch, "chat", "-m", str(ckpt_tiny), "--dtype", "float32", "--max-tokens", "2", "--json", prompt)
    assert r.code == 0, r.stderr
    assert r.json_lines[0]["images"] == []


def test_dash_p_makes_a_file_like_text_the_prompt(monkeypatch, ckpt_tiny):
    r = run(monkeypatch, "chat", "-m", str(ckpt_tiny), "--dtype", "float32", "--max-tokens", "2", "--json",
            "-P", "photo.jgp")
    assert r.code == 0, r.stderr


@pytest.mark.parametrize("command", ["chat", "ocr"])
def test_a_symlink_loop_is_named_as_such(monkeypatch, tmp_path, command):
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    r = run(monkeypatch, command, str(loop), *(["Describe."] if command == "chat" else []))
    assert r.code == 1
    assert f"{loop}: symbolic link loop" in r.stderr and "no such file" not in r.stderr


def test_a_fifo_without_writer_says_it_waits(tmp_path):
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "dsvl2_cli", "ocr", str(fifo)], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env(), cwd=REPO)
    line = proc.stderr.readline().decode()  # blocks until dsvl2 says something
    assert line == f"waiting for input on {fifo} ...\n"
    time.sleep(0.2)
    with open(fifo, "wb") as fh:  # now a writer comes: its data is read as usual (a broken PDF)
        fh.write(b"%PDF-1.4 and nothing more")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "PDF" in err.decode() and "waiting" not in err.decode()


def test_pull_failure_does_not_suggest_dash_m(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    r = run(monkeypatch, "pull", "nobody/nothing")
    assert r.code == 1 and "download failed (no network)" in r.stderr
    assert "-m PATH" not in r.stderr and "needs no pull" in r.stderr


def test_conversation_images_are_named_in_json(monkeypatch, ckpt_tiny, tmp_path):
    write_image(tmp_path / "cat.png", 32, 32)
    convo = tmp_path / "c.json"
    convo.write_text(json.dumps([{"role": "user", "content": "<image>\nWhat?", "images": ["cat.png"]}]))
    r = run(monkeypatch, "chat", "--conversation", str(convo), "-m", str(ckpt_tiny), "--dtype", "float32",
            "--max-tokens", "2", "--json")
    assert r.code == 0, r.stderr
    assert [img["input"] for img in r.json_lines[0]["images"]] == ["cat.png"]
