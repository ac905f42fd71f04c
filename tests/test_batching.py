"""The server's engine: cache rows gathered into batches, the shared prompt-cache pool, and
continuous batching whose answers equal each request run alone."""

import threading

import pytest
import torch
from helpers import load_vlm, picture

import dsvl2_cli
from dsvl2_cli.engine.cache import gather_rows
from dsvl2_cli.engine.generate.scheduler import BatchEngine, Failed
from dsvl2_cli.engine.generate import Done, GenerationConfig, Prefilled, Token, generate, stream_generate
from dsvl2_cli.engine.prompt.processor import user_message
from dsvl2_cli.engine.generate.sampling import SamplingParams
from dsvl2_cli.errors import ContextTooLongError


@pytest.fixture(scope="module", params=["ckpt_tiny", "ckpt_small"])
def vlm(request):
    return load_vlm(request.getfixturevalue(request.param))


def test_gather_rows_left_pads_and_matches_each_row(vlm):
    caches = []
    for n in (3, 7, 5):
        cache = vlm.new_cache(1)
        vlm.forward(torch.randn(1, n, vlm.config.language.hidden_size), cache)
        caches.append(cache)
    batch = gather_rows([(c, 0) for c in caches], headroom=4)
    assert batch.length == 7 and batch.pad.tolist() == [4, 0, 2]
    back = gather_rows([(batch, 2)])  # a row out again: unpadded, same contents
    assert back.length == 5 and back.pad is None
    for name in vars(caches[2].layers[0]):
        a, b = getattr(caches[2].layers[0], name), getattr(back.layers[0], name)
        if hasattr(a, "data"):
            torch.testing.assert_close(a.data.narrow(a._dim, 0, 5), b.data.narrow(b._dim, 0, 5), rtol=0, atol=0)


def run_alone(vlm, prepared, config):
    return generate(vlm, prepared, config)


def collect(engine, prepared, config, out, i, skip=True):
    events = list(engine.stream(prepared, config, skip_special_tokens=skip, timeout=300))
    out[i] = events


def test_concurrent_requests_equal_each_alone(vlm):
    prompts = [vlm.prepare([user_message(f"Question number {i}: what is shown?" + " more" * i,
                                         [picture(200 + 40 * i, 300, seed=i)] if i % 2 else [])])
               for i in range(4)]
    configs = [GenerationConfig(max_tokens=3 + 2 * i) for i in range(4)]
    configs[3] = GenerationConfig(max_tokens=5, sampling=SamplingParams(temperature=0.8, seed=7))
    alone = [run_alone(vlm, p, c) for p, c in zip(prompts, configs)]
    engine = BatchEngine(vlm, max_batch=8)
    try:
        out = [None] * 4
        threads = [threading.Thread(target=collect, args=(engine, p, c, out, i))
                   for i, (p, c) in enumerate(zip(prompts, configs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        for events, ref in zip(out, alone):
            assert isinstance(events[0], Prefilled) and isinstance(events[-1], Done)
            done = events[-1]
            assert done.token_ids == ref.token_ids and done.text == ref.text
            assert done.finish_reason == ref.finish_reason
            assert "".join(e.text for e in events if isinstance(e, Token)) == ref.text
        assert engine.widest >= 2  # they did decode together
    finally:
        engine.close()


def test_shared_prompt_cache_reuses_an_image_across_requests(vlm):
    img = picture(300, 300, seed=3)
    first = vlm.prepare([user_message("Describe it.", [img])])
    second = vlm.prepare([user_message("Now read the text in it.", [img])])
    config = GenerationConfig(max_tokens=3)
    engine = BatchEngine(vlm, cache_bytes=1 << 30)
    try:
        list(engine.stream(first, config, timeout=300))
        events = list(engine.stream(second, config, timeout=300))
        image_tokens = first.images[0].num_tokens
        assert events[0].reused_tokens >= image_tokens
        assert events[-1].token_ids == generate(vlm, second, config).token_ids
        # the first conversation survives in the pool (the prefix was copied, not truncated)
        again = list(engine.stream(first, config, timeout=300))
        assert again[0].reused_tokens == first.input_ids.numel() - 1
    finally:
        engine.close()


def test_follow_up_turn_reuses_the_answer(vlm):
    img = picture(200, 200, seed=4)
    config = GenerationConfig(max_tokens=4)
    turn1 = [user_message("Describe it.", [img])]
    engine = BatchEngine(vlm)
    try:
        answer = list(engine.stream(vlm.prepare(turn1), config, timeout=300))[-1]
        turn2 = turn1 + [dsvl2_cli.Message("assistant", answer.text), user_message("And then?")]
        events = list(engine.stream(vlm.prepare(turn2), config, timeout=300))
        assert events[0].reused_tokens > vlm.prepare(turn1).input_ids.numel() - 1 or not answer.text.strip()
        ref = list(stream_generate(vlm, vlm.prepare(turn2), config))[-1]
        assert events[-1].token_ids == ref.token_ids
    finally:
        engine.close()


def test_pool_budget_drops_least_recently_used(vlm):
    config = GenerationConfig(max_tokens=2)
    a, b = (vlm.prepare([user_message(t)]) for t in ("First prompt here", "Another one, different"))
    engine = BatchEngine(vlm)
    try:
        list(engine.stream(a, config, timeout=300))
        one = engine.pool.nbytes
        engine.pool.budget = one + one // 2  # room for one entry of this size
        list(engine.stream(b, config, timeout=300))
        assert len(engine.pool.entries) == 1 and engine.pool.entries[0].keys[:3] == b.input_ids.tolist()[:3]
    finally:
        engine.close()


def test_errors_and_cancel_leave_the_engine_serving(vlm):
    engine = BatchEngine(vlm)
    try:
        long = vlm.prepare([user_message("word " * 5000)])
        with pytest.raises(ContextTooLongError):
            list(engine.stream(long, GenerationConfig(max_tokens=2), timeout=300))
        p = vlm.prepare([user_message("Hello there")])
        gen = engine.stream(p, GenerationConfig(max_tokens=50), timeout=300)
        next(gen)
        gen.close()  # cancels
        events = list(engine.stream(p, GenerationConfig(max_tokens=2), timeout=300))
        assert isinstance(events[-1], Done) and not isinstance(events[-1], Failed)
    finally:
        engine.close()


def test_a_new_prompt_is_prefilled_between_the_running_streams_steps(vlm, monkeypatch):
    """The scheduler runs one prefill unit (a tile, or a prompt chunk) per decode step: while B's
    image prompt is prefilled, A gets a token after every unit, instead of waiting for all of them."""
    log = []  # appended on the engine's worker thread only: the order is the schedule
    encode, forward = vlm.model.encode_tiles, vlm.forward
    monkeypatch.setattr(vlm.model, "encode_tiles", lambda x: log.append("tile") or encode(x))
    monkeypatch.setattr(vlm, "forward", lambda e, c=None, last_only=False:
                        log.append("chunk" if e.shape[1] > 1 else "step") or forward(e, c, last_only))
    engine = BatchEngine(vlm)
    try:
        a = vlm.prepare([user_message("Tell me a long story.")])
        img = picture(640, 480, seed=5)
        b = vlm.prepare([user_message("Describe it.", [img])])
        chunk = 100  # b's ~1000 positions in 10 or 11 chunks
        started = threading.Event()

        def emit_a(event):
            if isinstance(event, Token):
                log.append("A")
                started.set()

        done_b = threading.Event()
        handle_a = engine.submit(a, GenerationConfig(max_tokens=400), emit_a)
        assert started.wait(300)
        engine.submit(b, GenerationConfig(max_tokens=1, prefill_chunk=chunk),
                      lambda e: done_b.set() if isinstance(e, (Done, Failed)) else None)
        assert done_b.wait(300)
        handle_a.cancel()
    finally:
        engine.close()
    first = log.index("tile")
    last = max(i for i, x in enumerate(log) if x == "chunk")
    units = [x for x in log[first:last + 1] if x in ("tile", "chunk")]
    tiles = b.images[0].pixel_values.shape[0]
    assert units.count("tile") == tiles and units.count("chunk") >= b.input_ids.numel() // chunk
    # between two consecutive units of B's prefill, A's step ran and A got its token
    window = log[first:last + 1]
    unit_positions = [i for i, x in enumerate(window) if x in ("tile", "chunk")]
    for i, j in zip(unit_positions, unit_positions[1:]):
        assert "A" in window[i + 1:j] and "step" in window[i + 1:j], window[i:j + 1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiles_encode_alike_one_at_a_time_and_together(ckpt_tiny, dtype):
    """The server encodes one tile per unit, the library TILE_BATCH at a time: the same bits."""
    model = dsvl2_cli.load(ckpt_tiny, dtype=dtype, device="cpu").model
    x = torch.randn(4, 3, 384, 384, generator=torch.Generator().manual_seed(0)).to(model.dtype)
    with torch.inference_mode():
        together = model.encode_tiles(x)
        alone = torch.cat([model.encode_tiles(x[i:i + 1]) for i in range(4)])
    assert torch.equal(together, alone)
