"""How a `dsvl2` command ends: the exit code and the one-line error of each way it can stop.

0 success; 1 a failure, with a one-line `error: ...` on stderr (missing file, unreadable image
or PDF, model not found, context too long: every Dsvl2Error); 2 a usage error; 130 Ctrl-C (what
was generated is flushed first); 141 stdout closed early (`... | head -1`). DSVL2_DEBUG=1 adds
the traceback to errors; an unexpected exception (a bug) always shows it. Running out of memory
(MemoryError, torch's OutOfMemoryError, a failed mmap) is no bug: one line saying what ran out, 1.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import traceback
import warnings
from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

from ... import settings
from ...errors import Dsvl2Error


def _click_class(name: str) -> type:
    """click's exception classes, wherever this typer takes click from (recent typers vendor it)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


UsageError, ClickException = _click_class("UsageError"), _click_class("ClickException")

def command(fn):
    """Ctrl-C and a closed stdout end a command quietly, with exit codes 130 and 141; an error
    after part of an answer was written ends that line before `run` prints the error."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            _interrupted()
            raise typer.Exit(130) from None
        except BrokenPipeError:
            _silence_stdout()
            raise typer.Exit(141) from None
        except Dsvl2Error:
            # e.g. a server's stream cut mid-answer: what was shown stays, on a finished line
            _end_line()
            raise
    return wrapper


def _end_line() -> None:
    """End a half-written answer line, if a command has written one."""
    # ui.py (and its UI) is loaded only once a command has run; before that nothing is shown.
    module = sys.modules.get(f"{__package__}.ui")
    ui = module.UI.current if module is not None else None
    with contextlib.suppress(Exception):
        if ui is not None:
            ui.end_line()


_said_interrupted = False


def _interrupted() -> None:
    """Flush what was generated, on a finished line, and say why the command stopped (once)."""
    global _said_interrupted
    _end_line()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        if not _said_interrupted:
            sys.stderr.write("interrupted\n")
    _said_interrupted = True


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush cannot fail again."""
    with contextlib.suppress(Exception):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _fail(message: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        Text("error: ", style="bold red") + Text(" ".join(message.split())))


@contextlib.contextmanager
def _one_line_warnings():
    """dsvl2's own warnings (warnings.warn in the library, e.g. a damaged prompt cache entry) as
    one `warning: ...` line on stderr, like the CLI's other warnings; others as Python shows them."""
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dsvl2_cli/
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(package + os.sep):
            Console(stderr=True, highlight=False, soft_wrap=True).print(
                Text("warning: ", style="bold yellow") + Text(" ".join(str(message).split())))
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def finish(code: int) -> NoReturn:
    """End the process with `code` once the command is done (the console script's last step).

    With torch imported, the interpreter's own teardown (thousands of modules, torch's C++
    statics) takes 0.5-0.65 s here after a bare `import torch`, on every command, after its
    answer was complete. Nothing of ours needs it: every file we write is complete (renamed into
    place) before the command returns, and no thread of ours outlives it except daemons. So once
    stdout and stderr are flushed the process exits at once (os._exit). Without torch, or with
    another non-daemon thread still running, it exits the normal way."""
    flushed = True
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # the reader went away (`| head -1`): as `command` ends such a run
            if stream is sys.stdout:
                _silence_stdout()
                code = code or 141
        except Exception:  # noqa: BLE001 - a closed or replaced stream: let the normal exit deal with it
            flushed = False
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if flushed and not others and "torch" in sys.modules:
        os._exit(code)
    sys.exit(code)


def run(app: typer.Typer, argv: list[str]) -> int:
    """Run a Typer app on `argv` and return its exit code; errors end as one line on stderr."""
    with _one_line_warnings():
        return _run(app, argv)


def _out_of_memory(err: BaseException) -> str | None:
    """The one-line message of an out-of-memory error (an estimate off, another process growing),
    None for anything else. fit imports torch: only here, so that a CLI start need not."""
    try:
        from ...engine.loading.fit import describe_oom
    except Exception:  # noqa: BLE001 - importing may itself run out of memory
        return "out of memory (RAM)" if isinstance(err, MemoryError) else None
    return describe_oom(err)


def _run(app: typer.Typer, argv: list[str]) -> int:
    global _said_interrupted
    _said_interrupted = False
    try:
        command = typer.main.get_command(app)  # inside the try: Ctrl-C may come at any moment
        if not argv:  # bare `dsvl2`: the help, on stderr, as the usage error it is
            with contextlib.redirect_stdout(sys.stderr):
                command.main(args=["--help"], prog_name="dsvl2", standalone_mode=False)
            return 2
        result = command.main(args=argv, prog_name="dsvl2", standalone_mode=False)
        code = result if isinstance(result, int) else 0
        if code == 130:
            # Ctrl-C outside a `command` body (parsing the command line, an option's callback,
            # Typer's own code): Typer turns that KeyboardInterrupt into a silent Exit(130).
            _interrupted()
        sys.stdout.flush()
    except UsageError as err:
        if err.ctx is not None:
            sys.stderr.write(f"{err.ctx.get_usage()}\nTry '{err.ctx.command_path} --help' for help.\n")
        _fail(err.format_message())
        code = 2
    except ClickException as err:
        _fail(err.format_message())
        code = err.exit_code
    except typer.Abort:  # click's name for a KeyboardInterrupt that reached it
        _interrupted()
        code = 130
    except Dsvl2Error as err:
        if settings.debug():
            traceback.print_exc()
        _fail(str(err))
        code = 1
    except BrokenPipeError:
        _silence_stdout()
        code = 141
    except KeyboardInterrupt:
        _interrupted()
        code = 130
    except Exception as err:  # noqa: BLE001 - out of memory, or a bug: then show everything
        oom = _out_of_memory(err)
        if settings.debug() or oom is None:
            traceback.print_exc()
        _fail(oom or f"unexpected {type(err).__name__}: {err} (a bug: please report it with the traceback)")
        code = 1
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code
