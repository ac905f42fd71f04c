"""dsvl2: run DeepSeek-VL2 vision-language models locally.

    import dsvl2_cli
    vlm = dsvl2_cli.load("deepseek-ai/deepseek-vl2-tiny")          # or a model folder
    prepared = vlm.prepare([dsvl2_cli.user_message("Describe this image.", [dsvl2_cli.load_image("cat.jpg")])])
    print(dsvl2_cli.generate(vlm, prepared).text)
"""

from .errors import ContextTooLongError, Dsvl2Error, ImageError, InputError, ModelError, PromptError
from .generate import (Done, GenerationConfig, Prefilled, PromptCache, Result, Token, generate, generate_batch,
                       stream_generate)
from .images import load_image
from .processor import Message, user_message
from .runtime import VLModel, load
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "ContextTooLongError", "Done", "Dsvl2Error", "GenerationConfig", "ImageError", "InputError", "Message",
    "ModelError", "Prefilled", "PromptCache", "PromptError", "Result", "SamplingParams", "Token", "VLModel",
    "generate", "generate_batch", "load", "load_image", "stream_generate", "user_message",
]
