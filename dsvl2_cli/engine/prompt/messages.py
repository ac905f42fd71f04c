"""Messages: what a conversation is made of, free of torch (a command answered by a server
builds them too, and never imports torch; engine/prompt/processor.py turns them into a prompt)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from ...errors import PromptError
from .tokenizer import ASSISTANT_TOKEN, IMAGE_TOKEN, USER_TOKEN

# Images in one conversation above which every image gets a single 384x384 tile.
MAX_TILED_IMAGES = 2

_ROLES = {"user": "user", USER_TOKEN: "user", "assistant": "assistant", ASSISTANT_TOKEN: "assistant",
          "system": "system"}


@dataclass(frozen=True)
class Message:
    role: str                                   # "system" | "user" | "assistant" (or <|User|>/<|Assistant|>)
    content: str
    images: tuple[Image.Image, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise PromptError(f"unknown message role {self.role!r}; use user, assistant or system")
        object.__setattr__(self, "images", tuple(self.images))

    @property
    def kind(self) -> str:
        return _ROLES[self.role]


def user_message(text: str, images: Sequence[Image.Image] = ()) -> Message:
    """A user message from CLI-style input: without `<image>` placeholders the images go first,
    one `<image>\\n` each; with placeholders their count must match the images."""
    text = text or ""
    n = text.count(IMAGE_TOKEN)
    if n == 0 and images:
        text = IMAGE_TOKEN + "\n" + (IMAGE_TOKEN + "\n") * (len(images) - 1) + text
    elif n != len(images):
        raise PromptError(f"the prompt has {n} <image> placeholder(s) but {len(images)} image(s) "
                          "were given; use one <image> per image or none")
    return Message("user", text, tuple(images))
