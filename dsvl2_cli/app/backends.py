"""What a task runs on, a `Backend`: a `name` and two steps, `prepare(messages, system) -> Prompt`
and `answer(prompt, config, keep_special=) -> Iterator[Event]` (Prefilled, Token..., Done).

`LocalBackend` runs the engine (prepare = the processor's token ids and image layout, so a prompt
too long fails before anything runs; `answer_batch` reads several prompts at once);
`RemoteBackend` sends the messages to an OpenAI-compatible server (app/client.RemoteModel).
A conversation (chat.ChatSession) asks its backend for one of its own (`for_conversation`): a
local one then keeps the conversation's prompt cache, so each turn runs only its new tokens; a
server's sends the whole conversation each turn and reuses its own cache.

The engine (torch) is imported when a local model first answers: a command answered by a
server never imports it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..engine.events import Done, Event, GenerationConfig
from ..engine.prompt.messages import Message
from ..engine.prompt.tokenizer import GROUNDING_TOKENS

if TYPE_CHECKING:  # a server's backend runs without torch: the engine loads with a local model
    from ..engine.generate import PromptCache
    from ..engine.prompt.processor import Prepared
    from ..engine.runtime import VLModel


def stream_generate(vlm: VLModel, prepared: Prepared, config: GenerationConfig,
                    prompt_cache: PromptCache | None = None) -> Iterator[Event]:
    """engine.generate.stream_generate, imported when a local model first answers (torch)."""
    from ..engine.generate import stream_generate as run

    return run(vlm, prepared, config, prompt_cache)


def generate_batch(vlm: VLModel, prompts: Sequence[Prepared], config: GenerationConfig,
                   max_tokens: Sequence[int] | None = None) -> list[Done]:
    """engine.generate.generate_batch, imported when a local model first reads a batch (torch)."""
    from ..engine.generate import generate_batch as run

    return run(vlm, prompts, config, max_tokens=max_tokens)


@dataclass(frozen=True)
class Prompt:
    """A prompt ready to answer: the messages, and locally the processor's token ids and layout."""

    messages: tuple[Message, ...]
    system: str | None
    prepared: Prepared | None = None  # None on a server: it builds the prompt itself


class Backend:
    """What a task runs on (module docstring): LocalBackend, RemoteBackend, or a test's stand-in."""

    name: str

    def prepare(self, messages: Sequence[Message], system: str | None) -> Prompt:
        raise NotImplementedError

    def answer(self, prompt: Prompt, config: GenerationConfig, *, keep_special: bool = False) -> Iterator[Event]:
        raise NotImplementedError

    def for_conversation(self) -> Backend:
        """The backend one conversation runs on (what it keeps between turns is its own)."""
        return self

    def reset(self) -> None:
        """Forget what this backend keeps of a conversation (nothing, unless it caches)."""


class LocalBackend(Backend):
    """A loaded model (VLModel): the engine's prepare and stream_generate, with the prompt cache
    of one conversation when it has one (`for_conversation`)."""

    def __init__(self, vlm: VLModel, cache: PromptCache | None = None):
        self.vlm = vlm
        self.name = vlm.name
        self.cache = cache

    def prepare(self, messages: Sequence[Message], system: str | None) -> Prompt:
        return Prompt(tuple(messages), system, self.vlm.prepare(list(messages), system=system))

    def answer(self, prompt: Prompt, config: GenerationConfig, *, keep_special: bool = False) -> Iterator[Event]:
        # keep_special needs nothing here: the local decoder always keeps the grounding tokens
        return stream_generate(self.vlm, prompt.prepared, config, self.cache)

    def answer_batch(self, prompts: Sequence[Prompt], config: GenerationConfig,
                     max_tokens: Sequence[int] | None = None) -> list[Done]:
        """Several prompts decoded together (generate_batch): their Done events, in order."""
        return generate_batch(self.vlm, [p.prepared for p in prompts], config, max_tokens=max_tokens)

    def for_conversation(self) -> LocalBackend:
        from ..engine.generate import PromptCache

        return LocalBackend(self.vlm, PromptCache())

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.reset()


# The model's special tokens (<|User|>, <｜end▁of▁sentence｜>, <image>...): what a server keeps
# when asked to keep special tokens, of which the local text keeps only the grounding ones.
_SPECIAL = re.compile(r"<\|[^|<>\s]{1,40}\|>|<｜[^｜<>]{1,40}｜>|<image>")


def _local_specials_only(text: str) -> str:
    return _SPECIAL.sub(lambda m: m.group(0) if m.group(0) in GROUNDING_TOKENS else "", text)


class RemoteBackend(Backend):
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
    return model if isinstance(model, Backend) else LocalBackend(model)
