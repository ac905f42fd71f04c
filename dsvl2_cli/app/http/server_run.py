"""Running `dsvl2 serve`'s HTTP app (server_app.py): where it listens (checked before the model
loads, with a warning when other machines can reach it unauthenticated), uvicorn until Ctrl-C,
and stopping with the process that started it (--exit-with-parent, for test servers).

The command itself (its options, the model load) is cli_admin.serve; `python -m
dsvl2_cli.app.http.serve` runs that same command."""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import socket
import threading
import time

from ...errors import Dsvl2Error
from . import server_app
from .protocol import _EXTRA, ServeSettings, require_extra


def run(vlm, settings: ServeSettings | None = None) -> None:
    """Serve `vlm` with uvicorn until interrupted (Ctrl-C: a clean shutdown)."""
    require_extra()
    try:
        import uvicorn
    except ImportError:  # pragma: no cover
        raise Dsvl2Error(_EXTRA) from None
    settings = settings or ServeSettings()
    app = server_app.create_app(vlm, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()


def base_url(settings: ServeSettings) -> str:
    """The URL clients use (`--server URL`); an IPv6 host goes in brackets."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_warning(settings: ServeSettings) -> str | None:
    """A warning when the server is reachable from other machines with no API key (None when fine).
    Allowed, not refused: a trusted network or a proxy in front may do the authentication."""
    if settings.api_key or _loopback(settings.host):
        return None
    return (f"--host {settings.host} makes the server reachable from other machines and no API key is set: "
            "anyone who can reach it can use it; set --api-key or DSVL2_API_KEY")


def check_bind(settings: ServeSettings) -> None:
    """Fail in one line, before the model loads, if the address cannot be listened on (uvicorn
    would only log it after the load and exit with a traceback-free but late error)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind((settings.host, settings.port))
    except (socket.gaierror, UnicodeError):  # before OSError, of which gaierror is one
        raise Dsvl2Error(f"cannot listen on {base_url(settings)}: unknown host {settings.host!r}") from None
    except OSError as exc:
        why = {errno.EADDRINUSE: "the port is in use (another server?); choose another with --port",
               errno.EACCES: "permission denied (ports below 1024 need privileges); choose another with --port",
               errno.EADDRNOTAVAIL: "this machine has no such address; check --host"}.get(
                   exc.errno, exc.strerror or str(exc))
        raise Dsvl2Error(f"cannot listen on {base_url(settings)}: {why}") from None


def exit_with_parent() -> None:
    """Stop (as if Ctrl-C) when the process that started us is gone: no orphaned test servers."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="dsvl2-parent-watch", daemon=True).start()
