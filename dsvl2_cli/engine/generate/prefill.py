"""Prefill: bring a PromptCache up to a whole prompt, one unit of work at a time.

A `Prefill` is a job that every generation path runs the same way: `stream_generate` and
`generate_batch` exhaust it at once, the server's scheduler (scheduler.py) advances it one unit
between two decode steps of the running batch, so a long image prompt never stalls the other
streams for longer than one unit: one batch of TILE_BATCH tiles through the vision tower, or one
chunk of `chunk` prompt positions through the language model.

- The prompt is prefilled in chunks (the reference's "incremental prefilling"): the same logits
  as one pass, with activations bounded by the chunk size.
- The positions the PromptCache already holds (same token ids, same images) are reused; images
  whose tokens are all reused are not encoded again. A changed history truncates the cache at
  the first difference.
- With a PromptStore, a saved image prefix (everything up to the last image's last token) is
  loaded instead of computed. The chunks always restart at the end of that prefix
  (`prefill_chunks`), so a loaded prefix gives the very computations of a fresh run.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..events import DEFAULT_PREFILL_CHUNK, Prefilling
from ..prompt.processor import Prepared
from ..prompt_store import PromptStore
from ..vlmodel import TILE_BATCH, VLModel
from .prompt import PromptCache, image_prefix, image_spans, position_keys


def prefill_chunks(start: int, total: int, prefix: int, chunk: int) -> list[tuple[int, int]]:
    """[s, e) prefill chunks of positions start..total: `chunk` long, restarting at `prefix`, so
    the positions after the image prefix are computed alike whether it was prefilled now or
    loaded (the same matmul shapes, hence the same bits in any dtype)."""
    cuts = [c for c in (prefix,) if start < c < total]
    out, s = [], start
    for end in [*cuts, total]:
        for a in range(s, end, chunk):
            out.append((a, min(a + chunk, end)))
        s = end
    return out


class Prefill:
    """One prompt into `pcache`. Iterate it for its Prefilling events (each marks the end of a
    unit of work: `tile_batch` tiles, or `chunk` positions), or `run()` it; then `logits` (V,) are
    the last position's and `reused` the positions taken from the cache or the store.

        job = Prefill(vlm, prepared, pcache)
        for progress in job: ...        # one unit of work per event
        first_token = pick(job.logits)
    """

    def __init__(self, vlm: VLModel, prepared: Prepared, pcache: PromptCache,
                 chunk: int = DEFAULT_PREFILL_CHUNK, store: PromptStore | None = None, tile_batch: int = TILE_BATCH,
                 keys: list | None = None):
        self.vlm, self.prepared, self.pcache = vlm, prepared, pcache
        self.chunk, self.store, self.tile_batch = chunk, store, tile_batch
        self.keys = keys if keys is not None else position_keys(prepared)  # the caller's, when it has them
        self.prefix = image_prefix(prepared)
        self.logits: torch.Tensor | None = None  # (V,) once done
        self.reused = 0
        self._steps = self._run()

    @property
    def total(self) -> int:
        return len(self.keys)

    @property
    def done(self) -> bool:
        return self.logits is not None

    def __iter__(self) -> Iterator[Prefilling]:
        return self._steps

    def run(self) -> torch.Tensor:
        """Every remaining unit at once; the last position's logits (V,)."""
        for _ in self._steps:
            pass
        return self.logits

    @torch.inference_mode()
    def _run(self) -> Iterator[Prefilling]:
        vlm, prepared, pcache, total = self.vlm, self.prepared, self.pcache, self.total
        if pcache.cache is None:
            pcache.cache = vlm.new_cache(1)
        start = pcache.reusable(self.keys)
        if self.store is not None and start < self.prefix < total:
            saved = self.store.lookup(vlm, self.keys[:self.prefix])
            if saved is not None:
                pcache.cache, pcache.keys, start = saved, self.keys[:self.prefix], self.prefix
        pcache.cache.truncate(start)
        pcache.keys = pcache.keys[:start]
        self.reused = start

        # encode only the images whose tokens lie in the new part (earlier ones are cached)
        new_images = [img for img, (s, _) in zip(prepared.images, image_spans(prepared)) if s >= start]
        tiles = None
        if new_images:
            pixels = torch.cat([img.pixel_values for img in new_images])  # (N, 3, 384, 384)
            n, parts = pixels.shape[0], []
            yield Prefilling("vision", 0, n)
            for i in range(0, n, self.tile_batch):
                parts.append(vlm.model.encode_tiles(pixels[i:i + self.tile_batch]))  # rows alike at any batch
                yield Prefilling("vision", min(i + self.tile_batch, n), n)
            tiles = torch.cat(parts)  # (N, 196, D) adaptor outputs
        embeds = vlm.model.embed(prepared.input_ids[start:][None], prepared.image_mask[start:][None],
                                 grids=[img.grid for img in new_images], tiles=tiles)  # (1, T - start, D)
        pcache.cache.reserve(total + 1)
        logits = None
        yield Prefilling("prompt", 0, total - start)
        for s, e in prefill_chunks(start, total, self.prefix, self.chunk):
            logits = vlm.forward(embeds[:, s - start:e - start], pcache.cache, last_only=True)
            if e < total:
                yield Prefilling("prompt", e - start, total - start)
        pcache.keys = self.keys
        self.logits = logits[0, -1]
        yield Prefilling("prompt", total - start, total - start)
