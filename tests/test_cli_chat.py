"""ChatSession: the conversation object behind `dsvl2 chat` (no terminal involved), on the tiny
model and on a stand-in backend (what a session asks of any Backend, a server's included)."""

from __future__ import annotations

import pytest

import dsvl2_cli
from dsvl2_cli.app.inputs.images import load_image
from dsvl2_cli.dev.synthetic import write_image
from dsvl2_cli.app.backends import Backend, Prompt
from dsvl2_cli.app.chat import ChatSession, chat_turn
from dsvl2_cli.app.results import Answer
from dsvl2_cli.engine.generate import Done, GenerationConfig, Prefilled, Prefilling, Stats, Token
from dsvl2_cli.engine.prompt.messages import Message
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
    assert session.messages == [] and session.backend.cache.nbytes == 0 and session.pending == [pictures[0]]
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

    monkeypatch.setattr("dsvl2_cli.app.backends.stream_generate", fake)
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

    monkeypatch.setattr("dsvl2_cli.app.backends.stream_generate", fake)
    session = ChatSession(vlm, images=[pictures[0]])
    with pytest.raises(KeyboardInterrupt):
        events(session, "Tell me")
    assert session.messages == [] and session.pending == [pictures[0]]  # ready to ask again


def test_failed_question_is_dropped(vlm, pictures, monkeypatch):
    def fake(vlm_, prepared, config=None, prompt_cache=None):
        raise ContextTooLongError("too long")
        yield  # pragma: no cover

    monkeypatch.setattr("dsvl2_cli.app.backends.stream_generate", fake)
    session = ChatSession(vlm, images=[pictures[0]])
    with pytest.raises(ContextTooLongError):
        events(session, "Tell me")
    assert session.messages == [] and session.pending == []


def test_bad_prompt_changes_nothing(vlm, pictures):
    session = ChatSession(vlm, images=[pictures[0]])
    with pytest.raises(dsvl2_cli.PromptError):
        events(session, "<image> and <image>")  # two placeholders, one image
    assert session.messages == [] and session.pending == [pictures[0]]


class Scripted(Backend):
    """A backend without a model: answers "reply N", records every prompt it was asked and how
    often its conversation was reset. Like a server's, it prepares nothing."""

    name = "scripted"

    def __init__(self):
        self.prompts: list[Prompt] = []
        self.resets = 0
        self.conversations: list[Scripted] = []

    def for_conversation(self):
        conversation = Scripted()
        self.conversations.append(conversation)
        return conversation

    def reset(self):
        self.resets += 1

    def prepare(self, messages, system):
        return Prompt(tuple(messages), system)

    def answer(self, prompt, config, *, keep_special=False):
        self.prompts.append(prompt)
        text = f"reply {len(self.prompts)}"
        yield Prefilled(5, 0, 0, 0.0)
        yield Token(1, text)
        yield Done("eos", text, (), Stats(5, 0, 0, 1, 0.1, 50.0, 10.0, 0))


def test_a_session_runs_on_a_backend_of_its_own(pictures):
    backend = Scripted()
    session = ChatSession(backend, system="be brief", images=[pictures[0]])
    assert backend.conversations == [session.backend]  # its own: a local one keeps its own prompt cache
    list(session.ask("one"))
    list(session.ask("two"))
    first, second = session.backend.prompts
    assert [m.kind for m in second.messages] == ["user", "assistant", "user"]  # the whole conversation each turn
    assert second.messages[1].content == "reply 1" and second.system == "be brief"
    assert first.messages[0].images == (pictures[0],) and session.pending == []
    session.reset()
    assert session.backend.resets == 1 and session.messages == [] and session.last_prepared is None


def test_chat_turn_records_a_backend_answer(pictures):
    session = ChatSession(Scripted(), images=[pictures[0]])
    *events, answer = chat_turn(session, "What is this?")
    assert isinstance(answer, Answer) and answer.text == "reply 1"
    assert answer.record["model"] == "scripted" and answer.record["images"][0]["grid"] is None  # nothing prepared
    assert session.last_prepared is None and isinstance(events[-1], Done)


def test_a_loaded_conversation_is_answered_as_it_stands(pictures):
    session = ChatSession(Scripted())
    session.load([Message("user", "hi"), Message("assistant", "")])  # the generation slot is dropped
    *_, answer = chat_turn(session)
    assert answer.text == "reply 1" and [m.kind for m in session.messages] == ["user", "assistant"]
    with pytest.raises(dsvl2_cli.PromptError):
        session.load([Message("assistant", "no question")])
