"""How a `dsvl2` command ends: the exit code and the one-line error of each way it can stop.

0 success; 1 a failure, with a one-line `error: ...` on stderr (missing file, unreadable image
or PDF, model not found, context too long: every Dsvl2Error); 2 a usage error; 130 Ctrl-C (what
was generated is flushed first); 141 stdout closed early (`... | head -1`). DSVL2_DEBUG=1 adds
the traceback to errors; an unexpected exception (a bug) always shows it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
import warnings

import typer
from rich.console import Console
from rich.text import Text

from .. import settings
from ..errors import Dsvl2Error
from .render import UI


def _click_class(name: str) -> type:
    """click's exception classes, wherever this typer takes click from (recent typers vendor it)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


UsageError, ClickException = _click_class("UsageError"), _click_class("ClickException")

def command(fn):
    """Ctrl-C and a closed stdout end a command quietly, with exit codes 130 and 141."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            ui = UI.current
            with contextlib.suppress(Exception):
                if ui is not None:
                    ui.end_line()  # what was generated stays, on a finished line
                sys.stdout.flush()
                sys.stderr.write("interrupted\n")
            raise typer.Exit(130) from None
        except BrokenPipeError:
            _silence_stdout()
            raise typer.Exit(141) from None
    return wrapper


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
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def run(command, argv: list[str]) -> int:
    """Run a click command on `argv` and return its exit code; errors end as one line on stderr."""
    with _one_line_warnings():
        return _run(command, argv)


def _run(command, argv: list[str]) -> int:
    if not argv:  # bare `dsvl2`: the help, on stderr, as the usage error it is
        with contextlib.redirect_stdout(sys.stderr):
            command.main(args=["--help"], prog_name="dsvl2", standalone_mode=False)
        return 2
    try:
        result = command.main(args=argv, prog_name="dsvl2", standalone_mode=False)
        code = result if isinstance(result, int) else 0
        sys.stdout.flush()
    except UsageError as err:
        if err.ctx is not None:
            sys.stderr.write(f"{err.ctx.get_usage()}\nTry '{err.ctx.command_path} --help' for help.\n")
        _fail(err.format_message())
        code = 2
    except ClickException as err:
        _fail(err.format_message())
        code = err.exit_code
    except typer.Abort:
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
        code = 130
    except Exception as err:  # noqa: BLE001 - out of memory, or a bug: then show everything
        oom = isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"  # torch's, on a GPU
        if settings.debug() or not oom:
            traceback.print_exc()
        _fail("out of memory; try fewer or smaller images, --dtype bfloat16, --device cpu or a smaller model"
              if oom else f"unexpected {type(err).__name__}: {err} (a bug: please report it with the traceback)")
        code = 1
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code
