"""`VLModel`: a loaded checkpoint (config, weights, tokenizer, processor on one device and dtype),
the typed model every other layer is handed. runtime.load() makes one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.config import ModelConfig
from ..model.vlm import DeepseekVL2
from .native import f32_products as f32_products_module
from .loading import memory
from .cache import ModelCache, new_model_cache
from .prompt.processor import Message, Prepared, PreparedImage, Processor
from .quant import QuantSpec
from .prompt.tokenizer import Tokenizer

# Tiles through the vision tower per batch: 4 x 729 rows keep its matmuls efficient while a
# 10-tile page does not hold all of its activations at once.
TILE_BATCH = 4


@dataclass
class VLModel:
    """A loaded checkpoint: config, weights, tokenizer and processor on one device and dtype."""

    name: str
    path: Path
    source: str
    config: ModelConfig
    model: DeepseekVL2
    tokenizer: Tokenizer
    processor: Processor

    @property
    def quantization(self) -> QuantSpec | None:
        """How the routed experts are stored (None: in the compute dtype)."""
        return getattr(self.model, "quantization", None)

    def weight_memory(self) -> dict[str, int]:
        """Bytes of weights by component (see memory.weight_memory)."""
        return memory.weight_memory(self.model)

    @property
    def vision_int8(self) -> bool:
        """Whether the vision tower's linears run in int8 (load(..., vision_int8=True) where available)."""
        return bool(getattr(self.model, "vision_int8", False))

    @property
    def f32_products(self) -> bool:
        """Whether bf16 prefill and vision products run in float32 (engine/native/f32_products.py: a
        CPU without bf16 dot products, or DSVL2_BF16_PRODUCTS=float32)."""
        return f32_products_module.installed(self.model.language)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def prepare(self, messages: Sequence[Message], *, system: str | None = None,
                max_tiles: int | Sequence[int | None] | None = None) -> Prepared:
        return self.processor.prepare(messages, system=system, max_tiles=max_tiles)

    def new_cache(self, batch: int = 1, pad: torch.Tensor | None = None) -> ModelCache:
        """An empty cache for `batch` rows; pad (B,) int64: left-padding positions per row."""
        return new_model_cache(self.config.language, batch, pad, self.dtype, self.device)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> embeddings (B, T, D), no images (decode steps)."""
        return self.model.embed(ids)

    def embed_prompt(self, ids: torch.Tensor, image_mask: torch.Tensor,
                     images: Sequence[PreparedImage] = ()) -> torch.Tensor:
        """Prompt ids (B, T) and image mask (B, T) -> embeddings (B, T, D) with `images` (in
        row-major prompt order) encoded, TILE_BATCH tiles at a time, and laid out."""
        pixels = torch.cat([img.pixel_values for img in images]) if images else None
        return self.model.embed(ids, image_mask, pixels, [img.grid for img in images], tile_batch=TILE_BATCH)

    def forward(self, embeds: torch.Tensor, cache: ModelCache | None = None, last_only: bool = False) -> torch.Tensor:
        """embeds (B, T, D) -> logits (B, T, V) float32 ((B, 1, V) with last_only); with a cache
        the positions follow what it holds, and it grows by T."""
        return self.model.language(embeds, cache, last_only)

    @torch.inference_mode()
    def embed(self, prepared: Prepared) -> torch.Tensor:
        """Prompt embeddings (1, T, D) with the images encoded and laid out."""
        return self.model.embed(
            prepared.input_ids[None], prepared.image_mask[None], prepared.pixel_values(),
            [img.grid for img in prepared.images],
        )

    @torch.inference_mode()
    def logits(self, prepared: Prepared) -> torch.Tensor:
        """Full uncached forward pass: logits (T, V) float32 for every prompt position."""
        return self.forward(self.embed(prepared))[0]
