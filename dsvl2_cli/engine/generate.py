"""Generation in three layers (as mlx-lm): a step loop over the model, a stream of typed events
(`Prefilling` progress, `Prefilled`, `Token`, `Done`), and `generate()` which joins the stream
into its final `Done`. Consumers ignore events they do not know.
One decode step loop (`_decode`) serves a single sequence (batch 1) and `generate_batch`.

- The prompt is prefilled in chunks of `prefill_chunk` positions (the reference's "incremental
  prefilling"): the same logits as one pass, with activations bounded by the chunk size.
- A `PromptCache` remembers which positions (token ids, and for image positions which image) its
  ModelCache holds, so a follow-up turn only prefills what is new; images already in the cache
  are not encoded again. A changed history truncates the cache at the first difference.
- With `GenerationConfig.prompt_store` (prompt_store.py), a prompt's image prefix (everything up
  to the last image's last token) is saved on disk after it is computed and loaded by a later
  process with the same images and leading text. The prefill always cuts a chunk at the end of
  that prefix, so a loaded prefix gives the very computations (and token ids) of a fresh run.
- `generate_batch` runs independent prompts together, left-padded, with outputs equal to running
  them one by one.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import replace

import torch

from ..errors import ContextTooLongError
from .cache import ModelCache
from .events import (  # noqa: F401  (re-exported: their old home)
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
from .processor import Prepared
from .prompt_store import PromptStore
from .runtime import TILE_BATCH, VLModel
from .sampling import make_generator, sample

# ------------------------------------------------------------------------------ prompt cache

def image_fingerprint(pixel_values: torch.Tensor) -> str:
    """Identity of an image as the model sees it (its normalised tiles)."""
    data = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def image_spans(prepared: Prepared) -> list[tuple[int, int]]:
    """[start, end) prompt positions of each image's tokens, in order."""
    positions = prepared.image_mask.nonzero().flatten().tolist()
    spans, i = [], 0
    for img in prepared.images:
        spans.append((positions[i], positions[i + img.num_tokens - 1] + 1))
        i += img.num_tokens
    return spans


def position_keys(prepared: Prepared) -> list:
    """Per prompt position what the cache must have seen there: a token id, or (image, index)."""
    keys: list = prepared.input_ids.tolist()
    for img, (start, end) in zip(prepared.images, image_spans(prepared)):
        fp = image_fingerprint(img.pixel_values)
        keys[start:end] = [(fp, j) for j in range(end - start)]
    return keys


class PromptCache:
    """A ModelCache plus what it holds, for reuse across the turns of one conversation."""

    def __init__(self):
        self.cache: ModelCache | None = None
        self.keys: list = []

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    def reset(self) -> None:
        self.cache, self.keys = None, []

    def reusable(self, keys: list) -> int:
        """How many leading positions of a new prompt the cache already holds (< len(keys):
        the last prompt position is always recomputed, its logits pick the first token)."""
        n = 0
        limit = min(len(self.keys), len(keys) - 1)
        while n < limit and self.keys[n] == keys[n]:
            n += 1
        if n and isinstance(keys[n], tuple) and keys[n][1] > 0:
            # never start inside an image: back up to its first token
            n -= keys[n][1]
        return n


# --------------------------------------------------------------------------------- the engine

def check_context(vlm: VLModel, prepared: Prepared) -> None:
    limit = vlm.config.language.max_position_embeddings
    total = int(prepared.input_ids.numel())
    if total < limit:
        return
    image_counts = [img.num_tokens for img in prepared.images]
    text = total - sum(image_counts)
    detail = f"images {' + '.join(map(str, image_counts))}, text {text}" if image_counts else f"text {text}"
    raise ContextTooLongError(
        f"prompt is {total} tokens ({detail}) but the context holds {limit} including the answer; "
        "use fewer images (with 3 or more, images are not tiled), smaller or less elongated images, "
        "a shorter text, or start a new conversation"
    )


def image_prefix(prepared: Prepared) -> int:
    """Positions up to the end of the last image's tokens (0 without images): what the prompt
    store keeps, since a new question about the same images shares exactly these."""
    spans = image_spans(prepared)
    return spans[-1][1] if spans else 0


def _chunks(start: int, total: int, prefix: int, chunk: int) -> list[tuple[int, int]]:
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


def _encode(vlm: VLModel, images) -> Generator[Prefilling, None, torch.Tensor | None]:
    """Adaptor outputs (N, 196, D) of `images`' tiles, TILE_BATCH at a time (as embed_prompt),
    yielding progress between batches; None without images."""
    if not images:
        return None
    pixels = torch.cat([img.pixel_values for img in images])
    n, parts = pixels.shape[0], []
    yield Prefilling("vision", 0, n)
    for i in range(0, n, TILE_BATCH):
        parts.append(vlm.model.encode_tiles(pixels[i:i + TILE_BATCH]))
        yield Prefilling("vision", min(i + TILE_BATCH, n), n)
    return torch.cat(parts)


def _prefill_steps(vlm: VLModel, prepared: Prepared, pcache: PromptCache, chunk: int,
                   store: PromptStore | None = None) -> Generator[Prefilling, None, tuple[torch.Tensor, int]]:
    """Bring the cache up to the whole prompt, yielding Prefilling between tile batches and
    chunks; return the last position's logits (1, V) and the number of positions reused."""
    keys = position_keys(prepared)
    total = len(keys)
    prefix = image_prefix(prepared)
    if pcache.cache is None:
        pcache.cache = vlm.new_cache(1)
    start = pcache.reusable(keys)
    if store is not None and start < prefix < total:
        saved = store.lookup(vlm, keys[:prefix])
        if saved is not None:
            pcache.cache, pcache.keys, start = saved, keys[:prefix], prefix
    pcache.cache.truncate(start)
    pcache.keys = pcache.keys[:start]

    # encode only the images whose tokens lie in the new part (earlier ones are cached)
    spans = image_spans(prepared)
    new_images = [img for img, (s, _) in zip(prepared.images, spans) if s >= start]
    tiles = yield from _encode(vlm, new_images)
    embeds = vlm.model.embed(prepared.input_ids[start:][None], prepared.image_mask[start:][None],
                             grids=[img.grid for img in new_images], tiles=tiles)
    pcache.cache.reserve(total + 1)
    logits = None
    yield Prefilling("prompt", 0, total - start)
    for s, e in _chunks(start, total, prefix, chunk):
        logits = vlm.forward(embeds[:, s - start:e - start], pcache.cache, last_only=True)
        yield Prefilling("prompt", e - start, total - start)
    pcache.keys = keys
    return logits[:, -1], start


def _prefill(vlm: VLModel, prepared: Prepared, pcache: PromptCache, chunk: int) -> tuple[torch.Tensor, int]:
    """_prefill_steps without its progress (batching.py, tests)."""
    steps = _prefill_steps(vlm, prepared, pcache, chunk)
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


class _Sequence:
    """One generated sequence's bookkeeping: ids, detokenizer, stop strings, why it ended."""

    def __init__(self, vlm: VLModel, config: GenerationConfig, history: torch.Tensor, offset: int = 0):
        self.tok = vlm.tokenizer
        self.config = config
        self.generator = make_generator(config.sampling.seed)
        self.history = history  # (T,) prompt ids, for the repetition penalty
        self.offset = offset  # left-padding positions before this row's prompt in a batch cache
        self.decoder = self.tok.stream(skip_special=True)
        self.stops = StopMatcher(config.stop)
        self.ids: list[int] = []
        self.parts: list[str] = []
        self.fed = 0  # generated tokens fed through the model (all but a final one)
        self.first_at: float | None = None  # perf_counter() when the first token was chosen
        self.reason: str | None = None

    def choose(self, logits: torch.Tensor) -> int:
        """logits (V,) -> the next token id."""
        penalty = self.config.sampling.repetition_penalty != 1.0
        if penalty:
            self.history = torch.cat([self.history, self.history.new_tensor(self.ids[-1:])])
        token = int(sample(logits[None], self.config.sampling, self.history[None] if penalty else None,
                           self.generator)[0])
        self.first_at = self.first_at or time.perf_counter()
        return token

    def accept(self, token_id: int, cache_len: int, limit: int) -> Token | None:
        """Record a sampled token; returns its event (None for eos) and sets `reason` when done.
        cache_len: this row's positions in the cache; at `limit` no position is left to feed."""
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
        elif cache_len >= limit:
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

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _decode(vlm: VLModel, seqs: list[_Sequence], logits: torch.Tensor, cache: ModelCache) -> Iterator[tuple[int, Token]]:
    """The decode step loop, shared by one sequence and a batch: from each row's last prompt
    logits (B, V), choose, accept and feed one token per unfinished row until all are done.
    Yields (row, Token) as tokens are accepted.

    Finished rows leave the batch (and the cache) at once: a row is never fed past its own
    context limit, and the rows still running see exactly what they would alone.
    """
    limit = vlm.config.language.max_position_embeddings
    rows = list(range(len(seqs)))  # batch position -> sequence index
    while True:
        step = []
        for i, r in enumerate(rows):
            seq = seqs[r]
            token = seq.choose(logits[i])
            event = seq.accept(token, cache.length - seq.offset, limit)
            if event is not None:
                yield r, event
            step.append(token)
        live = [i for i, r in enumerate(rows) if seqs[r].reason is None]
        if not live:
            return
        if len(live) < len(rows):
            cache.keep_rows(live)
            rows, step = [rows[i] for i in live], [step[i] for i in live]
        logits = decode_step(vlm, step, cache)
        for r in rows:
            seqs[r].fed += 1


def decode_step(vlm: VLModel, tokens: Sequence[int], cache: ModelCache) -> torch.Tensor:
    """Feed one token per cache row (B rows) and return the next logits (B, V): the step of
    every decode loop (`_decode` here, the server's continuous batch in batching.py)."""
    ids = torch.tensor(tokens, device=vlm.device)[:, None]  # (B, 1)
    return vlm.forward(vlm.embed_tokens(ids), cache)[:, -1]


def _stats(prompt_len, reused, image_tokens, n, t0, t_prefill_end, t_first, t_end, cache_bytes) -> Stats:
    prefill_time = t_prefill_end - t0
    decode_time = (t_end - t_first) if t_first else 0.0
    return Stats(
        prompt_tokens=prompt_len,
        reused_tokens=reused,
        image_tokens=image_tokens,
        generated_tokens=n,
        time_to_first_token=(t_first or t_end) - t0,
        prefill_tokens_per_second=(prompt_len - reused) / prefill_time if prefill_time > 0 else 0.0,
        decode_tokens_per_second=(n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0,
        cache_bytes=cache_bytes,
    )


@torch.inference_mode()
def stream_generate(vlm: VLModel, prepared: Prepared, config: GenerationConfig | None = None,
                    prompt_cache: PromptCache | None = None) -> Iterator[Event]:
    """Prefill `prepared` (reusing `prompt_cache` when given) and yield events until done.

    With a prompt_cache, the generated tokens stay in it, so the next turn's prompt (this
    conversation, the answer, a new question) only prefills what is new.
    """
    config = config or GenerationConfig()
    check_context(vlm, prepared)
    pcache = prompt_cache if prompt_cache is not None else PromptCache()
    t0 = time.perf_counter()

    store = config.prompt_store
    logits, reused = yield from _prefill_steps(vlm, prepared, pcache, config.prefill_chunk, store)
    t_prefill = time.perf_counter()
    prompt_len = int(prepared.input_ids.numel())
    image_tokens = sum(img.num_tokens for img in prepared.images)
    yield Prefilled(prompt_len, reused, image_tokens, t_prefill - t0)

    seq = _Sequence(vlm, config, prepared.input_ids.to(vlm.device))
    prompt_keys = pcache.keys
    try:
        for _, event in _decode(vlm, [seq], logits, pcache.cache):
            yield event
    finally:
        # the cache holds the prompt and the generated tokens that were fed (all but the last
        # one, or fewer when the stream was abandoned); the next turn reuses it up to its first
        # difference
        pcache.keys = prompt_keys + seq.ids[:seq.fed]
    tail = seq.finish()
    if tail is not None:
        yield tail
    stats = _stats(prompt_len, reused, image_tokens, len(seq.ids), t0, t_prefill, seq.first_at,
                   time.perf_counter(), pcache.nbytes)
    prefix = image_prefix(prepared)
    if store is not None and reused < prefix < prompt_len:
        # saved after the answer, not before it: the first token does not wait for the disk
        store.keep(vlm, prompt_keys[:prefix], pcache.cache)
    yield Done(seq.reason, seq.text, tuple(seq.ids), stats)


@torch.inference_mode()
def generate_batch(vlm: VLModel, prompts: Sequence[Prepared], config: GenerationConfig | None = None,
                   max_tokens: Sequence[int] | None = None) -> list[Done]:
    """Independent prompts decoded together (left-padded); each result equals its one-by-one run
    (tokens and finish_reason). `max_tokens`: each row's own answer budget (default: config's)."""
    config = config or GenerationConfig()
    if not prompts:
        return []
    budgets = list(max_tokens) if max_tokens is not None else [config.max_tokens] * len(prompts)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(budgets)} answer budgets for {len(prompts)} prompts")
    for p in prompts:
        check_context(vlm, p)
    t0 = time.perf_counter()
    lengths = [int(p.input_ids.numel()) for p in prompts]
    width, b = max(lengths), len(prompts)
    pad = torch.tensor([width - n for n in lengths])
    ids = torch.full((b, width), vlm.tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, pad[row]:] = p.input_ids
        mask[row, pad[row]:] = p.image_mask
    embeds = vlm.embed_prompt(ids, mask, [img for p in prompts for img in p.images])  # images row-major
    cache = vlm.new_cache(b, pad.to(vlm.device) if int(pad.max()) else None)
    cache.reserve(width + max(budgets))
    for s in range(0, width, config.prefill_chunk):
        logits = vlm.forward(embeds[:, s:s + config.prefill_chunk], cache, last_only=True)[:, -1]  # (B, V)
    t_prefill = time.perf_counter()
    per_position = cache.nbytes // (b * width)  # one row's cache bytes per position

    seqs = [_Sequence(vlm, replace(config, max_tokens=m), p.input_ids.to(vlm.device), width - n)
            for p, n, m in zip(prompts, lengths, budgets)]
    for _ in _decode(vlm, seqs, logits, cache):
        pass
    t_end = time.perf_counter()
    t_first = min((s.first_at for s in seqs if s.first_at is not None), default=None)
    results = []
    for row, seq in enumerate(seqs):
        seq.finish()
        stats = _stats(lengths[row], 0, sum(i.num_tokens for i in prompts[row].images), len(seq.ids),
                       t0, t_prefill, t_first, t_end, per_position * (width + seq.fed))
        results.append(Done(seq.reason, seq.text, tuple(seq.ids), stats))
    return results


def generate(vlm: VLModel, prepared: Prepared, config: GenerationConfig | None = None,
             prompt_cache: PromptCache | None = None) -> Done:
    """The joined stream: the whole answer at once, as its final `Done` event."""
    for event in stream_generate(vlm, prepared, config, prompt_cache):
        if isinstance(event, Done):
            return event
    raise AssertionError("stream ended without Done")  # pragma: no cover


class StopMatcher:
    """Holds back text that could be the start of a stop string, so a stop string split across
    tokens is never half-printed; cuts the text where a stop string begins."""

    def __init__(self, stops: Sequence[str]):
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
