"""Startup without torch (--help, --version, usage errors) and Ctrl-C at any moment, in real
processes: exit 130 with `interrupted`, never a traceback (issue 14)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import pytest
import typer
from subprocess_env import subprocess_env

from dsvl2_cli.app.terminal import cli_options, exits
from dsvl2_cli.app import tasks

REPO = Path(__file__).resolve().parents[1]
# pydantic: typer 0.29 builds a pydantic schema for every option on each start (+0.25 s); pinned off
HEAVY = ("torch", "transformers", "safetensors", "numpy", "pydantic", "dsvl2_cli.engine", "dsvl2_cli.model")
# The console script's own lines; "started" marks the interpreter ready (its start-up is not ours).
ENTRY = ("import sys; sys.stderr.write('started\\n'); sys.stderr.flush(); sys.argv = ['dsvl2', *sys.argv[1:]]; "
         "from dsvl2_cli.app.terminal.cli import entry; entry()")


def env() -> dict:
    return subprocess_env()


def test_help_version_and_usage_errors_import_no_torch():
    code = f"""
import contextlib, io, json, sys
from dsvl2_cli.app.terminal.cli import main
runs = {{}}
for argv in (["--help"], ["--version"], ["chat", "--help"], ["ocr", "--no-such-flag"], ["ask", "doc.pdf"]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    runs[" ".join(argv)] = [rc, out.getvalue(), err.getvalue()]
print(json.dumps({{"runs": runs, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["heavy"] == []
    runs = result["runs"]
    assert runs["--help"][0] == 0 and "chat" in runs["--help"][1] and "--version" in runs["--help"][1]
    assert runs["--version"][:2] == [0, "dsvl2 0.1.0\n"]
    assert runs["chat --help"][0] == 0 and "--conversation" in runs["chat --help"][1]
    assert runs["ocr --no-such-flag"][0] == 2 and "No such option" in runs["ocr --no-such-flag"][2]
    assert runs["ask doc.pdf"][0] == 2 and "Missing argument" in runs["ask doc.pdf"][2]


def test_package_api_is_lazy_and_complete():
    code = ("import sys, dsvl2_cli; assert 'torch' not in sys.modules; "
            "from dsvl2_cli import load, Token; "
            "assert all(getattr(dsvl2_cli, n) is not None for n in dsvl2_cli.__all__); print(dsvl2_cli.load.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "dsvl2_cli.engine.runtime"


def test_temperature_advice_in_help_matches_the_task_layer():
    assert cli_options.TEMPERATURE_ADVICE == tasks.TEMPERATURE_ADVICE


def _start(*args) -> tuple[subprocess.Popen, float]:
    # A job started with `&` by a non-interactive shell inherits SIGINT ignored; give the child
    # the default, as a terminal would.
    proc = subprocess.Popen([sys.executable, "-c", ENTRY, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env(), cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr.readline() == b"started\n"
    return proc, time.monotonic()


def test_ctrl_c_at_any_moment_exits_130(ckpt_tiny):
    """Interrupts during the imports, the model load and generation (the tiny checkpoint with
    many tokens to go); all run side by side to keep the test short."""
    args = ("chat", "-m", ckpt_tiny, "--dtype", "float32", "--max-tokens", "100000", "Hello")
    delays = (0.05, 0.3, 1.0, 2.0)
    procs = []
    for delay in delays:
        proc, t0 = _start(*args)
        procs.append((delay, proc, t0))
    pending = list(procs)
    while pending:  # signal each at its moment after its own start
        pending.sort(key=lambda p: p[2] + p[0])
        delay, proc, t0 = pending.pop(0)
        time.sleep(max(0.0, t0 + delay - time.monotonic()))
        proc.send_signal(signal.SIGINT)
    gen, _ = _start(*args)
    first = gen.stdout.read(1)  # generating
    gen.send_signal(signal.SIGINT)
    for name, proc in [*((f"after {d} s", p) for d, p, _ in procs), ("while generating", gen)]:
        out, err = proc.communicate(timeout=180)
        err = err.decode()
        assert proc.returncode == 130, (name, err[-2000:])
        assert err.rstrip().endswith("interrupted") and "Traceback" not in err, (name, err[-2000:])
    assert first  # it was interrupted while streaming its answer


@pytest.mark.parametrize("argv", [["--help"], ["chat", "--help"]])
def test_help_from_python_m(argv):
    proc = subprocess.run([sys.executable, "-m", "dsvl2_cli", *argv], capture_output=True, text=True, env=env(),
                          timeout=120)
    assert proc.returncode == 0 and "Usage" in proc.stdout and proc.stderr == ""


FINISH = """
import atexit, sys, threading, time
{imports}
from dsvl2_cli.app.terminal import exits
atexit.register(lambda: sys.stderr.write("teardown ran\\n"))
sys.stdout.write("x" * 200_000)  # still in the buffer: only finish's flush gets it out
{thread}
exits.finish(3)
"""


@pytest.mark.parametrize("with_torch, with_thread, teardown", [
    (True, False, False),  # a command that used torch: flushed, then out at once
    (False, False, True),  # no torch (a server's client, --help): the normal exit, nothing to skip
    (True, True, True),    # a thread of ours still working: the normal exit waits for it
])
def test_finish_flushes_then_skips_torchs_teardown(with_torch, with_thread, teardown):
    code = FINISH.format(imports="import torch" if with_torch else "",
                         thread="threading.Thread(target=time.sleep, args=(0.2,)).start()" if with_thread else "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 3 and proc.stdout == "x" * 200_000
    assert ("teardown ran" in proc.stderr) == teardown, proc.stderr


def _interrupt_now(value: str) -> str:  # an option callback (module level: annotations are strings)
    if value == "now":
        raise KeyboardInterrupt
    return value


def test_ctrl_c_outside_a_command_body_says_interrupted_once(capsys):
    """Typer turns a KeyboardInterrupt in its own code (parsing, an option's callback) into a
    silent exit 130: `interrupted` must still be said, and only once when a command body said it."""
    app = typer.Typer()

    @app.command()
    @exits.command
    def cmd(when: Annotated[str, typer.Option(callback=_interrupt_now)] = "later"):
        raise KeyboardInterrupt

    for argv in (["--when", "now"], ["--when", "later"], ["--when", "now"]):
        assert exits.run(app, argv) == 130, argv
        assert capsys.readouterr().err == "interrupted\n", argv
