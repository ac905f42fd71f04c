"""Conversation files: a conversation given exactly, in the format of the official DeepSeek-VL2
examples, for evaluation pipelines, few-shot / in-context grounding and reproducible reports.

    [
      {"role": "<|User|>", "content": "This is image_1: <image>\\nThis is image_2: <image>\\nCompare.",
       "images": ["a.png", "b.png"]},
      {"role": "<|Assistant|>", "content": ""}
    ]

Roles: "<|User|>" / "user", "<|Assistant|>" / "assistant", "system" (first only). `<image>` in the
content marks each image's place; image paths are relative to the file's own folder (to the
current folder for stdin). A final empty assistant message asks for the answer and may be left
out. The whole file may also be an object with a "conversation" or "messages" list.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO

from ...engine.prompt.messages import Message
from ...errors import InputError, PromptError
from .images import load_image_with_notes
from .sources import tag

_ROLES = ("<|User|>", "user", "<|Assistant|>", "assistant", "system")


def read_conversation(source: str | Path, stdin: IO[str] | None = None) -> tuple[list[Message], list[str]]:
    """Parse a conversation file (or "-" for stdin) into messages with loaded images.

    Returns (messages, notes) where notes are remarks about images (e.g. "first frame of an
    animated GIF"). Raises InputError / PromptError with a one-line message naming the problem.
    """
    if str(source) == "-":
        text = (stdin or sys.stdin).read()
        name, base = "<stdin>", Path.cwd()
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{path}: conversation file not found" if not path.exists()
                             else f"{path}: is not a file; give a conversation JSON file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{path}: cannot read the conversation file ({err})") from None
        name, base = str(path), path.resolve().parent
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{name}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    return parse_conversation(data, base, name)


def parse_conversation(data, base: Path, name: str = "conversation") -> tuple[list[Message], list[str]]:
    if isinstance(data, dict):
        data = data.get("conversation", data.get("messages"))
    if not isinstance(data, list) or not data:
        raise InputError(f"{name}: expected a non-empty list of messages "
                         '({"role": ..., "content": ..., "images": [...]})')
    messages, notes = [], []
    for i, raw in enumerate(data, start=1):
        where = f"{name}: message {i}"
        if not isinstance(raw, dict):
            raise InputError(f"{where}: expected an object with role and content")
        role, content = raw.get("role"), raw.get("content", "")
        if role not in _ROLES:
            raise InputError(f"{where}: role {role!r} is not one of {', '.join(_ROLES)}")
        if not isinstance(content, str):
            raise InputError(f"{where}: content must be a string")
        paths = raw.get("images", [])
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise InputError(f"{where}: images must be a list of file paths")
        images = []
        for p in paths:
            path = Path(p).expanduser()
            path = path if path.is_absolute() else base / path
            image, image_notes = load_image_with_notes(path)
            images.append(tag(image, p))  # --json names it as the file wrote it
            notes += image_notes
        try:
            messages.append(Message(role, content, tuple(images)))
        except PromptError as err:
            raise PromptError(f"{where}: {err}") from None
    return messages, notes
