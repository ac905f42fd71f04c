"""`python -m dsvl2_cli`: the same as the `dsvl2` command."""

from .app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
