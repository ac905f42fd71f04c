"""Attention caches that know their size.

MLA layers (small, 27B) cache only what the paper's Multi-head Latent Attention needs: the
normalised KV latent (kv_lora_rank) and the shared, already rotated RoPE key (qk_rope_head_dim),
stored side by side as one (B, T, 576) tensor per layer. Plain attention layers (tiny) cache
ordinary K and V. Storage grows by doubling so appends are amortised O(1); `reserve` sizes it
once when the final length is known.
"""

from __future__ import annotations

import torch


class _GrowingBuffer:
    """A (B, ..., capacity, ...) tensor with a fill level along `dim`."""

    def __init__(self, shape_fn, dim: int, dtype: torch.dtype, device: torch.device):
        self._shape_fn = shape_fn  # capacity -> full shape
        self._dim = dim
        self._dtype = dtype
        self._device = device
        self.data: torch.Tensor | None = None
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self.data is None else self.data.shape[self._dim]

    def reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        new = torch.empty(self._shape_fn(total), dtype=self._dtype, device=self._device)
        if self.data is not None and self.length:
            new.narrow(self._dim, 0, self.length).copy_(self.data.narrow(self._dim, 0, self.length))
        self.data = new

    def append(self, values: torch.Tensor) -> torch.Tensor:
        """Write `values` after the current end and return a view of everything so far."""
        t = values.shape[self._dim]
        need = self.length + t
        if need > self.capacity:
            self.reserve(max(need, 2 * self.capacity, 256))
        self.data.narrow(self._dim, self.length, t).copy_(values)
        self.length = need
        return self.data.narrow(self._dim, 0, need)

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def used_bytes(self) -> int:
        if self.data is None:
            return 0
        per_position = self.data.numel() // self.capacity * self.data.element_size()
        return per_position * self.length


class LatentCache:
    """MLA cache: per token, the normalised latent then the rotated rope key: (B, T, C + R)."""

    def __init__(self, batch: int, kv_lora_rank: int, rope_dim: int, dtype, device):
        self.kv_lora_rank = kv_lora_rank
        width = kv_lora_rank + rope_dim
        self._buf = _GrowingBuffer(lambda cap: (batch, cap, width), 1, dtype, device)

    def update_and_fetch(self, latent_and_rope: torch.Tensor) -> torch.Tensor:
        return self._buf.append(latent_and_rope)  # (B, T_total, C + R)

    def reserve(self, total: int) -> None:
        self._buf.reserve(total)

    def truncate(self, length: int) -> None:
        self._buf.truncate(length)

    @property
    def length(self) -> int:
        return self._buf.length

    @property
    def nbytes(self) -> int:
        return self._buf.used_bytes()


class KVCache:
    """Plain attention cache: K and V as (B, kv_heads, T, head_dim)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype, device):
        shape = lambda cap: (batch, kv_heads, cap, head_dim)  # noqa: E731
        self._k = _GrowingBuffer(shape, 2, dtype, device)
        self._v = _GrowingBuffer(shape, 2, dtype, device)

    def update_and_fetch(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k.append(k), self._v.append(v)

    def reserve(self, total: int) -> None:
        self._k.reserve(total)
        self._v.reserve(total)

    def truncate(self, length: int) -> None:
        self._k.truncate(length)
        self._v.truncate(length)

    @property
    def length(self) -> int:
        return self._k.length

    @property
    def nbytes(self) -> int:
        return self._k.used_bytes() + self._v.used_bytes()


class ModelCache:
    """One cache per decoder layer plus the bookkeeping shared by all of them.

    `pad` holds, per batch row, how many left-padding positions the row starts with (a batch of
    prompts of different lengths is left-padded so every row appends at the same index); those
    keys are masked out of attention and the row's RoPE positions start after them.
    """

    def __init__(self, layers: list, pad: torch.Tensor | None = None):
        self.layers = layers
        self.pad = pad  # (B,) int64 or None when no row is padded

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def reserve(self, total: int) -> None:
        for layer in self.layers:
            layer.reserve(total)

    def truncate(self, length: int) -> None:
        """Forget everything after the first `length` positions (history was edited)."""
        for layer in self.layers:
            layer.truncate(length)
