"""Scripted conversations through the CLI: --conversation files and stdin, placeholders in plain
prompts, the token-level JSON result, and deterministic greedy runs."""

import json

import pytest
from test_cli import ANSWER_KEYS, _isolated, assert_clean, model_args, run  # noqa: F401 - fixture reused

from dsvl2_cli.dev.synthetic import write_image

pytestmark = pytest.mark.usefixtures("_isolated")


@pytest.fixture()
def convo(tmp_path):
    write_image(tmp_path / "a.png", 640, 480, seed=1)
    write_image(tmp_path / "b.png", 300, 900, seed=2)
    write_image(tmp_path / "c.png", 200, 200, seed=3)
    return tmp_path


def write(folder, messages):
    path = folder / "conv.json"
    path.write_text(json.dumps(messages))
    return path


def test_conversation_file_json_result(monkeypatch, ckpt_tiny, convo):
    path = write(convo, [
        {"role": "<|User|>", "content": "This is image_1: <image>\nThis is image_2: <image>\nCompare.",
         "images": ["a.png", "b.png"]},
        {"role": "<|Assistant|>", "content": ""},
    ])
    r = run(monkeypatch, "chat", "--conversation", path, "--json", *model_args(ckpt_tiny, 5))
    assert r.code == 0, r.stderr
    assert_clean(r)
    [record] = r.json_lines
    assert ANSWER_KEYS <= set(record)
    assert [(i["grid"], i["tokens"]) for i in record["images"]] == [([2, 2], 1023), ([1, 3], 211 + 42 * 15)]
    assert record["usage"]["image_tokens"] == [1023, 211 + 42 * 15]
    assert record["usage"]["prompt_tokens"] > sum(record["usage"]["image_tokens"])
    assert record["finish_reason"] in ("eos", "length")
    assert len(record["token_ids"]) == record["usage"]["generated_tokens"]
    assert set(record["timings"]) == {"time_to_first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s"}


def test_conversation_from_stdin_and_untiled_warning(monkeypatch, ckpt_small, convo):
    monkeypatch.chdir(convo)
    text = json.dumps([{"role": "user", "content": "<image><image><image>Which differs?",
                        "images": ["a.png", "b.png", "c.png"]}])
    r = run(monkeypatch, "chat", "--conversation", "-", "--json", *model_args(ckpt_small), input=text)
    assert r.code == 0, r.stderr
    [record] = r.json_lines
    assert [i["grid"] for i in record["images"]] == [[1, 1]] * 3
    assert "not tiled" in r.stderr or "tiling" in r.stderr


def test_conversation_with_history_answers_last_question(monkeypatch, ckpt_vl2, convo):
    path = write(convo, [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\n<|ref|>the cat<|/ref|>.", "images": ["a.png"]},
        {"role": "assistant", "content": "<|ref|>the cat<|/ref|><|det|>[[1, 2, 300, 400]]<|/det|>"},
        {"role": "user", "content": "<image>\n<|ref|>the cat<|/ref|>.", "images": ["c.png"]},
    ])
    r = run(monkeypatch, "chat", "--conversation", path, "--json", *model_args(ckpt_vl2))
    assert r.code == 0, r.stderr
    assert [i["grid"] for i in r.json_lines[0]["images"]] == [[2, 2], [1, 1]]


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "user", "content": "<image>", "images": []}], "1 <image> placeholder(s) but 0 image(s)"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "done"}], "must end with a user message"),
    ([{"role": "robot", "content": "hi"}], "role 'robot'"),
])
def test_bad_conversation_exits_1_with_one_line(monkeypatch, ckpt_tiny, convo, messages, needle):
    r = run(monkeypatch, "chat", "--conversation", write(convo, messages), *model_args(ckpt_tiny))
    assert r.code == 1 and r.stdout == ""
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1


def test_conversation_excludes_images_and_prompt(monkeypatch, ckpt_tiny, convo):
    r = run(monkeypatch, "chat", "--conversation", write(convo, [{"role": "user", "content": "x"}]),
            convo / "a.png", "hi", *model_args(ckpt_tiny))
    assert r.code == 2


def test_placeholders_in_plain_prompt(monkeypatch, ckpt_tiny, convo):
    ok = run(monkeypatch, "chat", convo / "a.png", convo / "c.png", "--json",
             "-P", "This is image_1: <image>\nThis is image_2: <image>\nCompare them.", *model_args(ckpt_tiny))
    assert ok.code == 0, ok.stderr
    assert [i["tokens"] for i in ok.json_lines[0]["images"]] == [1023, 421]
    bad = run(monkeypatch, "chat", convo / "a.png", convo / "c.png", "-P", "Only one <image> here.",
              *model_args(ckpt_tiny))
    assert bad.code == 1 and "1 <image> placeholder(s) but 2 image(s)" in bad.stderr


def test_greedy_runs_are_reproducible(monkeypatch, ckpt_small, convo):
    path = write(convo, [{"role": "user", "content": "<image>\nDescribe.", "images": ["a.png"]}])
    runs = [run(monkeypatch, "chat", "--conversation", path, "--json", "--temperature", "0",
                *model_args(ckpt_small, 12)) for _ in range(2)]
    ids = [r.json_lines[0]["token_ids"] for r in runs]
    assert ids[0] == ids[1] and len(ids[0]) > 0
    seeded = [run(monkeypatch, "chat", "--conversation", path, "--json", "--temperature", "0.7", "--seed", "3",
                  *model_args(ckpt_small, 12)).json_lines[0]["token_ids"] for _ in range(2)]
    assert seeded[0] == seeded[1]
