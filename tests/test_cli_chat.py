"""ChatSession: the conversation object behind `dsvl2 chat` (no terminal involved)."""

from __future__ import annotations

import pytest

import dsvl2_cli
from dsvl2_cli.app.images import load_image
from dsvl2_cli.dev.synthetic import write_image
from dsvl2_cli.engine.chat import ChatSession
from dsvl2_cli.engine.generate import Done, GenerationConfig, Prefilled, Prefilling, Token
from dsvl2_cli.errors import ContextTooLongError


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_images")
    return [load_image(write_image(root / f"{i}.png", 40 + 8 * i, 40, seed=i)) for i in range(4)]


def events(session, text, images=()):
    """The answer's events after the prefill's progress (Prefilling, tested in test_prompt_reuse.py)."""
    return [e for e in session.ask(text, images) if not isinstance(e, Prefilling)]


def test_turns_accumulate_and_reuse_the_cache(vlm, pictures):
    session = ChatSession(vlm, config=GenerationConfig(max_tokens=3), images=[pictures[0]])
    first = events(session, "What is this?")
    assert isinstance(first[0], Prefilled) and first[0].reused_tokens == 0
    assert isinstance(first[-1], Done)
    assert [m.kind for m in session.messages] == ["user", "assistant"]
    assert session.images == [pictures[0]] and session.pending == []
    second = events(session, "And then?")
    assert second[0].reused_tokens > first[0].image_tokens  # the image is not encoded again
    assert [m.kind for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[1].content == first[-1].text


def test_add_image_goes_with_the_next_question_only(vlm, pictures):
    session = ChatSession(vlm, config=GenerationConfig(max_tokens=2))
    events(session, "Hello")
    session.add_image(pictures[1])
    assert session.image_count == 1 and session.images == []
    events(session, "Look at this")
    assert [len(m.images) for m in session.messages] == [0, 0, 1, 0]


def test_reset_forgets_everything_but_the_given_images(vlm, pictures):
    session = ChatSession(vlm, config=GenerationConfig(max_tokens=2), images=[pictures[0]])
    events(session, "one")
    session.reset([pictures[0]])
    assert session.messages == [] and session.cache.nbytes == 0 and session.pending == [pictures[0]]
    assert events(session, "two")[0].reused_tokens == 0


def test_tiling_stops_at_three_images(vlm, pictures):
    session = ChatSession(vlm, config=GenerationConfig(max_tokens=2), images=pictures[:2])
    assert session.tiling
    session.add_image(pictures[2])
    assert not session.tiling  # (the CLI test checks the resulting 3 x 421 image tokens)


def test_abandoned_answer_keeps_what_was_said(vlm, pictures, monkeypatch):
    def fake(vlm_, prepared, config=None, prompt_cache=None):
        yield Prefilled(10, 0, 0, 0.0)
        yield Token(7, "half an")
        yield Token(8, " answer")
        raise AssertionError("never reached")

    monkeypatch.setattr("dsvl2_cli.engine.chat.stream_generate", fake)
    session = ChatSession(vlm, images=[pictures[0]])
    stream = session.ask("Tell me")
    next(stream), next(stream)
    stream.close()  # e.g. Ctrl-C in the CLI
    assert [m.kind for m in session.messages] == ["user", "assistant"]
    assert session.messages[1].content == "half an"


def test_interrupted_before_any_text_drops_the_question(vlm, pictures, monkeypatch):
    def fake(vlm_, prepared, config=None, prompt_cache=None):
        yield Prefilled(10, 0, 0, 0.0)
        raise KeyboardInterrupt

    monkeypatch.setattr("dsvl2_cli.engine.chat.stream_generate", fake)
    session = ChatSession(vlm, images=[pictures[0]])
    with pytest.raises(KeyboardInterrupt):
        events(session, "Tell me")
    assert session.messages == [] and session.pending == [pictures[0]]  # ready to ask again


def test_failed_question_is_dropped(vlm, pictures, monkeypatch):
    def fake(vlm_, prepared, config=None, prompt_cache=None):
        raise ContextTooLongError("too long")
        yield  # pragma: no cover

    monkeypatch.setattr("dsvl2_cli.engine.chat.stream_generate", fake)
    session = ChatSession(vlm, images=[pictures[0]])
    with pytest.raises(ContextTooLongError):
        events(session, "Tell me")
    assert session.messages == [] and session.pending == []


def test_bad_prompt_changes_nothing(vlm, pictures):
    session = ChatSession(vlm, images=[pictures[0]])
    with pytest.raises(dsvl2_cli.PromptError):
        events(session, "<image> and <image>")  # two placeholders, one image
    assert session.messages == [] and session.pending == [pictures[0]]
