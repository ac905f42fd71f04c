"""What a task runs on, a `Backend`: a `name` and two steps, `prepare(messages, system) -> Prompt`
and `answer(prompt, config, keep_special=) -> Iterator[Event]` (Prefilled, Token..., Done).

`LocalBackend` runs the engine (prepare = the processor's token ids and image layout, so a prompt
too long fails before anything runs); `RemoteBackend` sends the messages to an OpenAI-compatible
server (app/client.RemoteModel). Chat is a ChatSession either way: the local one keeps its prompt
cache, the remote one (`RemoteChatSession`) sends the whole conversation each turn (the server
reuses its own cache).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from ..engine.chat import ChatSession, stream_generate
from ..engine.events import Done, Event, GenerationConfig
from ..engine.messages import Message
from ..engine.tokenizer import GROUNDING_TOKENS

if TYPE_CHECKING:  # a server's backend runs without torch: the engine loads with a local model
    from ..engine.processor import Prepared


@dataclass(frozen=True)
class Prompt:
    """A prompt ready to answer: the messages, and locally the processor's token ids and layout."""

    messages: tuple[Message, ...]
    system: str | None
    prepared: Prepared | None = None  # None on a server: it builds the prompt itself


class Backend(Protocol):
    """What a task runs on (module docstring)."""

    name: str

    def prepare(self, messages: Sequence[Message], system: str | None) -> Prompt: ...

    def answer(self, prompt: Prompt, config: GenerationConfig, *, keep_special: bool = False
               ) -> Iterator[Event]: ...


class LocalBackend:
    """A loaded model (VLModel): the engine's prepare and stream_generate."""

    def __init__(self, vlm):
        self.vlm = vlm
        self.name = vlm.name

    def prepare(self, messages: Sequence[Message], system: str | None) -> Prompt:
        return Prompt(tuple(messages), system, self.vlm.prepare(list(messages), system=system))

    def answer(self, prompt: Prompt, config: GenerationConfig, *, keep_special: bool = False) -> Iterator[Event]:
        # keep_special needs nothing here: the local decoder always keeps the grounding tokens
        return stream_generate(self.vlm, prompt.prepared, config)


# The model's special tokens (<|User|>, <｜end▁of▁sentence｜>, <image>...): what a server keeps
# when asked to keep special tokens, of which the local text keeps only the grounding ones.
_SPECIAL = re.compile(r"<\|[^|<>\s]{1,40}\|>|<｜[^｜<>]{1,40}｜>|<image>")


def _local_specials_only(text: str) -> str:
    return _SPECIAL.sub(lambda m: m.group(0) if m.group(0) in GROUNDING_TOKENS else "", text)


class RemoteBackend:
    """A model behind an OpenAI-compatible server (`client.RemoteModel`, or anything with its
    `name` and `stream`). Nothing is prepared here: the server tiles and tokenizes."""

    def __init__(self, remote):
        self.remote = remote
        self.name = remote.name  # asks the server now: an unreachable one fails before any work

    def prepare(self, messages: Sequence[Message], system: str | None) -> Prompt:
        return Prompt(tuple(messages), system)

    def answer(self, prompt: Prompt, config: GenerationConfig, *, keep_special: bool = False) -> Iterator[Event]:
        """The server's events. keep_special: ask for the special tokens (vLLM drops the grounding
        tags otherwise), then drop all but the grounding tags from the final text, as locally."""
        for event in self.remote.stream(list(prompt.messages), prompt.system, config,
                                        skip_special_tokens=not keep_special):
            if keep_special and isinstance(event, Done):
                event = replace(event, text=_local_specials_only(event.text))
            yield event


def as_backend(model) -> Backend:
    """A Backend as it is; a loaded model (VLModel) in a LocalBackend."""
    return model if isinstance(model, (LocalBackend, RemoteBackend)) else LocalBackend(model)


class RemoteChatSession(ChatSession):
    """A ChatSession whose answers come from a server (`vlm` is a RemoteBackend): each turn sends
    the whole conversation; the prompt cache is the server's. Its `last_prepared` is a Prompt."""

    def _new_cache(self) -> None:
        return None

    def _prepare(self, messages: Sequence[Message]) -> Prompt:
        return self.vlm.prepare(messages, self.system)

    def _generate(self, prepared: Prompt) -> Iterator[Event]:
        return self.vlm.answer(prepared, self.config)
