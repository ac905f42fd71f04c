"""The terminal: the answer on stdout, everything else on stderr (`UI`).

Stdout carries only the answer; status, spinners, progress bars, timings and warnings go to
stderr through Rich (colour only on a terminal, never with NO_COLOR).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from ... import settings
from ..inputs.sources import isatty


class UI:
    """The answer goes to stdout; everything else to stderr. `UI.current` is the latest one
    (the CLI's Ctrl-C handler uses it to end a half-written line)."""

    current: "UI | None" = None

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        # Pictures and colour on stdout only for a terminal, and never with NO_COLOR.
        self.out_tty = isatty(sys.stdout) and not settings.no_color()
        self.mid_line = False
        self._answer_started = False
        UI.current = self

    # -- stdout
    def write(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.mid_line = not text.endswith("\n")

    def line(self, text: str = "") -> None:
        self.write(text + "\n")

    def end_line(self) -> None:
        if self.mid_line:
            self.write("\n")

    def start_answer(self) -> None:
        self._answer_started = False

    def answer_text(self, text: str) -> None:
        """Streamed answer text, without its leading whitespace (the model starts with a space)."""
        if not self._answer_started:
            text = text.lstrip()
            self._answer_started = bool(text)
        self.write(text)

    # -- stderr
    def status(self, message: str) -> None:
        if not self.quiet:
            self.err.print(Text(message, style="dim"))

    def warn(self, message: str) -> None:
        self.err.print(Text("warning: ", style="bold yellow") + Text(message))

    def error(self, message: str) -> None:
        self.err.print(Text("error: ", style="bold red") + Text(message))

    @property
    def live(self) -> bool:
        """Whether spinners and progress bars show: on a terminal, without -q."""
        return not self.quiet and self.err.is_terminal

    def progress(self, *columns, **kwargs) -> Progress:
        # redirect_stdout=False: Rich would otherwise send our stdout through the stderr console.
        return Progress(*columns, console=self.err, transient=True, disable=not self.live,
                        redirect_stdout=False, redirect_stderr=False, **kwargs)

    @contextlib.contextmanager
    def spinner(self, message: str) -> Iterator[Progress]:
        progress = self.progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        progress.add_task(message, total=None)
        with progress:
            yield progress
