"""Attention caches that know their size.

MLA layers (small, 27B) cache only what the paper's Multi-head Latent Attention needs: the
normalised KV latent (kv_lora_rank) and the shared, already rotated RoPE key (qk_rope_head_dim),
stored side by side as one (B, T, 576) tensor per layer. Plain attention layers (tiny) cache
ordinary K and V. Storage grows by doubling so appends are amortised O(1); `reserve` sizes it
once when the final length is known.
"""

from __future__ import annotations

import copy

import torch

from ..model.config import LanguageConfig


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

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (1-D indices, in that order)."""
        if self.data is not None:
            self.data = self.data.index_select(0, rows.to(self._device))

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

    def contents(self) -> tuple[torch.Tensor, ...]:
        """What `update_and_fetch` was given so far, as its arguments (a saved prompt prefix)."""
        return (self._buf.data.narrow(1, 0, self.length),) if self.length else ()

    def reserve(self, total: int) -> None:
        self._buf.reserve(total)

    def truncate(self, length: int) -> None:
        self._buf.truncate(length)

    def keep_rows(self, rows: torch.Tensor) -> None:
        self._buf.keep_rows(rows)

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

    def contents(self) -> tuple[torch.Tensor, ...]:
        """What `update_and_fetch` was given so far, as its arguments (a saved prompt prefix)."""
        if not self.length:
            return ()
        return self._k.data.narrow(2, 0, self.length), self._v.data.narrow(2, 0, self.length)

    def reserve(self, total: int) -> None:
        self._k.reserve(total)
        self._v.reserve(total)

    def truncate(self, length: int) -> None:
        self._k.truncate(length)
        self._v.truncate(length)

    def keep_rows(self, rows: torch.Tensor) -> None:
        self._k.keep_rows(rows)
        self._v.keep_rows(rows)

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

    def keep_rows(self, rows: list[int]) -> None:
        """Drop the batch rows not in `rows` (finished sequences of a batch), keeping their order.
        A padding that no kept row has any more is dropped, so the mask-free decode path applies."""
        index = torch.tensor(rows)
        for layer in self.layers:
            layer.keep_rows(index)
        if self.pad is not None:
            pad = self.pad.index_select(0, index.to(self.pad.device))
            self.pad = pad if bool(pad.any()) else None


def new_model_cache(cfg: LanguageConfig, batch: int, pad: torch.Tensor | None, dtype: torch.dtype,
                    device: torch.device) -> ModelCache:
    """An empty cache for every decoder layer of `cfg` (MLA: latent + rope key; else K and V)."""
    if cfg.use_mla:
        layers = [LatentCache(batch, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device)
                  for _ in range(cfg.num_hidden_layers)]
    else:
        layers = [KVCache(batch, cfg.num_key_value_heads, cfg.head_dim, dtype, device)
                  for _ in range(cfg.num_hidden_layers)]
    return ModelCache(layers, pad)


def _buffers(layer) -> list[str]:
    return [name for name, value in vars(layer).items() if isinstance(value, _GrowingBuffer)]


def gather_rows(rows: list[tuple[ModelCache, int]], headroom: int = 0) -> ModelCache:
    """A new ModelCache whose row i holds the real (unpadded) positions of `rows[i]` = (cache,
    row index), left-padded to the longest, with room for `headroom` more positions; pad
    positions are zeros (masked, and never NaN). How a sequence joins a batch, and leaves it."""
    if not rows:
        raise ValueError("gather_rows needs at least one row")
    starts = [int(c.pad[r]) if c.pad is not None else 0 for c, r in rows]
    lengths = [c.length - s for (c, _), s in zip(rows, starts)]
    width = max(lengths)
    pads = [width - n for n in lengths]
    layers, device = [], None
    for li, layer in enumerate(rows[0][0].layers):
        new_layer = copy.copy(layer)
        for name in _buffers(layer):
            proto: _GrowingBuffer = getattr(layer, name)
            dim, device = proto._dim, proto._device
            shape = list(proto.data.shape)
            shape[0] = len(rows)

            def shape_fn(cap, shape=tuple(shape), dim=dim):
                return shape[:dim] + (cap,) + shape[dim + 1:]

            buf = _GrowingBuffer(shape_fn, dim, proto._dtype, device)
            buf.data = torch.zeros(shape_fn(width + headroom), dtype=proto._dtype, device=device)
            for b, ((cache, r), start, n, pad) in enumerate(zip(rows, starts, lengths, pads)):
                src = getattr(cache.layers[li], name)
                buf.data[b:b + 1].narrow(dim, pad, n).copy_(src.data[r:r + 1].narrow(dim, start, n))
            buf.length = width
            setattr(new_layer, name, buf)
        layers.append(new_layer)
    pad = torch.tensor(pads, dtype=torch.long, device=device) if any(pads) else None
    return ModelCache(layers, pad)
