"""dsvl2: run DeepSeek-VL2 vision-language models locally.

    import dsvl2_cli
    vlm = dsvl2_cli.load("deepseek-ai/deepseek-vl2-tiny")          # or a model folder
    prepared = vlm.prepare([dsvl2_cli.user_message("Describe this image.", [dsvl2_cli.load_image("cat.jpg")])])
    print(dsvl2_cli.generate(vlm, prepared).text)
"""

from .app.images import load_image
from .engine.generate import (Done, GenerationConfig, Prefilled, PromptCache, Result, Token, generate, generate_batch,
                              stream_generate)
from .engine.processor import Message, user_message
from .engine.runtime import VLModel, load
from .engine.sampling import SamplingParams
from .errors import ContextTooLongError, Dsvl2Error, ImageError, InputError, ModelError, PromptError

__version__ = "0.1.0"

__all__ = [
    "ContextTooLongError", "Done", "Dsvl2Error", "GenerationConfig", "ImageError", "InputError", "Message",
    "ModelError", "Prefilled", "PromptCache", "PromptError", "Result", "SamplingParams", "Token", "VLModel",
    "generate", "generate_batch", "load", "load_image", "stream_generate", "user_message",
]
