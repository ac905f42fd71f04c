"""Generation: one core that the library, batched documents and the server all run.

    prompt.py     what a prompt is to the cache (position keys, image prefix), PromptCache
    prefill.py    Prefill: a prompt into a PromptCache, one unit of work (tile batch, chunk) at a time
    decoder.py    Sequence (one answer's bookkeeping) and Decoder (the one step loop over a batch)
    stream.py     stream_generate -> events, generate -> Done, generate_batch -> [Done]
    scheduler.py  the server's continuous batching: prefill units interleaved with decode steps

The events (Prefilling, Prefilled, Token, Done) and what generation is asked (GenerationConfig,
SamplingParams) live in engine/events.py, free of torch; they are re-exported here.
"""

from ..events import (
    DEFAULT_PREFILL_CHUNK,
    Done,
    Event,
    GenerationConfig,
    Prefilled,
    Prefilling,
    Result,
    SamplingParams,
    Stats,
    Token,
)
from .decoder import Decoder, Sequence, StopMatcher, decode_step
from .prefill import Prefill, prefill_chunks
from .prompt import PromptCache, check_context, image_fingerprint, image_prefix, image_spans, position_keys
from .stream import generate, generate_batch, stream_generate

__all__ = [
    "DEFAULT_PREFILL_CHUNK", "Decoder", "Done", "Event", "GenerationConfig", "Prefill", "Prefilled", "Prefilling",
    "PromptCache", "Result", "SamplingParams", "Sequence", "Stats", "StopMatcher", "Token", "check_context",
    "decode_step", "generate", "generate_batch", "image_fingerprint", "image_prefix", "image_spans",
    "position_keys", "prefill_chunks", "stream_generate",
]
