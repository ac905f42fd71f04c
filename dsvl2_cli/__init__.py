"""dsvl2: run DeepSeek-VL2 vision-language models locally.

    import dsvl2_cli
    vlm = dsvl2_cli.load("deepseek-ai/deepseek-vl2-tiny")          # or a model folder
    prepared = vlm.prepare([dsvl2_cli.user_message("Describe this image.", [dsvl2_cli.load_image("cat.jpg")])])
    print(dsvl2_cli.generate(vlm, prepared).text)

The names below import on first use (PEP 562): `import dsvl2_cli` alone, and so `dsvl2 --help`,
loads neither torch nor the engine.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "ContextTooLongError", "Done", "Dsvl2Error", "GenerationConfig", "ImageError", "InputError", "Message",
    "ModelError", "Prefilled", "Prefilling", "PromptCache", "PromptError", "PromptStore", "Result", "SamplingParams",
    "Token", "VLModel", "generate", "generate_batch", "load", "load_image", "stream_generate", "user_message",
]


def _public() -> dict:
    """Every public name, from the modules that define them (imported here, on first use)."""
    from . import errors
    from .app.inputs import images
    from .engine import generate, runtime
    from .engine.prompt import processor
    from .engine import prompt_store
    from .engine.generate import sampling

    sources = (errors, images, generate, processor, prompt_store, runtime, sampling)
    return {name: getattr(module, name) for module in sources for name in __all__ if hasattr(module, name)}


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals().update(_public())  # later lookups skip this function
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
