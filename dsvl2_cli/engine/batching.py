"""Continuous batching for a long-lived engine (the server): many requests decode together.

- `gather_rows` copies rows out of ModelCaches into one new left-padded ModelCache; it is how a
  request joins a running batch (prefilled alone, then merged in at a step boundary) and how a
  finished one leaves it (the others are gathered without it, common padding dropped).
- `PromptCachePool` keeps a few PromptCaches, LRU within a byte budget; a request starts from the
  entry with the longest reusable prefix (same images and text), so a seen image is not encoded
  again and `Prefilled.reused_tokens` says how many prompt positions were cached.
- `BatchEngine` owns the model on one worker thread (torch is not re-entrant here). Requests queue;
  at every step boundary queued requests are prefilled and join, each row samples its own next
  token with its own `_Sequence` (seed, stop strings, detokenizer), and rows that end leave at once.
  Greedy answers equal those of `stream_generate` run alone (exactly, in float32).

The engine knows nothing of HTTP: a request is a Prepared prompt, a GenerationConfig and an
`emit(event)` callback receiving `Prefilled`, `Token`, `Done`, or `Failed` as the last event.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .cache import ModelCache, _GrowingBuffer
from .generate import (Done, Event, GenerationConfig, Prefilled, PromptCache, _prefill, decode_step, _Sequence, _stats,
                       check_context, position_keys)
from .processor import Prepared

# Positions allocated past the longest row when a batch cache is rebuilt, so the next steps
# append without reallocating.
HEADROOM = 64


# ------------------------------------------------------------------------------- cache rows

def row_pad(cache: ModelCache, row: int) -> int:
    return int(cache.pad[row]) if cache.pad is not None else 0


def _buffer_names(layer) -> list[str]:
    return [name for name, value in vars(layer).items() if isinstance(value, _GrowingBuffer)]


def gather_rows(rows: Sequence[tuple[ModelCache, int]], headroom: int = 0) -> ModelCache:
    """A new ModelCache whose row i holds the real (unpadded) positions of `rows[i]` = (cache,
    row index), left-padded to the longest; pad positions are zeros (masked, and never NaN)."""
    if not rows:
        raise ValueError("gather_rows needs at least one row")
    starts = [row_pad(c, r) for c, r in rows]
    lengths = [c.length - s for (c, _), s in zip(rows, starts)]
    width = max(lengths)
    pads = [width - n for n in lengths]
    proto = rows[0][0]
    layers, device = [], None
    for li, layer in enumerate(proto.layers):
        new_layer = copy.copy(layer)
        for name in _buffer_names(layer):
            src0: _GrowingBuffer = getattr(layer, name)
            dim = src0._dim
            shape = list(src0.data.shape)
            shape[0] = len(rows)

            def shape_fn(cap, shape=tuple(shape), dim=dim):
                return shape[:dim] + (cap,) + shape[dim + 1:]

            buf = _GrowingBuffer(shape_fn, dim, src0._dtype, src0._device)
            device = src0._device
            buf.data = torch.zeros(shape_fn(width + headroom), dtype=src0._dtype, device=src0._device)
            for b, ((cache, r), start, n, pad) in enumerate(zip(rows, starts, lengths, pads)):
                src = getattr(cache.layers[li], name)
                buf.data[b:b + 1].narrow(dim, pad, n).copy_(src.data[r:r + 1].narrow(dim, start, n))
            buf.length = width
            setattr(new_layer, name, buf)
        layers.append(new_layer)
    pad = torch.tensor(pads, dtype=torch.long, device=device) if any(pads) else None
    return ModelCache(layers, pad)


# ------------------------------------------------------------------------------ prompt caches

class PromptCachePool:
    """A few PromptCaches shared by all requests, least recently used dropped beyond `budget` bytes."""

    def __init__(self, budget: int):
        self.budget = budget
        self.entries: list[PromptCache] = []  # most recently used last

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def checkout(self, keys: list, busy: Sequence[PromptCache] = ()) -> PromptCache:
        """The entry to prefill `keys` into: the one with the longest reusable prefix (extended in
        place when it holds nothing beyond that prefix and no row still reads it (`busy`), else a
        copy of the prefix), or a new one."""
        best, n = None, 0
        for entry in self.entries:
            m = entry.reusable(keys)
            if m > n:
                best, n = entry, m
        if best is None:
            entry = PromptCache()
        elif n >= len(best.keys) and not any(best is b for b in busy):
            self.entries.remove(best)
            entry = best
        else:  # keep the other conversation: copy the shared prefix
            entry = PromptCache()
            entry.cache = gather_rows([(best.cache, 0)])
            entry.cache.truncate(n)
            entry.keys = best.keys[:n]
        self.entries.append(entry)
        return entry

    def store(self, entry: PromptCache, cache: ModelCache, keys: list) -> None:
        """Replace what `entry` holds (a finished request's prompt and answer)."""
        entry.cache, entry.keys = cache, keys
        self.trim()

    def trim(self) -> None:
        while self.entries and self.nbytes > self.budget:
            self.entries.pop(0)


# -------------------------------------------------------------------------------- the engine

@dataclass(frozen=True)
class Failed:
    """The request could not be served; `error` is the exception (a Dsvl2Error for user errors)."""

    error: BaseException


class EngineRequest:
    """A submitted request: `cancel()` stops it (its row leaves the batch at the next step)."""

    def __init__(self, prepared: Prepared, config: GenerationConfig, emit: Callable[[object], None],
                 skip_special_tokens: bool = True):
        self.prepared = prepared
        self.config = config
        self.emit = emit
        self.skip_special_tokens = skip_special_tokens
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()


class _Row:
    """A request in the running batch."""

    def __init__(self, request: EngineRequest, seq: _Sequence, entry: PromptCache, keys: list,
                 logits: torch.Tensor, reused: int, image_tokens: int, t0: float, t_prefill: float):
        self.request, self.seq, self.entry, self.keys = request, seq, entry, keys
        self.logits = logits  # (V,) for the next choice
        self.src: tuple[ModelCache, int] = (entry.cache, 0)  # where this row's cache lives
        self.prompt_len = int(request.prepared.input_ids.numel())
        self.reused, self.image_tokens, self.t0, self.t_prefill = reused, image_tokens, t0, t_prefill
        self.t_first: float | None = None
        self.fed: list[int] = []  # generated ids already run through the model
        self.next_id = 0

    @property
    def length(self) -> int:
        return self.prompt_len + len(self.fed)


class BatchEngine:
    """One worker thread runs every request; up to `max_batch` decode together."""

    def __init__(self, vlm, max_batch: int = 8, cache_bytes: int = 1 << 30):
        self.vlm = vlm
        self.max_batch = max(1, max_batch)
        self.pool = PromptCachePool(cache_bytes)
        self._queue: queue.Queue[EngineRequest | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsvl2-engine", daemon=True)
        self._thread.start()
        self.steps = 0  # batched decode steps so far, and the widest batch seen (for tests)
        self.widest = 0
        self.active = 0  # requests in the running batch

    # ---- the public side (any thread)
    def submit(self, prepared: Prepared, config: GenerationConfig, emit: Callable[[object], None],
               skip_special_tokens: bool = True) -> EngineRequest:
        request = EngineRequest(prepared, config, emit, skip_special_tokens)
        self._queue.put(request)
        return request

    def stream(self, prepared: Prepared, config: GenerationConfig | None = None,
               skip_special_tokens: bool = True, timeout: float | None = None) -> Iterator[Event]:
        """Blocking helper: the request's events; a failure is raised; closing it cancels."""
        events: queue.Queue = queue.Queue()
        request = self.submit(prepared, config or GenerationConfig(), events.put, skip_special_tokens)
        try:
            while True:
                event = events.get(timeout=timeout)
                if isinstance(event, Failed):
                    raise event.error
                yield event
                if isinstance(event, Done):
                    return
        finally:
            request.cancel()

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=10)

    # ---- the worker thread
    def _run(self) -> None:
        rows: list[_Row] = []
        while not self._stop.is_set():
            changed = self._admit(rows)
            if self._stop.is_set():
                break
            alive = []
            for row in rows:
                if row.request.cancelled.is_set():
                    changed = True
                elif self._choose(row):
                    alive.append(row)
                else:
                    self._finish(row)
                    changed = True
            rows = alive
            self.active = len(rows)
            if not rows:
                continue
            try:
                if changed:
                    batch = gather_rows([r.src for r in rows], HEADROOM)
                    for i, r in enumerate(rows):
                        r.src = (batch, i)
                self._step(rows)
            except Exception as exc:  # noqa: BLE001 - one bad step fails its rows, not the server
                for r in rows:
                    r.request.emit(Failed(exc))
                rows = []

    def _admit(self, rows: list[_Row]) -> bool:
        """Prefill queued requests (waiting for one when nothing runs); True when any joined."""
        joined = False
        while len(rows) < self.max_batch:
            try:
                request = self._queue.get(block=not rows and not joined)
            except queue.Empty:
                break
            if request is None:
                return joined
            if request.cancelled.is_set():
                continue
            try:
                fresh = [r.entry for r in rows if r.src[0] is r.entry.cache]
                rows.append(self._prefill(request, fresh))
                joined = True
            except Exception as exc:  # noqa: BLE001 - reported to that request only
                request.emit(Failed(exc))
        return joined

    @torch.inference_mode()
    def _prefill(self, request: EngineRequest, busy: Sequence[PromptCache]) -> _Row:
        vlm, prepared = self.vlm, request.prepared
        check_context(vlm, prepared)
        t0 = time.perf_counter()
        keys = position_keys(prepared)
        entry = self.pool.checkout(keys, busy)
        logits, reused = _prefill(vlm, prepared, entry, request.config.prefill_chunk)
        self.pool.trim()
        t_prefill = time.perf_counter()
        seq = _Sequence(vlm, request.config, prepared.input_ids.to(vlm.device))
        seq.decoder = vlm.tokenizer.stream(skip_special=request.skip_special_tokens)
        image_tokens = sum(img.num_tokens for img in prepared.images)
        request.emit(Prefilled(int(prepared.input_ids.numel()), reused, image_tokens, t_prefill - t0))
        return _Row(request, seq, entry, list(keys), logits[0], reused, image_tokens, t0, t_prefill)

    def _choose(self, row: _Row) -> bool:
        """Sample the row's next token and emit it; False when the row is done."""
        seq = row.seq
        row.next_id = seq.choose(row.logits)
        row.t_first = row.t_first or time.perf_counter()
        event = seq.accept(row.next_id, row.length, self.vlm.config.language.max_position_embeddings)
        if event is not None:
            row.request.emit(event)
        return seq.reason is None

    def _finish(self, row: _Row) -> None:
        seq = row.seq
        tail = seq.finish()
        if tail is not None:
            row.request.emit(tail)
        # the entry keeps this prompt and answer for a follow-up turn, unless another request
        # has moved it on meanwhile
        if row.entry.keys == row.keys and row.src[0] is not row.entry.cache:
            self.pool.store(row.entry, gather_rows([row.src]), row.keys + row.fed)
        stats = _stats(row.prompt_len, row.reused, row.image_tokens, len(seq.ids), row.t0, row.t_prefill,
                       row.t_first, time.perf_counter(), row.entry.nbytes)
        row.request.emit(Done(seq.reason, seq.text, tuple(seq.ids), stats))

    @torch.inference_mode()
    def _step(self, rows: list[_Row]) -> None:
        """Feed every row's chosen token through the model in one batch."""
        logits = decode_step(self.vlm, [r.next_id for r in rows], rows[0].src[0])  # (B, V)
        for i, r in enumerate(rows):
            r.logits = logits[i]
            r.fed.append(r.next_id)
        self.steps += 1
        self.widest = max(self.widest, len(rows))
