"""The interactive chat of `dsvl2 chat`: reading messages (readline, multi-line, scripted stdin),
the slash commands, and one turn's display. The command line (cli.py) sets the session up."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from pathlib import Path

from ... import settings
from ...errors import Dsvl2Error
from ..chat import ChatSession, chat_turn
from ..inputs.sources import isatty, load_image_arg
from ..options import Options
from .render import AnswerView, render_answer, warn_untiled
from .ui import UI

CHAT_HELP = """commands:
  /image PATH...   attach images to your next message
  /reset           forget the conversation (images from the command line are attached again)
  /help            this help
  /quit            leave (also /exit and Ctrl-D)
  \"\"\"              begin and end a message of several lines
Ctrl-C stops an answer; at the prompt it leaves."""


class LineReader:
    """Messages from the terminal (readline line editing and history) or, scripted, stdin lines."""

    def __init__(self, ui: UI):
        self.ui = ui
        self.terminal = isatty(sys.stdin)
        self.readline = self.terminal and isatty(sys.stdout)
        self.history: Path | None = None
        if self.readline:
            try:
                import readline
            except ImportError:
                self.readline = False
            else:
                self.history = settings.state_dir() / "chat_history"
                with contextlib.suppress(OSError):
                    readline.read_history_file(self.history)

    def read(self, prompt: str) -> str | None:
        """One line without its newline; None at the end of input."""
        try:
            if self.readline:
                try:
                    return input(prompt)
                except EOFError:
                    print()  # Ctrl-D: leave the shell's prompt on a fresh line
                    raise
            if self.terminal:  # stdout is piped: keep the prompt off it
                self.ui.err.print(prompt, end="", markup=False, highlight=False)
            line = sys.stdin.readline()
        except EOFError:
            return None
        return None if line == "" else line.rstrip("\r\n")

    def message(self) -> str | None:
        line = self.read(">>> ")
        if line is None or not line.lstrip().startswith('"""'):
            return line
        lines = [line.lstrip()[3:]]
        while not lines[-1].rstrip().endswith('"""'):
            more = self.read("... ")
            if more is None:
                break
            lines.append(more)
        text = "\n".join(lines).rstrip()
        return text[:-3] if text.endswith('"""') else text

    def save(self) -> None:
        if self.readline and self.history is not None:
            import readline

            with contextlib.suppress(OSError):
                self.history.parent.mkdir(parents=True, exist_ok=True)
                readline.set_history_length(1000)
                readline.write_history_file(self.history)


def interactive_chat(session: ChatSession, opts: Options, ui: UI, images: list, first: str | None = None) -> bool:
    """The chat loop. Returns True when a scripted run (stdin not a terminal) had a failure."""
    reader = LineReader(ui)
    n = len(images)
    attached = f" · {n} image{'s' if n != 1 else ''} attached" if n else ""
    ui.status(f"chatting with {session.backend.name}{attached} · /help for commands · /quit or Ctrl-D to leave")
    failed = False
    try:
        while True:
            text = first if first is not None else reader.message()
            first = None
            if text is None:
                break
            if not text.strip():
                continue
            if not text.startswith("/"):
                failed |= not _chat_turn(session, text, opts, ui)
                continue
            word, _, rest = text.strip().partition(" ")
            word = word.lower()
            if word in ("/quit", "/exit", "/bye"):
                break
            if word in ("/help", "/?"):
                ui.err.print(CHAT_HELP, markup=False, highlight=False)
            elif word in ("/reset", "/clear"):
                session.reset(images)
                ui.status("conversation reset" + (f"; {n} image(s) from the command line attached" if n else ""))
            elif word in ("/image", "/img"):
                failed |= not _attach(session, rest, ui)
            else:
                ui.error(f"unknown command {word}; /help lists the commands")
                failed = True
    finally:
        reader.save()
    return failed and not reader.terminal


def _chat_turn(session: ChatSession, text: str, opts: Options, ui: UI) -> bool:
    events = chat_turn(session, text)
    try:
        render_answer(events, ui, AnswerView(stream=opts.stream, json=opts.json))
    except KeyboardInterrupt:
        events.close()  # the session keeps the partial answer
        ui.end_line()
        ui.warn("answer interrupted")
        return True
    except Dsvl2Error as err:
        ui.end_line()
        ui.error(str(err))
        return False
    return True


def _attach(session: ChatSession, rest: str, ui: UI) -> bool:
    try:
        paths = shlex.split(rest)
    except ValueError:
        paths = [rest.strip()]
    if not paths:
        ui.error("/image needs a path: /image PATH...")
        return False
    ok = True
    for path in paths:
        try:
            img = load_image_arg(os.path.expanduser(path), ui.warn)
        except Dsvl2Error as err:
            ui.error(str(err))
            ok = False
            continue
        tiling = session.tiling
        session.add_image(img)
        ui.status(f"{path}: {img.width}x{img.height}, attached to your next message")
        if tiling and not session.tiling:
            warn_untiled(ui, session.image_count, "images in this chat",
                          "/reset to start again with fewer")
    return ok
