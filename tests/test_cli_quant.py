"""Quantization through the CLI: --quantize at load, `dsvl2 quantize SRC DST`, `info` memory."""

import json

import pytest
from test_cli import _isolated, model_args, run  # noqa: F401 - fixture reused

from dsvl2_cli.dev.synthetic import write_image

pytestmark = pytest.mark.usefixtures("_isolated")


def test_quantize_command_then_chat_from_the_folder(monkeypatch, ckpt_tiny, tmp_path):
    dst = tmp_path / "tiny-int4"
    r = run(monkeypatch, "quantize", ckpt_tiny, dst, "--method", "int4")
    assert r.code == 0, r.stderr
    assert r.stdout.strip() == str(dst)
    assert json.loads((dst / "config.json").read_text())["dsvl2_quantization"]["method"] == "int4"
    img = write_image(tmp_path / "a.png", 64, 48, seed=0)
    chat = run(monkeypatch, "chat", img, "Describe.", "--json", *model_args(dst, 3))
    assert chat.code == 0, chat.stderr
    wrong = run(monkeypatch, "chat", img, "Describe.", "--quantize", "int8", *model_args(dst, 3))
    assert wrong.code == 1 and "int4" in wrong.stderr and "Traceback" not in wrong.stderr
    again = run(monkeypatch, "quantize", ckpt_tiny, dst)
    assert again.code == 1 and str(dst) in again.stderr


def test_chat_quantize_at_load_and_bad_method(monkeypatch, ckpt_small, tmp_path):
    img = write_image(tmp_path / "a.png", 64, 48, seed=0)
    ok = run(monkeypatch, "chat", img, "Describe.", "--quantize", "int8", "--json", *model_args(ckpt_small, 3))
    assert ok.code == 0, ok.stderr
    bad = run(monkeypatch, "chat", img, "Describe.", "--quantize", "int3", *model_args(ckpt_small, 3))
    assert bad.code == 1 and "int3" in bad.stderr


def test_info_shows_weight_memory_by_component(monkeypatch, ckpt_tiny):
    plain = run(monkeypatch, "info", "-m", ckpt_tiny, "--json").json_lines[0]
    q4 = run(monkeypatch, "info", "-m", ckpt_tiny, "--json", "--quantize", "int4").json_lines[0]
    assert plain["weight_memory"]["total"] == sum(v for k, v in plain["weight_memory"].items() if k != "total")
    assert q4["weight_memory"]["routed_experts"] < plain["weight_memory"]["routed_experts"] / 3
    assert q4["weight_memory"]["vision"] == plain["weight_memory"]["vision"]
    text = run(monkeypatch, "info", "-m", ckpt_tiny, "--quantize", "int4")
    assert "routed experts" in text.stdout and "int4" in text.stdout
