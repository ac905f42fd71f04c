"""`--server URL` and `dsvl2 serve` through the CLI: the same commands answered by a real dsvl2
server process (tests/serving.py, float32 tiny fixture) give the text, finish reason and prompt
size of the local run; server failures end in one `error:` line; `dsvl2 serve` itself starts,
answers /health and stops on SIGINT. Greedy, float32, a few tokens each."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from serving import REPO, Server, free_port
from subprocess_env import subprocess_env
from test_cli import ANSWER_KEYS, _cached_load_weights, assert_clean, assert_one_line_error, model_args, run
from test_client import Recorded, recorded  # noqa: F401 - fixture

from dsvl2_cli.app import backends
from dsvl2_cli.app.terminal import cli
from dsvl2_cli.app.http import server_run
from dsvl2_cli.app.http.protocol import ServeSettings
from dsvl2_cli.dev.synthetic import write_image


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    monkeypatch.setattr(cli, "load_weights", _cached_load_weights)
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("DSVL2_MODEL", "DSVL2_DEBUG", "DSVL2_SERVER", "DSVL2_API_KEY", "NO_COLOR", "FORCE_COLOR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def server(ckpt_tiny):
    s = Server(ckpt_tiny, "--api-key", "secret")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    return write_image(tmp_path_factory.mktemp("srv_images") / "photo.png", 96, 64, seed=5)


def remote(server, *args):
    return ["--server", server.url, "--api-key", "secret", *args]


def same_answer(local: dict, far: dict) -> None:
    assert far["text"] == local["text"]
    assert far["finish_reason"] == local["finish_reason"]
    assert far["usage"]["prompt_tokens"] == local["usage"]["prompt_tokens"]
    assert far["usage"]["generated_tokens"] == local["usage"]["generated_tokens"]


def test_chat_json_over_the_server_equals_local(monkeypatch, ckpt_tiny, server, photo):
    local = run(monkeypatch, "chat", *model_args(ckpt_tiny, 5), "--json", photo, "What is this?")
    far = run(monkeypatch, "chat", *remote(server, "--max-tokens", "5", "--json"), photo, "What is this?")
    assert local.code == 0 and far.code == 0, far.stderr
    (lrec,), (rrec,) = local.json_lines, far.json_lines
    same_answer(lrec, rrec)
    assert set(rrec) == ANSWER_KEYS
    assert rrec["token_ids"] == [] and lrec["token_ids"]
    assert rrec["images"] == [{"input": str(photo), "page": None, "size": [96, 64], "grid": None, "tokens": None}]
    assert rrec["usage"]["image_tokens"] == [None]
    assert "loaded in" not in far.stderr and "loaded in" in local.stderr  # no local model with --server
    assert_clean(far)


def test_ocr_text_over_the_server_from_the_environment(monkeypatch, ckpt_tiny, server, photo):
    local = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 4), photo)
    far = run(monkeypatch, "ocr", "--max-tokens", "4", photo, env={"DSVL2_SERVER": server.url,
                                                                   "DSVL2_API_KEY": "secret"})
    assert local.code == 0 and far.code == 0, far.stderr
    assert far.stdout == local.stdout and far.stdout.strip()


def test_ground_json_over_the_server_equals_local(monkeypatch, ckpt_tiny, server, photo):
    local = run(monkeypatch, "ground", *model_args(ckpt_tiny, 6), "--json", photo, "the cat")
    far = run(monkeypatch, "ground", *remote(server, "--max-tokens", "6", "--json"), photo, "the cat")
    assert local.code == 0 and far.code == 0, far.stderr
    (lrec,), (rrec,) = local.json_lines, far.json_lines
    same_answer(lrec, rrec)
    assert rrec["raw"] == lrec["raw"] and rrec["boxes"] == lrec["boxes"] and rrec["problems"] == lrec["problems"]


def test_ground_asks_the_server_for_special_tokens(monkeypatch, recorded, photo):
    r = run(monkeypatch, "ground", "--server", recorded + "/ok", "--json", photo, "the cat")
    assert r.code == 0, r.stderr
    (rec,) = r.json_lines
    assert Recorded.bodies[-1][2]["skip_special_tokens"] is False
    assert rec["boxes"][0]["label"] == "the cat" and rec["boxes"][0]["box_999"] == [12, 30, 400, 388]
    chat = run(monkeypatch, "chat", "--server", recorded + "/ok", "--json", photo, "hi")
    assert chat.code == 0 and Recorded.bodies[-1][2]["skip_special_tokens"] is True


def test_loading_options_with_a_server_are_named_as_ignored(monkeypatch, recorded, photo):
    r = run(monkeypatch, "chat", "--server", recorded + "/ok", "--dtype", "float32", "--quantize", "int8",
            "--vision-int8", "--json", photo, "hi")
    assert r.code == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "--dtype, --quantize, --vision-int8" in warnings[0] and "ignored" in warnings[0]
    plain = run(monkeypatch, "chat", "--server", recorded + "/ok", "--json", photo, "hi")
    assert plain.code == 0 and "warning: " not in plain.stderr


def test_specials_other_than_grounding_tags_are_dropped():
    text = "<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|><|User|>x<｜end▁of▁sentence｜><image>"
    assert backends._local_specials_only(text) == "<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>x"


def test_unreachable_server_is_one_line(monkeypatch, photo):
    r = run(monkeypatch, "chat", "--server", f"http://127.0.0.1:{free_port()}", photo, "hi")
    assert_one_line_error(r, "cannot reach the server")


def test_wrong_api_key_is_one_line(monkeypatch, server, photo):
    r = run(monkeypatch, "ask", "--server", server.url, "--api-key", "wrong", photo, "hi")
    assert_one_line_error(r, "refused the API key", "401")


_TORCH_PROBE = """
import runpy, sys
sys.argv = ["dsvl2", *sys.argv[1:]]
try:
    runpy.run_module("dsvl2_cli", run_name="__main__")
except SystemExit as e:
    code = e.code
print("torch imported" if "torch" in sys.modules else "no torch", code, file=sys.stderr)
"""


@pytest.mark.parametrize("command", [["chat", "hi"], ["ground", "the cat"], ["ocr"], ["ask", "what?"]])
def test_a_command_answered_by_a_server_never_imports_torch(recorded, photo, command):
    """Instant startup against a running server: no torch import (~1.3 s here) on the remote path."""
    name, *rest = command
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DSVL2_SERVER", None)
    done = subprocess.run([sys.executable, "-c", _TORCH_PROBE, name, "--server", recorded + "/ok", "--json",
                           str(photo), *rest], capture_output=True, text=True, env=env, timeout=120)
    last = done.stderr.strip().splitlines()[-1]
    assert last == "no torch 0", done.stderr[-2000:]


def test_stream_cut_mid_answer_prints_what_arrived_then_the_error(monkeypatch, recorded, photo):
    r = run(monkeypatch, "chat", "--server", recorded + "/cut", photo, "hi")
    assert r.code == 1
    assert r.stdout.strip() and r.stdout.endswith("\n")  # the partial answer, on a finished line
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "mid-answer" in errors[0] and "Traceback" not in r.stderr


def test_server_errors_are_one_line(monkeypatch, recorded, photo):
    r = run(monkeypatch, "chat", "--server", recorded + "/boom", photo, "hi")
    assert_one_line_error(r, "answered 500")


# -------------------------------------------------------------------------------- dsvl2 serve

def test_serve_refuses_a_port_in_use_before_loading(monkeypatch, ckpt_tiny):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run(monkeypatch, "serve", "-m", ckpt_tiny, "--port", busy.getsockname()[1])
    assert_one_line_error(r, "port is in use")
    assert "loaded in" not in r.stderr


def test_serve_warns_when_exposed_without_a_key():
    assert server_run.exposure_warning(ServeSettings(host="0.0.0.0")) is not None
    assert server_run.exposure_warning(ServeSettings(host="0.0.0.0", api_key="k")) is None
    assert server_run.exposure_warning(ServeSettings(host="127.0.0.1")) is None
    assert server_run.exposure_warning(ServeSettings(host="::1")) is None
    assert server_run.base_url(ServeSettings(host="::1", port=9)) == "http://[::1]:9"


def test_dsvl2_serve_answers_and_stops_on_sigint(ckpt_tiny):
    port = free_port()
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-m", "dsvl2_cli", "serve", "-m", str(ckpt_tiny), "--port", str(port),
                             "--dtype", "float32", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        url, end = f"http://127.0.0.1:{port}", time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < end, "dsvl2 serve did not start in time"
            try:
                if httpx.get(url + "/health", timeout=2).json()["status"] == "ok":
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        models = httpx.get(url + "/v1/models", timeout=10).json()
        assert models["data"][0]["id"]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, 130), err
        assert "Traceback" not in err and out == ""
        assert f"{url}/v1" in err  # the URL to give --server, on stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
