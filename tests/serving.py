"""Start a real `python -m dsvl2_cli.app.http.serve` process for the server and client tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from subprocess_env import subprocess_env

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = subprocess_env()
        cmd = [sys.executable, "-m", "dsvl2_cli.app.http.serve", "-m", str(model), "--dtype", "float32",
               "--device", "cpu", "--port", str(self.port), "--exit-with-parent", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        self._wait()

    def _wait(self, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not start in time")

    def healthy(self) -> bool:
        return httpx.get(self.url + "/health", timeout=10).json()["status"] == "ok"

    def active(self) -> int:
        return httpx.get(self.url + "/health", timeout=10).json()["active"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()
