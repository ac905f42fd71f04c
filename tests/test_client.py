"""RemoteModel: against recorded responses in vLLM's wire format (a tiny local http.server), and
against a real dsvl2 server process (answers equal local generation)."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import picture
from PIL import Image
from serving import Server, free_port

import dsvl2_cli
from dsvl2_cli.app.http.client import RemoteModel, to_openai_messages
from dsvl2_cli.engine.generate import Done, GenerationConfig, Prefilled, Token, generate
from dsvl2_cli.engine.prompt.processor import Message, user_message
from dsvl2_cli.errors import Dsvl2Error, ServerError

DATA = Path(__file__).parent / "data" / "vllm"


class Recorded(BaseHTTPRequestHandler):
    """/<scenario>/v1/...: ok (stream or not), cut, stop, unauth, boom, long."""

    protocol_version = "HTTP/1.1"
    bodies: list = []

    def log_message(self, *args):
        pass

    def _send(self, status, name, ctype="application/json", close=False):
        data = (DATA / name).read_bytes()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if close:  # a body delimited by the connection closing, cut before the end
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if close:
            self.wfile.flush()
            self.close_connection = True

    def do_GET(self):
        self._send(200, "models.json")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Recorded.bodies.append((self.path, dict(self.headers), body))
        scenario = self.path.split("/")[1]
        if scenario == "unauth":
            return self._send(401, "error_401.json")
        if scenario == "boom":
            return self._send(500, "error_500.json")
        if scenario == "long":
            return self._send(400, "error_400.json")
        if scenario == "cut":
            return self._send(200, "chat_stream_cut.sse", "text/event-stream", close=True)
        if scenario == "stop":
            return self._send(200, "chat_stream_stop.sse", "text/event-stream")
        if body.get("stream"):
            return self._send(200, "chat_stream.sse", "text/event-stream")
        return self._send(200, "chat_completion.json")


@pytest.fixture(scope="module")
def recorded():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorded)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_stream_of_recorded_vllm_answer(recorded):
    img = picture(40, 30)
    with RemoteModel(recorded + "/ok", api_key="k1") as m:
        events = list(m.stream([user_message("Locate the cat.", [img])], "Be brief.", GenerationConfig(max_tokens=9),
                               skip_special_tokens=False))
    assert isinstance(events[0], Prefilled) and events[0].prompt_tokens == 640 and events[0].reused_tokens == 512
    tokens = [e for e in events if isinstance(e, Token)]
    assert all(t.id is None for t in tokens)
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "eos" and done.token_ids == ()
    assert done.text == "<|ref|>the cat<|/ref|><|det|>[[12, 30, 400, 388]]<|/det|>"
    assert done.stats.prompt_tokens == 640 and done.stats.generated_tokens == 7 and done.stats.reused_tokens == 512
    path, headers, body = Recorded.bodies[-1]
    assert path == "/ok/v1/chat/completions" and headers["Authorization"] == "Bearer k1"
    assert body["model"] == "deepseek-ai/deepseek-vl2-tiny"  # asked from /v1/models
    assert body["max_tokens"] == 9 and body["stream"] and body["skip_special_tokens"] is False
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    parts = body["messages"][1]["content"]
    assert parts[0] == {"type": "text", "text": "<image>\nLocate the cat."}
    url = parts[1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (40, 30)


def test_stop_string_and_generate(recorded):
    m = RemoteModel(recorded + "/stop/v1", model="given")
    result = m.generate([user_message("Count")], config=GenerationConfig(stop=(", three",)))
    assert result.text == "one, two" and result.finish_reason == "stop"
    assert Recorded.bodies[-1][2]["model"] == "given" and Recorded.bodies[-1][2]["stop"] == [", three"]


def test_stream_cut_mid_answer_yields_what_arrived_then_raises(recorded):
    m = RemoteModel(recorded + "/cut", model="x")
    got = []
    with pytest.raises(ServerError, match="mid-answer") as info:
        for event in m.stream([user_message("hi")]):
            got.append(event)
    assert "".join(e.text for e in got if isinstance(e, Token)) == "<|ref|>the cat<|/ref|>"
    assert info.value.partial_text == "<|ref|>the cat<|/ref|>"


@pytest.mark.parametrize("scenario,status,words", [
    ("unauth", 401, "API key"), ("boom", 500, "ran out of memory"), ("long", 400, "maximum context length")])
def test_error_bodies_become_one_line_server_errors(recorded, scenario, status, words):
    m = RemoteModel(recorded + "/" + scenario, model="x")
    with pytest.raises(ServerError) as info:
        list(m.stream([user_message("hi")]))
    assert info.value.status == status and words in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, Dsvl2Error)


def test_unreachable_and_timeout():
    m = RemoteModel(f"http://127.0.0.1:{free_port()}", model="x", timeout=5)
    with pytest.raises(ServerError, match="cannot reach"):
        list(m.stream([user_message("hi")]))


def test_timeout_is_a_server_error():
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers
    try:
        m = RemoteModel(f"http://127.0.0.1:{listener.getsockname()[1]}", model="x", timeout=1)
        with pytest.raises(ServerError, match="did not answer within 1 s"):
            list(m.stream([user_message("hi")]))
    finally:
        listener.close()


def test_system_message_and_assistant_turns_are_sent_as_roles():
    msgs = to_openai_messages([Message("system", "S"), user_message("q"), Message("assistant", "a"),
                               user_message("q2")])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert to_openai_messages([Message("system", "S"), user_message("q")], system="T")[0]["content"] == "T"


# ------------------------------------------------------------------------- a real dsvl2 server

@pytest.fixture(scope="module")
def real(ckpt_tiny):
    s = Server(ckpt_tiny, "--api-key", "secret")
    yield s
    s.stop()


def test_remote_equals_local(ckpt_tiny, real):
    vlm = dsvl2_cli.load(ckpt_tiny, dtype="float32", device="cpu")
    img = picture(300, 200, seed=9)
    messages = [Message("system", "You look closely."), user_message("This is <image> here; what?", [img])]
    config = GenerationConfig(max_tokens=5)
    ref = generate(vlm, vlm.prepare(messages), config)
    with RemoteModel(real.url, api_key="secret") as m:
        events = list(m.stream(messages, None, config))
        again = m.generate(messages, None, config)
    done = events[-1]
    assert done.text == ref.text and done.stats.generated_tokens == len(ref.token_ids)
    assert events[0].prompt_tokens == ref.stats.prompt_tokens == done.stats.prompt_tokens
    assert done.finish_reason == ref.finish_reason
    assert again.text == ref.text and again.stats.reused_tokens == ref.stats.prompt_tokens - 1
    with pytest.raises(ServerError, match="API key"):
        list(RemoteModel(real.url, api_key="wrong", model="x").stream(messages, None, config))
    with pytest.raises(ServerError, match="context"):
        list(RemoteModel(real.url, api_key="secret").stream([user_message("word " * 5000)], None, config))
