"""dsvl2: run DeepSeek-VL2 vision-language models locally.

    import dsvl2_cli
    vlm = dsvl2_cli.load("deepseek-ai/deepseek-vl2-tiny")          # or a model folder
    prepared = vlm.prepare([dsvl2_cli.user_message("Describe this image.", [dsvl2_cli.load_image("cat.jpg")])])
    print(dsvl2_cli.generate(vlm, prepared).text)
"""

from .app.images import load_image
from .engine.generate import (Done, GenerationConfig, Prefilled, Prefilling, PromptCache, Result, Token, generate,
                              generate_batch, stream_generate)
from .engine.prompt_store import PromptStore
from .engine.processor import Message, user_message
from .engine.runtime import VLModel, load
from .engine.sampling import SamplingParams
from .errors import ContextTooLongError, Dsvl2Error, ImageError, InputError, ModelError, PromptError

__version__ = "0.1.0"

__all__ = [
    "ContextTooLongError", "Done", "Dsvl2Error", "GenerationConfig", "ImageError", "InputError", "Message",
    "ModelError", "Prefilled", "Prefilling", "PromptCache", "PromptError", "PromptStore", "Result", "SamplingParams", "Token", "VLModel",
    "generate", "generate_batch", "load", "load_image", "stream_generate", "user_message",
]
