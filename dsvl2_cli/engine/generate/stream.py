"""The library's generation calls, as mlx-lm layers them: `stream_generate` yields typed events
(`Prefilling` progress, `Prefilled`, `Token`, `Done`), `generate` joins that stream into its final
`Done`, and `generate_batch` answers independent prompts together. All three are a `Prefill`
(prefill.py) per prompt and the one `Decoder` step loop (decoder.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence as Seq
from dataclasses import replace

import torch

from ..events import Done, Event, GenerationConfig, Prefilled
from ..prompt.processor import Prepared
from ..vlmodel import VLModel
from .decoder import Decoder, Sequence
from .prefill import Prefill
from .prompt import PromptCache, check_context


def stream_generate(vlm: VLModel, prepared: Prepared, config: GenerationConfig | None = None,
                    prompt_cache: PromptCache | None = None) -> Iterator[Event]:
    """Prefill `prepared` (reusing `prompt_cache` when given) and yield events until done.

    With a prompt_cache, the generated tokens stay in it, so the next turn's prompt (this
    conversation, the answer, a new question) only prefills what is new. With
    `config.prompt_store`, the prompt's image prefix is loaded from it, or saved to it after the
    answer (the first token does not wait for the disk).
    """
    config = config or GenerationConfig()
    check_context(vlm, prepared)
    pcache = prompt_cache if prompt_cache is not None else PromptCache()
    t0 = time.perf_counter()
    job = Prefill(vlm, prepared, pcache, config.prefill_chunk, config.prompt_store)
    yield from job
    t_prefill = time.perf_counter()
    image_tokens = sum(img.num_tokens for img in prepared.images)
    yield Prefilled(job.total, job.reused, image_tokens, t_prefill - t0)

    seq = Sequence(vlm, config, prepared.input_ids, job.logits, reused=job.reused, image_tokens=image_tokens,
                   t0=t0, t_prefill=t_prefill)
    decoder = Decoder(vlm)
    decoder.adopt(pcache.cache, [seq])  # in place: the conversation's cache keeps the answer
    try:
        while len(decoder):
            for _, token in decoder.choose():
                yield token  # before the forward pass: the consumer shows it while the next one runs
            decoder.feed()
    finally:
        # the cache holds the prompt and the generated tokens that were fed (all but the last
        # one, or fewer when the stream was abandoned); the next turn reuses it up to its first
        # difference
        pcache.keys = job.keys + seq.ids[:seq.fed]
    tail = seq.finish()
    if tail is not None:
        yield tail
    done = seq.done(pcache.nbytes)
    if config.prompt_store is not None and job.reused < job.prefix < job.total:
        config.prompt_store.keep(vlm, job.keys[:job.prefix], pcache.cache)
    yield done


def generate(vlm: VLModel, prepared: Prepared, config: GenerationConfig | None = None,
             prompt_cache: PromptCache | None = None) -> Done:
    """The joined stream: the whole answer at once, as its final `Done` event."""
    for event in stream_generate(vlm, prepared, config, prompt_cache):
        if isinstance(event, Done):
            return event
    raise AssertionError("stream ended without Done")  # pragma: no cover


@torch.inference_mode()
def generate_batch(vlm: VLModel, prompts: Seq[Prepared], config: GenerationConfig | None = None,
                   max_tokens: Seq[int] | None = None) -> list[Done]:
    """Independent prompts decoded together; each is prefilled alone (so exactly as one-by-one)
    and each result equals its one-by-one run (tokens and finish_reason; in float32 exactly, in
    bfloat16 a batch's reduction order can flip a near-tie). `max_tokens`: each row's own answer
    budget (default: config's)."""
    config = config or GenerationConfig()
    if not prompts:
        return []
    budgets = list(max_tokens) if max_tokens is not None else [config.max_tokens] * len(prompts)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(budgets)} answer budgets for {len(prompts)} prompts")
    for p in prompts:
        check_context(vlm, p)
    t0 = time.perf_counter()
    decoder = Decoder(vlm, headroom=max(budgets))  # the batch cache is sized once for every answer
    seqs, per_position = [], 0
    for p, budget in zip(prompts, budgets):
        pcache = PromptCache()
        job = Prefill(vlm, p, pcache, config.prefill_chunk)
        seq = Sequence(vlm, replace(config, max_tokens=budget), p.input_ids, job.run(), t0=t0,
                       image_tokens=sum(img.num_tokens for img in p.images))
        decoder.join(seq, (pcache.cache, 0))
        seqs.append(seq)
        per_position = pcache.cache.nbytes // pcache.cache.length  # one row's cache bytes per position
    del pcache, job  # the rows are copied into the batch cache at the first step: free them then
    t_prefill = time.perf_counter()
    while len(decoder):
        decoder.step()
    t_end = time.perf_counter()
    t_first = min((s.first_at for s in seqs if s.first_at is not None), default=None)
    results = []
    for seq in seqs:
        seq.t_prefill = t_prefill
        seq.finish()
        results.append(seq.done(per_position * seq.length, t_end, t_first))
    return results
