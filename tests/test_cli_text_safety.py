"""Answers are text (issue 16): control bytes a model emits and tokenizer-internal tokens
(placeholders, pad) never reach stdout, in a terminal stream or a pipe; --json keeps the exact ids."""

from __future__ import annotations

import pytest

from dsvl2_cli.engine.generate import Sequence
from dsvl2_cli.engine.prompt.tokenizer import Tokenizer
from test_cli import _isolated, images, model_args, run  # noqa: F401 (fixtures: a cached loader, test images)

NASTY = "A\x00B\x1b[31mC\x1aD\x1dE\tF\nG\x7fH"


@pytest.fixture()
def scripted(monkeypatch, ckpt_tiny):
    """The model 'answers' a fixed token sequence: control bytes, a placeholder, pad, then eos."""
    tok = Tokenizer.from_dir(ckpt_tiny)
    placeholder = tok.token_id("<｜place▁holder▁no▁3｜>")
    assert placeholder is not None
    ids = [*tok.encode(NASTY[:9]), placeholder, tok.pad_id, *tok.encode(NASTY[9:]), tok.eos_id]
    script = iter(ids * 4)
    monkeypatch.setattr(Sequence, "choose", lambda self, logits: next(script))
    return ids[:-1]


def test_stdout_carries_no_control_characters_nor_internal_tokens(monkeypatch, ckpt_tiny, images, scripted):
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny, 64), "--no-cache", images["a"], "Say it.")
    assert r.code == 0, r.stderr
    assert r.stdout == "AB[31mCDE\tF\nGH\n"  # tab and newline kept, C0/DEL gone, no <｜...｜> text
    assert "place" not in r.stdout and "pad" not in r.stdout


def test_json_keeps_the_exact_ids(monkeypatch, ckpt_tiny, images, scripted):
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny, 64), "--no-cache", "--json", images["a"], "Say it.")
    assert r.code == 0, r.stderr
    (rec,) = r.json_lines
    assert rec["token_ids"] == scripted
    assert rec["text"] == "AB[31mCDE\tF\nGH"
