"""What each task asks and how long it may answer, and the advised sampling: the task layer's
defaults in one registry. Imports nothing of dsvl2 (no engine, no torch), so that the command
line's help (cli_options.py) quotes the same numbers the tasks use.

A new task needs no entry to run: `task_defaults` gives DEFAULT_TASK (a chat-length answer, no
fixed prompt) for a name it does not know; an entry in TASKS sets its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

TEMPERATURE_ADVICE = 0.7  # the model card: higher temperatures degrade quality

OCR_PROMPTS = {
    "text": "Read all the text in this image and write it out exactly as it appears, in reading order, "
            "keeping the line breaks. Output only the text.",
    "markdown": "Convert this page to Markdown: keep its headings, lists, tables and emphasis, and write out "
                "all of its text in reading order. Output only the Markdown.",
    # <|grounding|> asks the model to tie what it names to boxes (as in grounded captions);
    # --format json keeps them per page where it does.
    "json": "<|grounding|>Read all the text in this image and write it out exactly as it appears, in reading "
            "order, keeping the line breaks.",
}


@dataclass(frozen=True)
class TaskDefaults:
    """One task's defaults: the answer's length without --max-tokens, and its fixed prompts by
    variant (ocr: by --format; chat and ask take theirs from the user, ground from grounding.py)."""

    max_tokens: int = 1024
    prompts: Mapping[str, str] = field(default_factory=dict)


DEFAULT_TASK = TaskDefaults()
TASKS: Mapping[str, TaskDefaults] = MappingProxyType({
    "chat": TaskDefaults(1024),  # ask answers with chat's defaults
    "ocr": TaskDefaults(2048, OCR_PROMPTS),  # a dense page's text
    "ground": TaskDefaults(1024),
})


def task_defaults(task: str) -> TaskDefaults:
    """The defaults of `task`; DEFAULT_TASK for a task without an entry."""
    return TASKS.get(task, DEFAULT_TASK)


# Each task's default --max-tokens, as the tasks module has always exported it.
MAX_TOKENS: Mapping[str, int] = MappingProxyType({name: t.max_tokens for name, t in TASKS.items()})
