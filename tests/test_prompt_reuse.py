"""The prompt store wired into generation: a prefix saved by one run and loaded by the next gives
the very token ids of a run without the store (float32 and bfloat16), and the prefill reports
its progress (tiles, then prompt positions) as typed events."""

from __future__ import annotations

import pytest
from helpers import load_vlm, picture

import dsvl2_cli
from dsvl2_cli.app.chat import ChatSession
from dsvl2_cli.engine.generate import (Done, GenerationConfig, Prefilled, Prefilling, prefill_chunks, generate,
                                       image_prefix, stream_generate)
from dsvl2_cli.engine.prompt.processor import user_message
from dsvl2_cli.engine.prompt_store import PromptStore


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def vlm(request, ckpt_tiny):
    return load_vlm(ckpt_tiny, request.param)


def _ask(vlm, text, images, **kw):
    return vlm.prepare([user_message(text, list(images))]), GenerationConfig(max_tokens=8, **kw)


def test_a_loaded_prefix_gives_the_same_tokens_as_no_store(vlm, tmp_path):
    store = PromptStore(tmp_path)
    img = picture(500, 300, 0, randint=True)
    first, config = _ask(vlm, "What is this?", [img], prompt_store=store)
    saved = generate(vlm, first, config)
    assert saved.stats.reused_tokens == 0 and len(store.entries()) == 1
    # a new question about the same image: the prefix comes from disk, nothing else changes
    other, plain = _ask(vlm, "Describe every colour you can see in it.", [img])
    without = generate(vlm, other, plain)
    with_store = generate(vlm, other, GenerationConfig(max_tokens=8, prompt_store=store))
    assert with_store.stats.reused_tokens == image_prefix(other) > 0
    assert with_store.token_ids == without.token_ids
    # the first prompt again (its own prefix): the same ids as when it saved
    again = generate(vlm, first, config)
    assert again.stats.reused_tokens == image_prefix(first) and again.token_ids == saved.token_ids


def test_prompts_without_images_are_not_stored(vlm, tmp_path):
    store = PromptStore(tmp_path)
    prepared, config = _ask(vlm, "Write a haiku.", [], prompt_store=store)
    generate(vlm, prepared, config)
    assert store.entries() == []


def test_chat_session_takes_the_store_from_its_config(vlm, tmp_path):
    store = PromptStore(tmp_path)
    img = picture(500, 300, 1, randint=True)
    config = GenerationConfig(max_tokens=4, prompt_store=store)
    list(ChatSession(vlm, config=config, images=[img]).ask("What is this?"))
    events = list(ChatSession(vlm, config=config, images=[img]).ask("And what colour?"))
    prefilled = next(e for e in events if isinstance(e, Prefilled))
    assert prefilled.reused_tokens > 0


def test_chunks_restart_at_the_image_prefix():
    assert prefill_chunks(0, 1100, 700, 512) == [(0, 512), (512, 700), (700, 1100)]
    assert prefill_chunks(700, 1300, 700, 512) == [(700, 1212), (1212, 1300)]  # loaded: the same cuts after it
    assert prefill_chunks(0, 300, 0, 512) == [(0, 300)]  # no images
    assert prefill_chunks(800, 1000, 700, 100) == [(800, 900), (900, 1000)]  # a follow-up past the images


def test_progress_events_come_in_order_with_their_totals(ckpt_tiny, tmp_path):
    vlm = dsvl2_cli.load(ckpt_tiny, dtype="float32", device="cpu")
    images = [picture(900, 300, 2, randint=True), picture(200, 200, 3, randint=True)]
    prepared = vlm.prepare([user_message("Compare them.", images)])
    tiles = sum(1 + w * h for w, h in (img.grid for img in prepared.images))
    assert tiles == sum(img.pixel_values.shape[0] for img in prepared.images) and tiles > 4
    config = GenerationConfig(max_tokens=2, prefill_chunk=64, prompt_store=PromptStore(tmp_path))
    events = list(stream_generate(vlm, prepared, config))
    kinds = [type(e) for e in events]
    first_prefilled = kinds.index(Prefilled)
    progress = [e for e in events[:first_prefilled]]
    assert all(isinstance(e, Prefilling) for e in progress)
    vision = [(e.done, e.total) for e in progress if e.stage == "vision"]
    prompt = [(e.done, e.total) for e in progress if e.stage == "prompt"]
    assert progress[0].stage == "vision" and progress[-1].stage == "prompt"  # vision first, then the prompt
    assert vision == [(min(i, tiles), tiles) for i in range(0, tiles + 3, 4)]  # TILE_BATCH = 4
    total = int(prepared.input_ids.numel())
    assert prompt[0] == (0, total) and prompt[-1] == (total, total)
    assert [d for d, _ in prompt] == sorted(d for d, _ in prompt)
    assert not any(isinstance(e, Prefilling) for e in events[first_prefilled:])
    # the second ask loads the prefix: no tiles encoded, only the positions after it counted
    again = vlm.prepare([user_message("Which is larger?", images)])
    events = list(stream_generate(vlm, again, config))
    assert not [e for e in events if isinstance(e, Prefilling) and e.stage == "vision"]
    reused = next(e for e in events if isinstance(e, Prefilled)).reused_tokens
    assert reused == image_prefix(again)
    last = [e for e in events if isinstance(e, Prefilling)][-1]
    assert last.total == int(again.input_ids.numel()) - reused == last.done
    assert isinstance(events[-1], Done)
