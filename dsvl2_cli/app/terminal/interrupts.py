"""Ctrl-C at any moment ends `dsvl2` with exit 130 and `interrupted` on stderr, never a traceback.

The entry point installs `on_sigint` before it imports anything heavy. It raises KeyboardInterrupt
as Python's own handler does (exits.py turns that into 130 after flushing what was generated),
except while a module is being imported: there nothing is on screen yet, a traceback would come
from deep inside a library, and torch's C initialisation swallows a KeyboardInterrupt raised in
its numpy import (the command then ran to the end with exit 0), so the process ends at once.

Stdlib only: this module must load in microseconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def _importing(frame) -> bool:
    """Whether the interrupted code runs inside an import (importlib's frames are on the stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib."):
            return True
        frame = frame.f_back
    return False


def on_sigint(signum, frame) -> None:
    if _importing(frame):
        with contextlib.suppress(Exception):
            sys.stdout.flush()  # an answer printed before a lazy import stays
        # A progress display may have hidden the terminal's cursor: show it again.
        os.write(2, (b"\x1b[?25h" if os.isatty(2) else b"") + b"interrupted\n")
        os._exit(130)
    raise KeyboardInterrupt


def install() -> None:
    """Handle Ctrl-C our way, unless SIGINT is ignored: a job started with `&` by a non-interactive
    shell inherits that, on purpose (Ctrl-C at the terminal is for the foreground job), and Python
    itself leaves it so."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, on_sigint)
