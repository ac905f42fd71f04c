"""The library's exception hierarchy.

Every error a user can cause (a bad file, a bad model folder, a prompt that does not fit) is a
`Dsvl2Error` with a one-line message that says what is wrong and what to do. The CLI maps these
to exit code 1 and prints the message; anything else is a bug and shows a traceback.
"""

from __future__ import annotations


class Dsvl2Error(Exception):
    """Base class: a problem the user can fix. `str(err)` is a complete one-line message."""


class ModelError(Dsvl2Error):
    """The model folder is missing, incomplete, corrupt, or not a DeepSeek-VL2 checkpoint."""


class ConfigError(ModelError):
    """config.json is unreadable or holds values this runtime cannot run."""


class WeightsError(ModelError):
    """A safetensors file is missing, corrupt, or its tensors do not match the config."""


class TokenizerError(ModelError):
    """tokenizer.json is missing or lacks a special token the model needs."""


class InputError(Dsvl2Error):
    """A user input (image, PDF, prompt, conversation file) cannot be used."""


class ImageError(InputError):
    """An image cannot be opened or decoded."""


class PromptError(InputError):
    """The prompt is empty, malformed, or its <image> placeholders do not match the images."""


class ContextTooLongError(PromptError):
    """The prompt (images + text) does not fit in the model's context window."""


class MemoryFitError(Dsvl2Error):
    """The model, as asked for (dtype, quantization), needs more memory than this process may use."""


class CacheError(Dsvl2Error):
    """A cache folder (saved prompts, page texts, mapped layouts) cannot be read or changed."""


class ServerError(Dsvl2Error):
    """A dsvl2 server cannot be reached, refused the request, or failed while answering."""

    def __init__(self, message: str, status: int | None = None, partial_text: str = ""):
        super().__init__(message)
        self.status = status  # HTTP status, None when no answer came
        self.partial_text = partial_text  # what had arrived when a stream was cut
