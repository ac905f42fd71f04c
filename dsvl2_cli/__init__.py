"""dsvl2: run DeepSeek-VL2 vision-language models locally.

    import dsvl2_cli
    vlm = dsvl2_cli.load("deepseek-ai/deepseek-vl2-tiny")          # or a model folder
    prepared = vlm.prepare([dsvl2_cli.user_message("Describe this image.", [dsvl2_cli.load_image("cat.jpg")])])
    print(dsvl2_cli.generate(vlm, prepared).text)

The names below import on first use (PEP 562): `import dsvl2_cli` alone, and so `dsvl2 --help`,
loads neither torch nor the engine.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "load_image": ".app.images",
    **dict.fromkeys(("Done", "GenerationConfig", "Prefilled", "PromptCache", "Result", "Token", "generate",
                     "generate_batch", "stream_generate"), ".engine.generate"),
    "Message": ".engine.processor", "user_message": ".engine.processor",
    "VLModel": ".engine.runtime", "load": ".engine.runtime",
    "SamplingParams": ".engine.sampling",
    **dict.fromkeys(("ContextTooLongError", "Dsvl2Error", "ImageError", "InputError", "ModelError", "PromptError"),
                    ".errors"),
}

__all__ = [
    "ContextTooLongError", "Done", "Dsvl2Error", "GenerationConfig", "ImageError", "InputError", "Message",
    "ModelError", "Prefilled", "PromptCache", "PromptError", "Result", "SamplingParams", "Token", "VLModel",
    "generate", "generate_batch", "load", "load_image", "stream_generate", "user_message",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
