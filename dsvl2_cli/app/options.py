"""The options every model command shares (`Options`): which model and how it loads, how to
sample, how to answer, and where (a local model or --server). The CLI builds one from its
flags (cli_options.options); the tasks read their generation settings from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import settings
from ..engine.events import GenerationConfig, SamplingParams
from .defaults import TEMPERATURE_ADVICE, task_defaults

if TYPE_CHECKING:  # types only: a command answered by a server never imports torch
    from ..engine.prompt_store import PromptStore


@dataclass
class Options:
    """The options every model command shares: which model, how to sample, how to answer."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "bfloat16"
    quantize: str | None = None  # also "auto": check_memory chooses
    allow_paging: bool = False  # load even when the plan does not fit (a warning instead)
    vision_int8: bool = False  # --vision-int8: the vision tower's linears in int8 (or $DSVL2_VISION_INT8)
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    system: str | None = None
    stream: bool = True
    json: bool = False
    quiet: bool = False
    prompt_store: PromptStore | None = None  # image prefixes saved across runs (None: --no-cache)
    server: str | None = None    # --server URL (else $DSVL2_SERVER): answer through that server
    api_key: str | None = None   # --api-key (else $DSVL2_API_KEY): sent to the server

    def server_url(self) -> str:
        """The server to use ("" = a local model)."""
        return (self.server or "").strip().rstrip("/") or settings.server_url()

    def server_key(self) -> str | None:
        return self.api_key or settings.api_key() or None

    def generation(self, task: str) -> GenerationConfig:
        """How `task` generates: --max-tokens, else the task's default (defaults.py)."""
        sampling = SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        return GenerationConfig(max_tokens=self.max_tokens or task_defaults(task).max_tokens, sampling=sampling,
                                prompt_store=self.prompt_store)

    def sampling_note(self) -> str | None:
        """A warning for a temperature the model card advises against (None when fine)."""
        if self.temperature > TEMPERATURE_ADVICE:
            return (f"temperature {self.temperature:g} is above {TEMPERATURE_ADVICE}, where the model card says "
                    "quality degrades")
        return None
