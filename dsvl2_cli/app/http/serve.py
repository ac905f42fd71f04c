"""`python -m dsvl2_cli.app.http.serve ARGS` is `dsvl2 serve ARGS`: the same command (cli_admin.serve),
with the same options, defaults, messages and exit codes, for the tests and benchmarks that start
a server process (they add the hidden --exit-with-parent).

The server itself: server_app.py (the HTTP app), server_run.py (binding and running it)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run `dsvl2 serve` with `argv` (default: this process's arguments); returns the exit code."""
    from ..terminal import cli

    return cli.main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from ..terminal.exits import finish

    finish(main())
