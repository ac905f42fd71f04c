"""The vocabulary of generation, free of torch: what a caller asks for (`SamplingParams`,
`GenerationConfig`) and what comes back (the events `Prefilling`, `Prefilled`, `Token`, `Done`).

engine/generate/ produces these events from a loaded model; app/http/client.py produces the very
same from an OpenAI-compatible server. Keeping them apart from the tensor code means a command
answered by a server (`--server`) never imports torch (~1.3 s of every start here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import Dsvl2Error

if TYPE_CHECKING:
    from .prompt_store import PromptStore


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already in the context
    seed: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.temperature <= 10.0:
            raise Dsvl2Error(f"temperature {self.temperature} is out of range; use 0 (greedy) to about 1")
        if not 0.0 < self.top_p <= 1.0:
            raise Dsvl2Error(f"top_p {self.top_p} is out of range; use a value in (0, 1]")
        if self.top_k < 0:
            raise Dsvl2Error(f"top_k {self.top_k} must be 0 (off) or positive")
        if self.repetition_penalty <= 0:
            raise Dsvl2Error(f"repetition_penalty {self.repetition_penalty} must be positive (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0



# 1024 rather than 512: a chunk's token copies are spread over 64 routed experts, and the expert
# GEMMs run at a fraction of the matmul rate at ~48 rows each (512 x 6 / 64) against ~96; a
# 1037-token photo prompt prefilled 13% faster in one run (real tiny shapes, 2 cores). The
# activations of a 1024 chunk are still small beside the weights (loading/memory_plan.prefill_peak).
DEFAULT_PREFILL_CHUNK = 1024


# ------------------------------------------------------------------------------------ events

@dataclass(frozen=True)
class Prefilling:
    """Prefill progress, yielded before the work starts and after each step: stage "vision"
    counts image tiles through the vision tower (TILE_BATCH at a time), "prompt" counts the
    prompt positions not reused through the language model (a chunk at a time)."""

    stage: str  # "vision" | "prompt"
    done: int
    total: int


@dataclass(frozen=True)
class Prefilled:
    """The prompt is in the cache; decoding starts."""

    prompt_tokens: int
    reused_tokens: int  # positions taken from the cache of an earlier turn
    image_tokens: int
    seconds: float


@dataclass(frozen=True)
class Token:
    """One generated token and the text it completes (may be "" while a character is partial).
    `id` is None for text that was held back and is released at the end without a new token."""

    id: int | None
    text: str


@dataclass(frozen=True)
class Stats:
    prompt_tokens: int
    reused_tokens: int
    image_tokens: int
    generated_tokens: int
    time_to_first_token: float  # seconds from the call to the first token, images and prefill included
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    cache_bytes: int


@dataclass(frozen=True)
class Done:
    """Generation ended. finish_reason: "eos", "length" (max_tokens), "stop" (a stop string),
    "context" (the context window is full)."""

    finish_reason: str
    text: str
    token_ids: tuple[int, ...]
    stats: Stats


Event = Prefilling | Prefilled | Token | Done


# What generate() returns: the final event itself (the name predates the merge).
Result = Done


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 512
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    prompt_store: PromptStore | None = None  # opt-in: image prefixes kept on disk across processes

    def __post_init__(self):
        if self.max_tokens < 1:
            raise Dsvl2Error(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.prefill_chunk < 1:
            raise Dsvl2Error(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")
