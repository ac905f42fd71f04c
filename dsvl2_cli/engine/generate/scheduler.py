"""Continuous batching for a long-lived engine (the server): many requests decode together.

One worker thread owns the model (torch is not re-entrant here) and runs the loop of
continuous-batching engines: each turn advances the oldest waiting request's `Prefill` by one
unit (one tile through the vision tower, or one prompt chunk), then runs one `Decoder`
step for every request already decoding. A new image prompt therefore delays the running streams
by at most one unit of its prefill per token, instead of its whole prefill. A request whose
prefill is done joins the batch at the next step; rows that end leave it at once. Each row samples
its own tokens (seed, stop strings, detokenizer): greedy answers equal `stream_generate` run alone
(exactly, in float32).

`PromptCachePool` keeps a few PromptCaches, LRU within a byte budget; a request starts from the
entry with the longest reusable prefix (same images and text), so a seen image is not encoded
again and `Prefilled.reused_tokens` says how many prompt positions were cached.

The engine knows nothing of HTTP: a request is a Prepared prompt, a GenerationConfig and an
`emit(event)` callback receiving `Prefilled`, `Token`, `Done`, or `Failed` as the last event.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence as Seq
from dataclasses import dataclass

from ..cache import ModelCache, gather_rows
from ..events import Done, Event, GenerationConfig, Prefilled
from ..prompt.processor import Prepared
from .decoder import Decoder, Sequence
from .prefill import Prefill
from .prompt import PromptCache, check_context, position_keys


SERVER_TILE_BATCH = 1


class PromptCachePool:
    """A few PromptCaches shared by all requests, least recently used dropped beyond `budget` bytes."""

    def __init__(self, budget: int):
        self.budget = budget
        self.entries: list[PromptCache] = []  # most recently used last

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def checkout(self, keys: list, busy: Seq[PromptCache] = ()) -> PromptCache:
        """The entry to prefill `keys` into: the one with the longest reusable prefix (extended in
        place when it holds nothing beyond that prefix and no request still reads it (`busy`),
        else a copy of the prefix), or a new one."""
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


@dataclass(frozen=True)
class Failed:
    """The request could not be served; `error` is the exception (a Dsvl2Error for user errors)."""

    error: BaseException


class EngineRequest:
    """A submitted request: `cancel()` stops it (it leaves the batch at the next step)."""

    def __init__(self, prepared: Prepared, config: GenerationConfig, emit: Callable[[object], None],
                 skip_special_tokens: bool = True):
        self.prepared = prepared
        self.config = config
        self.emit = emit
        self.skip_special_tokens = skip_special_tokens
        self.cancelled = threading.Event()
        # set by the worker while the request is prefilled and decoded
        self.entry: PromptCache | None = None  # the pool entry its prompt is prefilled into
        self.prefill: Prefill | None = None
        self.t0 = 0.0

    def cancel(self) -> None:
        self.cancelled.set()


class BatchEngine:
    """One worker thread runs every request; up to `max_batch` are in flight (prefilling or decoding)."""

    def __init__(self, vlm, max_batch: int = 8, cache_bytes: int = 1 << 30):
        self.vlm = vlm
        self.max_batch = max(1, max_batch)
        self.pool = PromptCachePool(cache_bytes)
        self.decoder = Decoder(vlm, on_finish=self._finish)
        self._requests: dict[Sequence, EngineRequest] = {}  # while decoding
        self._waiting: collections.deque[EngineRequest] = collections.deque()  # admitted, being prefilled
        self._queue: queue.Queue[EngineRequest | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsvl2-engine", daemon=True)
        self._thread.start()
        self.active = 0  # requests in flight

    @property
    def steps(self) -> int:
        return self.decoder.steps

    @property
    def widest(self) -> int:
        return self.decoder.widest

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
        while not self._stop.is_set():
            self._admit()
            if self._stop.is_set():
                break
            self._prefill_one_unit()
            self.active = len(self._waiting) + len(self.decoder)
            if not len(self.decoder):
                continue
            try:
                for seq, token in self.decoder.choose():
                    self._requests[seq].emit(token)
                self.decoder.feed()
                running = {*self.decoder.seqs, *(seq for seq, _ in self.decoder.joining)}
                for seq in [s for s in self._requests if s not in running]:  # cancelled: dropped
                    del self._requests[seq]
            except Exception as exc:  # noqa: BLE001 - one bad step fails its rows, not the server
                for request in self._requests.values():
                    request.emit(Failed(exc))
                self._requests.clear()
                self.decoder = Decoder(self.vlm, on_finish=self._finish)
            self.active = len(self._waiting) + len(self.decoder)

    def _admit(self) -> None:
        """Take queued requests while there is room (waiting for one when nothing is in flight)."""
        while len(self._waiting) + len(self.decoder) < self.max_batch:
            idle = not self._waiting and not len(self.decoder)
            try:
                request = self._queue.get(block=idle)
            except queue.Empty:
                return
            if request is None:
                return
            if not request.cancelled.is_set():
                self._waiting.append(request)

    def _prefill_one_unit(self) -> None:
        """Advance the oldest waiting request's prefill by one unit; it joins the batch when done."""
        while self._waiting:
            request = self._waiting[0]
            if request.cancelled.is_set():
                self._waiting.popleft()
                continue
            try:
                if request.prefill is None:
                    self._start(request)
                next(iter(request.prefill), None)
                if request.prefill.done:
                    self._waiting.popleft()
                    self._join(request)
            except Exception as exc:  # noqa: BLE001 - reported to that request only
                self._waiting.popleft()
                request.emit(Failed(exc))
            return

    def _busy(self) -> list[PromptCache]:
        """Pool entries a request still reads in place (being prefilled, or joining the batch)."""
        busy = [r.entry for r in self._waiting if r.entry is not None]
        return busy + [self._requests[seq].entry for seq, _ in self.decoder.joining]

    def _start(self, request: EngineRequest) -> None:
        check_context(self.vlm, request.prepared)
        request.t0 = time.perf_counter()
        keys = position_keys(request.prepared)  # hashes the images' tiles: once
        request.entry = self.pool.checkout(keys, self._busy())
        # one tile per unit: a tile (~2 s on a 2-core CPU for tiny) costs less than a prompt chunk,
        # so a running stream waits at most one chunk per token (a tile's rows are the same bits
        # at any tile batch: tested)
        request.prefill = Prefill(self.vlm, request.prepared, request.entry, request.config.prefill_chunk,
                                  tile_batch=SERVER_TILE_BATCH, keys=keys)

    def _join(self, request: EngineRequest) -> None:
        job, prepared = request.prefill, request.prepared
        self.pool.trim()
        t_prefill = time.perf_counter()
        image_tokens = sum(img.num_tokens for img in prepared.images)
        seq = Sequence(self.vlm, request.config, prepared.input_ids, job.logits, reused=job.reused,
                       image_tokens=image_tokens, t0=request.t0, t_prefill=t_prefill,
                       skip_special=request.skip_special_tokens, cancelled=request.cancelled)
        request.emit(Prefilled(job.total, job.reused, image_tokens, t_prefill - request.t0))
        self._requests[seq] = request
        self.decoder.join(seq, (request.entry.cache, 0))

    def _finish(self, seq: Sequence, src: tuple[ModelCache, int]) -> None:
        """A row ended (Decoder.on_finish): its answer, and its conversation kept for a follow-up."""
        request = self._requests.pop(seq)
        tail = seq.finish()
        if tail is not None:
            request.emit(tail)
        entry, keys = request.entry, request.prefill.keys
        # the entry keeps this prompt and answer for a follow-up turn, unless another request
        # has moved it on meanwhile
        if entry.keys == keys and src[0] is not entry.cache:
            self.pool.store(entry, gather_rows([src]), keys + seq.ids[:seq.fed])
        request.emit(seq.done(entry.nbytes))
