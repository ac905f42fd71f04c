"""A multi-turn conversation with a loaded model: messages, pending images and a prompt cache.

Library-level (no terminal I/O): the CLI's interactive loop drives it, and so can any program.

    session = ChatSession(vlm, images=[load_image("cat.png")])
    for event in session.ask("What is this?"):
        ...                      # Prefilled, Token..., Done, as stream_generate yields them
    for event in session.ask("And its colour?"):   # reuses the cached prompt: only new tokens run
        ...

Images attached with `add_image` (or given at construction) go with the next question. With 3
or more images in a conversation the processor stops tiling every image (`tiling` turns False),
which also means the cached image tokens are recomputed once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from PIL import Image

from ..errors import Dsvl2Error, PromptError
from .events import Done, Event, GenerationConfig, Token
from .messages import MAX_TILED_IMAGES, Message, user_message

if TYPE_CHECKING:  # a session over a server (app/backends.py) runs without torch: no tensors here
    from .generate import PromptCache
    from .processor import Prepared
    from .runtime import VLModel


def stream_generate(vlm: VLModel, prepared: Prepared, config: GenerationConfig,
                    prompt_cache: PromptCache | None = None) -> Iterator[Event]:
    """engine.generate.stream_generate, imported when a local model first answers (torch)."""
    from .generate import stream_generate as run

    return run(vlm, prepared, config, prompt_cache)


class ChatSession:
    def __init__(self, vlm: VLModel, *, system: str | None = None, config: GenerationConfig | None = None,
                 images: Sequence[Image.Image] = ()):
        self.vlm = vlm
        self.system = system
        self.config = config or GenerationConfig()
        self.messages: list[Message] = []
        self.pending: list[Image.Image] = list(images)
        self.cache = self._new_cache()
        self.last_prepared: Prepared | None = None

    @property
    def images(self) -> list[Image.Image]:
        """The images of the conversation so far (not the pending ones), in prompt order."""
        return [img for m in self.messages for img in m.images]

    @property
    def image_count(self) -> int:
        """Images in the conversation so far, pending ones included."""
        return sum(len(m.images) for m in self.messages) + len(self.pending)

    @property
    def tiling(self) -> bool:
        """Whether the model sees the images tiled (at most MAX_TILED_IMAGES in the conversation)."""
        return self.image_count <= MAX_TILED_IMAGES

    def add_image(self, image: Image.Image) -> None:
        """Attach an image to the next question."""
        self.pending.append(image)

    def reset(self, images: Iterable[Image.Image] = ()) -> None:
        """Forget the conversation, pending images and cache; `images` are attached anew."""
        self.messages = []
        self.pending = list(images)
        if self.cache is not None:
            self.cache.reset()
        self.last_prepared = None

    def load(self, messages: Sequence[Message]) -> None:
        """Start from a given conversation (e.g. a conversation file) that ends with a user
        message or an empty assistant message; `respond()` then answers it."""
        msgs = list(messages)
        if msgs and msgs[-1].kind == "assistant" and not msgs[-1].content.strip():
            msgs.pop()  # the generation slot
        if not msgs or msgs[-1].kind != "user":
            raise PromptError("the conversation must end with a user message (or an empty assistant "
                              "message) for the model to answer")
        self.reset()
        self.messages = msgs

    def ask(self, text: str, images: Sequence[Image.Image] = ()) -> Iterator[Event]:
        """Ask a question (with the pending images and `images`); yields the generation events.

        The question and the answer join the conversation when the answer is done. If the
        stream is abandoned or fails part-way, a partial answer is kept (so the conversation
        matches what was shown) and a question without any answer is dropped (its images
        return to `pending` when it was interrupted, not when it failed with a Dsvl2Error).
        """
        attached = [*self.pending, *images]
        message = user_message(text, attached)
        prepared = self._prepare([*self.messages, message])  # may refuse: state unchanged
        self.pending = []
        self.messages.append(message)
        yield from self._respond(attached, prepared)

    def respond(self) -> Iterator[Event]:
        """Answer the conversation as it stands (it ends with a user message, see `load`)."""
        return self._respond([], self._prepare(self.messages))

    # The three steps a session over another model (app/backends.py: a server's) replaces.
    def _new_cache(self) -> PromptCache | None:
        from .generate import PromptCache

        return PromptCache()

    def _prepare(self, messages: Sequence[Message]) -> Prepared:
        return self.vlm.prepare(messages, system=self.system)

    def _generate(self, prepared: Prepared) -> Iterator[Event]:
        return stream_generate(self.vlm, prepared, self.config, self.cache)

    def _respond(self, attached: list[Image.Image], prepared: Prepared) -> Iterator[Event]:
        self.last_prepared = prepared
        parts: list[str] = []
        finished = failed = False
        try:
            for event in self._generate(prepared):
                if isinstance(event, Token):
                    parts.append(event.text)
                elif isinstance(event, Done):
                    self.messages.append(Message("assistant", event.text))
                    finished = True
                yield event
        except Dsvl2Error:
            failed = True  # e.g. the context is full: retrying with the same images cannot help
            raise
        finally:
            if not finished:
                partial = "".join(parts)
                if partial.strip():
                    self.messages.append(Message("assistant", partial))
                else:
                    self.messages.pop()
                    if not failed:
                        self.pending = attached  # interrupted before any answer: keep them for the retry
