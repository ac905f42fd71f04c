"""The chat task: a multi-turn conversation (`ChatSession`) over a Backend, local or a server's,
and one answer in it as a task's events (`chat_turn`).

No terminal I/O: the CLI's interactive loop (interactive.py) drives it, and so can any program.

    session = ChatSession(vlm, images=[load_image("cat.png")])   # a VLModel or a Backend
    for event in session.ask("What is this?"):
        ...                      # Prefilled, Token..., Done, as stream_generate yields them
    for event in session.ask("And its colour?"):   # locally the cached prompt is reused: only new tokens run
        ...

The session runs on a backend of its own (Backend.for_conversation): a local model's keeps the
conversation's prompt cache, a server's sends the whole conversation each turn. Images attached
with `add_image` (or given at construction) go with the next question. With 3 or more images in
a conversation the processor stops tiling every image (`tiling` turns False), which also means
the cached image tokens are recomputed once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from PIL import Image

from ..engine.events import Done, Event, GenerationConfig, Token
from ..engine.prompt.messages import MAX_TILED_IMAGES, Message, user_message
from ..errors import Dsvl2Error, PromptError
from .backends import Prompt, as_backend
from .options import Options
from .results import Answer, answer_record

if TYPE_CHECKING:  # a session over a server runs without torch: no tensors here
    from ..engine.prompt.processor import Prepared


class ChatSession:
    def __init__(self, model, *, system: str | None = None, config: GenerationConfig | None = None,
                 images: Sequence[Image.Image] = ()):
        self.backend = as_backend(model).for_conversation()
        self.system = system
        self.config = config or GenerationConfig()
        self.messages: list[Message] = []
        self.pending: list[Image.Image] = list(images)
        self.last_prepared: Prepared | None = None  # the latest prompt's layout (None on a server)

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
        self.backend.reset()
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
        prompt = self.backend.prepare([*self.messages, message], self.system)  # may refuse: state unchanged
        self.pending = []
        self.messages.append(message)
        yield from self._respond(attached, prompt)

    def respond(self) -> Iterator[Event]:
        """Answer the conversation as it stands (it ends with a user message, see `load`)."""
        return self._respond([], self.backend.prepare(self.messages, self.system))

    def _respond(self, attached: list[Image.Image], prompt: Prompt) -> Iterator[Event]:
        self.last_prepared = prompt.prepared
        parts: list[str] = []
        finished = failed = False
        try:
            for event in self.backend.answer(prompt, self.config):
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


def chat_session(model, opts: Options, images: Sequence[Image.Image] = ()) -> ChatSession:
    """A chat on `model` (a Backend or a loaded model) with `images` attached to its first question."""
    return ChatSession(model, system=opts.system, config=opts.generation("chat"), images=images)


def chat_turn(session: ChatSession, text: str | None = None) -> Iterator[Event | Answer]:
    """One answer in a chat: to `text` (with the session's pending images), or with None to the
    conversation as loaded (ChatSession.load). Closing this generator closes the session's, so
    an interrupted answer is kept or dropped as ChatSession.ask says."""
    events = session.ask(text) if text is not None else session.respond()
    done = None
    try:
        for event in events:
            if isinstance(event, Done):
                done = event
            yield event
    finally:
        events.close()
    yield Answer(done, answer_record(session.backend, done, session.last_prepared, session.images))
