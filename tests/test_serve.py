"""The server as a real process on 127.0.0.1, talked to with the official openai client and httpx:
answers equal local generation, concurrent clients, disconnects, every bad request, auth, SIGINT."""

from __future__ import annotations

import base64
import io
import json
import signal
import threading
import time

import httpx
import openai
import pytest
import torch
from helpers import picture
from PIL import Image
from serving import Server

from dsvl2_cli.engine.generate import GenerationConfig, generate
from dsvl2_cli.engine.prompt.processor import Message, user_message

KEY = "sk-test-123"


def data_url(img: Image.Image, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server(ckpt_tiny):
    s = Server(ckpt_tiny, "--max-images", "2", "--max-body-bytes", str(2 << 20))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="anything", timeout=120, max_retries=0)


def local(vlm, messages, max_tokens):
    return generate(vlm, vlm.prepare(messages), GenerationConfig(max_tokens=max_tokens))


def test_image_then_text_is_the_chat_prompt_and_answer(vlm, server, client):
    img = picture(320, 240, seed=1)
    ref = local(vlm, [user_message("Describe this image.", [img])], 6)
    content = [{"type": "image_url", "image_url": {"url": data_url(img)}},
               {"type": "text", "text": "Describe this image."}]
    r = client.chat.completions.create(model="whatever", messages=[{"role": "user", "content": content}],
                                       max_tokens=6, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.prompt_tokens == ref.stats.prompt_tokens
    assert r.choices[0].finish_reason == {"eos": "stop", "length": "length"}[ref.finish_reason]
    assert r.model == vlm.name
    # streamed: the same text, usage at the end, and now the prompt is cached
    chunks = list(client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": content}], max_tokens=6, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == ref.stats.prompt_tokens - 1


def test_multi_turn_system_and_grounding_tags(vlm, server):
    messages = [Message("system", "You are terse."), user_message("Find <|ref|>the cat<|/ref|>."),
                Message("assistant", "It is there."), user_message("And the dog?")]
    ref = local(vlm, messages, 5)
    body = {"messages": [{"role": m.role, "content": m.content} for m in messages], "max_tokens": 5,
            "skip_special_tokens": False}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    assert r["usage"]["prompt_tokens"] == ref.stats.prompt_tokens
    assert r["usage"]["completion_tokens"] == len(ref.token_ids)
    decoder = vlm.tokenizer.stream(skip_special=False)
    expected = "".join(decoder.push(i) for i in ref.token_ids) + decoder.flush()
    assert r["choices"][0]["message"]["content"] == expected


def test_parts_map_to_the_prompt_of_the_processor(vlm):
    from dsvl2_cli.app.http.protocol import ChatCompletionRequest, ServeSettings, Translator
    img = picture(64, 64, seed=2)
    t = Translator(vlm, ServeSettings())
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(img)}}, {"type": "text", "text": "What is it?"}]}]})
    got = vlm.prepare(t.messages(req)).input_ids
    assert torch.equal(got, vlm.prepare([user_message("What is it?", [img])]).input_ids)
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Left: <image> right: <image> compare."},
        {"type": "image_url", "image_url": {"url": data_url(img)}},
        {"type": "image_url", "image_url": {"url": data_url(img)}}]}]})
    msg = t.messages(req)[0]
    assert msg.content == "Left: <image> right: <image> compare." and len(msg.images) == 2


def test_eight_concurrent_clients_each_get_their_own_answer(vlm, server):
    prompts = [f"Tell me about number {i}." + " please" * i for i in range(8)]
    refs = [local(vlm, [user_message(p)], 4 + i % 3) for i, p in enumerate(prompts)]
    out = [None] * 8

    def ask(i):
        body = {"messages": [{"role": "user", "content": prompts[i]}], "max_tokens": 4 + i % 3}
        out[i] = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300).json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for r, ref in zip(out, refs):
        assert r["choices"][0]["message"]["content"] == ref.text
        assert r["usage"]["completion_tokens"] == len(ref.token_ids)


def test_disconnect_mid_stream_then_still_serving(vlm, server):
    body = {"messages": [{"role": "user", "content": "A long answer please"}], "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.monotonic() + 30
    while server.active() and time.monotonic() < deadline:  # the generation stopped with the client
        time.sleep(0.2)
    assert server.active() == 0
    ref = local(vlm, [user_message("Short one")], 3)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                   json={"messages": [{"role": "user", "content": "Short one"}], "max_tokens": 3}).json()
    assert r["choices"][0]["message"]["content"] == ref.text


BAD = [
    ("bad json", dict(content=b'{"messages": [', headers={"content-type": "application/json"}), 400),
    ("missing messages", dict(json={"model": "x"}), 422),
    ("bad role", dict(json={"messages": [{"role": "robot", "content": "hi"}]}), 422),
    ("bad data url", dict(json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}), 400),
    ("not an image", dict(json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}}]}]}),
     400),
    ("remote url", dict(json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}), 400),
    ("too many images", dict(json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * 3}]}), 400),
    ("too long", dict(json={"messages": [{"role": "user", "content": "word " * 5000}], "max_tokens": 2}), 400),
    ("body too large", dict(content=b"x" * (3 << 20), headers={"content-type": "application/json"}), 413),
    ("bad temperature", dict(json={"messages": [{"role": "user", "content": "hi"}], "temperature": -1}), 422),
    ("empty prompt", dict(json={"messages": [{"role": "user", "content": "  "}]}), 400),
]


@pytest.mark.parametrize("name,kwargs,status", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_an_error_object(server, name, kwargs, status):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and "code" in err
    if name == "too long":
        assert "context" in err["message"] and err["code"] == "context_length_exceeded"
    assert server.healthy()


def test_unknown_route_is_404_object(server):
    r = httpx.get(server.url + "/v2/nothing", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_models_endpoint(server, client, vlm):
    assert [m.id for m in client.models.list().data] == [vlm.name]


@pytest.fixture(scope="module")
def auth_server(ckpt_tiny):
    s = Server(ckpt_tiny, "--api-key", KEY)
    yield s
    s.stop()


def test_api_key_required(auth_server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(auth_server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=auth_server.url + "/v1", api_key="nope", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=auth_server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert ok.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2).usage
    assert auth_server.healthy()  # /health needs no key


def test_sigint_stops_cleanly(auth_server):
    auth_server.proc.send_signal(signal.SIGINT)
    code = auth_server.proc.wait(60)
    err = auth_server.proc.stderr.read()
    assert code in (0, 130), err
    assert "Traceback" not in err


def test_stream_chunks_are_openai_shaped(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 3
