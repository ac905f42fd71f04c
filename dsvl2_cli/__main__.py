"""`python -m dsvl2_cli`: the same as the `dsvl2` command."""

from .app.terminal.cli import entry

if __name__ == "__main__":
    entry()
