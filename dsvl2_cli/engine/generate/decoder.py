"""The decode loop: one step for every generation path (mlx-lm's generate_step, vLLM's engine step).

A `Sequence` is one answer being generated: its sampling (seed, repetition penalty), detokenizer,
stop strings, ids, timings and the logits of its next choice. A `Decoder` runs any number of them
as rows of one batch cache: each `step()` chooses one token per row, lets the rows that ended
leave, and feeds the others through the model together. `stream_generate` runs one row (in its
conversation's cache, in place), `generate_batch` several prompts, the server's scheduler rows
that join and leave at step boundaries; all three are this loop.

Rows that end leave the batch at once: a row is never fed past its own context limit, and the
rows still running see exactly what they would alone (their own positions, padding masked).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence as Seq

import torch

from ..cache import ModelCache, gather_rows
from ..events import Done, GenerationConfig, Stats, Token
from ..vlmodel import VLModel
from .sampling import make_generator, sample

# Positions allocated past the longest row when rows are gathered into a batch cache, so the
# next steps append without reallocating.
HEADROOM = 64


class StopMatcher:
    """Holds back text that could be the start of a stop string, so a stop string split across
    tokens is never half-printed; cuts the text where a stop string begins."""

    def __init__(self, stops: Seq[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """New text in -> (text safe to emit, whether a stop string was found)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        safe = len(self.pending) if final else self._safe_prefix()
        out, self.pending = self.pending[:safe], self.pending[safe:]
        return out, False

    def _safe_prefix(self) -> int:
        """Length of the longest prefix of pending after which no stop string can still start."""
        for i in range(max(0, len(self.pending) - self.hold), len(self.pending)):
            tail = self.pending[i:]
            if any(s.startswith(tail) for s in self.stops):
                return i
        return len(self.pending)


class Sequence:
    """One answer being generated: what it was asked, what it produced, why it ended.

    prompt_len: its prompt positions; logits: (V,) for its next choice (first: the prefill's);
    cancelled: an Event that, once set, makes the decoder drop the row without an answer."""

    def __init__(self, vlm: VLModel, config: GenerationConfig, prompt_ids: torch.Tensor, logits: torch.Tensor,
                 *, reused: int = 0, image_tokens: int = 0, t0: float | None = None, t_prefill: float | None = None,
                 skip_special: bool = True, cancelled: threading.Event | None = None):
        self.tok = vlm.tokenizer
        self.config = config
        self.generator = make_generator(config.sampling.seed)
        self.history = prompt_ids.to(vlm.device)  # (T,) prompt ids, for the repetition penalty
        self.prompt_len = int(prompt_ids.numel())
        self.logits = logits
        self.reused, self.image_tokens = reused, image_tokens
        now = time.perf_counter()
        self.t0 = now if t0 is None else t0
        self.t_prefill = now if t_prefill is None else t_prefill
        self.cancelled = cancelled
        self.decoder = self.tok.stream(skip_special=skip_special)
        self.stops = StopMatcher(config.stop)
        self.ids: list[int] = []
        self.parts: list[str] = []
        self.fed = 0  # generated tokens fed through the model (all but a final one)
        self.next_id: int | None = None  # the token chosen this step, fed at its end
        self.first_at: float | None = None  # perf_counter() when the first token was chosen
        self.reason: str | None = None

    @property
    def length(self) -> int:
        """Positions of this row in the cache: the prompt and the generated tokens fed."""
        return self.prompt_len + self.fed

    @property
    def is_cancelled(self) -> bool:
        return self.cancelled is not None and self.cancelled.is_set()

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def choose(self, logits: torch.Tensor) -> int:
        """logits (V,) -> the next token id."""
        penalty = self.config.sampling.repetition_penalty != 1.0
        if penalty:
            self.history = torch.cat([self.history, self.history.new_tensor(self.ids[-1:])])
        token = int(sample(logits[None], self.config.sampling, self.history[None] if penalty else None,
                           self.generator)[0])
        self.first_at = self.first_at or time.perf_counter()
        return token

    def accept(self, token_id: int, limit: int) -> Token | None:
        """Record a sampled token; returns its event (None for eos) and sets `reason` when done.
        At `limit` positions in the cache no position is left to feed the token."""
        if token_id == self.tok.eos_id:
            self.reason = "eos"
            return None
        self.ids.append(token_id)
        text, hit = self.stops.feed(self.decoder.push(token_id))
        self.parts.append(text)
        if hit:
            self.reason = "stop"
        elif len(self.ids) >= self.config.max_tokens:
            self.reason = "length"
        elif self.length >= limit:
            self.reason = "context"
        return Token(token_id, text)

    def finish(self) -> Token | None:
        """Release text held back for a partial character or a possible stop string."""
        if self.reason == "stop":
            return None
        tail, _ = self.stops.feed(self.decoder.flush(), final=True)
        if not tail:
            return None
        self.parts.append(tail)
        return Token(None, tail)

    def done(self, cache_bytes: int, t_end: float | None = None, t_first: float | None = None) -> Done:
        """The final event (after `finish`), with this sequence's timings."""
        t_end = time.perf_counter() if t_end is None else t_end
        t_first = self.first_at if t_first is None else t_first
        n = len(self.ids)
        prefill_time = self.t_prefill - self.t0
        decode_time = (t_end - t_first) if t_first else 0.0
        stats = Stats(
            prompt_tokens=self.prompt_len,
            reused_tokens=self.reused,
            image_tokens=self.image_tokens,
            generated_tokens=n,
            time_to_first_token=(t_first or t_end) - self.t0,
            prefill_tokens_per_second=(self.prompt_len - self.reused) / prefill_time if prefill_time > 0 else 0.0,
            decode_tokens_per_second=(n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0,
            cache_bytes=cache_bytes,
        )
        return Done(self.reason, self.text, tuple(self.ids), stats)


def decode_step(vlm: VLModel, tokens: Seq[int], cache: ModelCache) -> torch.Tensor:
    """Feed one token per cache row (B rows) and return the next logits (B, V)."""
    ids = torch.tensor(tokens, device=vlm.device)[:, None]  # (B, 1)
    return vlm.forward(vlm.embed_tokens(ids), cache)[:, -1]


Finished = Callable[[Sequence, tuple[ModelCache, int]], None]


class Decoder:
    """Sequences decoding together as the rows of one batch cache; a step is `choose` (one token
    per row) then `feed` (the batch's forward pass).

    `adopt(cache, seqs)`: start from a cache whose rows are `seqs` (used in place: a conversation's
    cache keeps the answer). `join(seq, (cache, row))`: a prefilled sequence joins at the next step
    (its row is copied into the batch then). `on_finish(seq, (cache, row))` is called for each row
    that ends, while its positions are still in the cache (the server keeps them for a follow-up).
    """

    def __init__(self, vlm: VLModel, *, headroom: int = HEADROOM, on_finish: Finished | None = None):
        self.vlm = vlm
        self.limit = vlm.config.language.max_position_embeddings
        self.headroom = headroom
        self.on_finish = on_finish
        self.seqs: list[Sequence] = []  # row i of self.cache
        self.cache: ModelCache | None = None
        self.joining: list[tuple[Sequence, tuple[ModelCache, int]]] = []
        self._chosen: list[tuple[Sequence, tuple[ModelCache, int]]] = []  # choose() -> feed()
        self.steps = 0  # batched forward passes so far, and the widest batch fed (for tests)
        self.widest = 0

    def __len__(self) -> int:
        return len(self.seqs) + len(self.joining)

    def adopt(self, cache: ModelCache, seqs: Seq[Sequence]) -> None:
        if len(self):
            raise ValueError("adopt() starts an idle decoder")
        self.cache, self.seqs = cache, list(seqs)

    def join(self, seq: Sequence, src: tuple[ModelCache, int]) -> None:
        self.joining.append((seq, src))

    def step(self) -> list[tuple[Sequence, Token]]:
        """`choose` then `feed`: one token for every row; returns the tokens chosen."""
        events = self.choose()
        self.feed()
        return events

    def choose(self) -> list[tuple[Sequence, Token]]:
        """Choose the next token of every row and joining sequence; returns their Token events in
        row order (emit them before `feed`). A sequence whose `reason` is set has ended."""
        rows = [(seq, (self.cache, i)) for i, seq in enumerate(self.seqs)] + self.joining
        events, self._chosen = [], []
        for seq, src in rows:
            if seq.is_cancelled:
                continue
            seq.next_id = seq.choose(seq.logits)
            event = seq.accept(seq.next_id, self.limit)
            if event is not None:
                events.append((seq, event))
            self._chosen.append((seq, src))
        return events

    @torch.inference_mode()
    def feed(self) -> None:
        """Rows that ended (`on_finish`) or were cancelled leave, sequences that joined enter, and
        the chosen tokens of the others go through the model in one batch."""
        live = []
        for seq, src in self._chosen:
            if seq.reason is None:
                live.append((seq, src))
            elif self.on_finish is not None:
                self.on_finish(seq, src)  # its positions are still in `src`
        self._chosen = []
        self._regroup(live)
        if self.seqs:
            logits = decode_step(self.vlm, [s.next_id for s in self.seqs], self.cache)  # (B, V)
            for i, seq in enumerate(self.seqs):
                seq.logits = logits[i]
                seq.fed += 1
            self.steps += 1
            self.widest = max(self.widest, len(self.seqs))

    def _regroup(self, live: list[tuple[Sequence, tuple[ModelCache, int]]]) -> None:
        """Make the batch cache hold exactly the `live` rows, in order: rows that left are dropped
        in place; sequences that joined are gathered with the others into a new cache."""
        joined = bool(self.joining)
        self.joining = []
        if not live:
            self.seqs, self.cache = [], None
        elif joined:
            self.cache = gather_rows([src for _, src in live], self.headroom)
            self.seqs = [seq for seq, _ in live]
        elif len(live) < len(self.seqs):
            self.cache.keep_rows([src[1] for _, src in live])
            self.seqs = [seq for seq, _ in live]
