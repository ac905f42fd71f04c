"""End-to-end checks that need a real process: `python -m dsvl2_cli`, a closed stdout pipe,
and a real Ctrl-C (SIGINT)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import write_pdf
from subprocess_env import subprocess_env

from dsvl2_cli.dev.synthetic import write_image

REPO = Path(__file__).resolve().parents[1]


def env(**extra) -> dict:
    return subprocess_env(**extra)


def dsvl2(*args) -> list[str]:
    return [sys.executable, "-m", "dsvl2_cli", *map(str, args)]


@pytest.fixture(scope="module")
def pdf(tmp_path_factory) -> Path:
    return write_pdf(tmp_path_factory.mktemp("e2e") / "doc.pdf", [f"page {i + 1}" for i in range(3)], (200, 200),
                     at=(20, 40))


def test_python_m_usage_error():
    bad = subprocess.run(dsvl2("ocr", "--no-such-flag", "x.pdf"), capture_output=True, text=True, env=env(),
                         timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "no such option" in bad.stderr.lower() and "Traceback" not in bad.stderr


def test_closed_stdout_ends_quietly(ckpt_tiny, pdf):
    """`dsvl2 ocr doc.pdf | head -0`: the reader is gone before the first page is written."""
    proc = subprocess.Popen(dsvl2("ocr", "-m", ckpt_tiny, "--dtype", "float32", "--max-tokens", "3", "--dpi", "36",
                                  pdf), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err


def test_sigint_at_the_chat_prompt_exits_130(ckpt_tiny, tmp_path):
    image = write_image(tmp_path / "a.png", 32, 32)
    # A job started with `&` by a non-interactive shell (as CI may be) inherits SIGINT ignored, and
    # Python then never installs its Ctrl-C handler: give the child the default, as a terminal would.
    proc = subprocess.Popen(dsvl2("chat", "-i", "-m", ckpt_tiny, "--dtype", "float32", "--max-tokens", "2", image),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    seen = b""
    while b"chatting with" not in seen and time.time() < deadline:  # loaded, waiting for a message
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    assert b"chatting with" in seen, seen
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
