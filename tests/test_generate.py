"""Generation engine equivalences on all three fixture families."""

from dataclasses import replace

import pytest
import torch
from helpers import load_vlm, picture

import dsvl2_cli
from dsvl2_cli.engine.generate import (Done, GenerationConfig, Prefilled, Prefilling, Prefill, PromptCache, StopMatcher, Token,
                                       generate, generate_batch, stream_generate)
from dsvl2_cli.engine.prompt.tokenizer import clean_text
from dsvl2_cli.engine.prompt.processor import Message, user_message
from dsvl2_cli.engine.generate.sampling import SamplingParams
from dsvl2_cli.errors import ContextTooLongError
from dsvl2_cli.model.config import ModelConfig

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def models(ckpt_tiny, ckpt_small, ckpt_vl2):
    return {name: load_vlm(path)
            for name, path in (("tiny-like", ckpt_tiny), ("small-like", ckpt_small), ("vl2-like", ckpt_vl2))}


@pytest.fixture(params=["tiny-like", "small-like", "vl2-like"])
def vlm(request, models):
    return models[request.param]


def prompt(vlm, text="Describe this image.", images=(picture(500, 300),)):
    return vlm.prepare([user_message(text, list(images))])


GREEDY = GenerationConfig(max_tokens=8)


def test_cached_decode_equals_uncached_forward(vlm):
    prepared = prompt(vlm)
    with torch.inference_mode():
        embeds = vlm.embed(prepared)
        cache = vlm.new_cache()
        logits = vlm.forward(embeds, cache, last_only=True)[0, -1]
        ids, cached_logits = [], []
        for _ in range(8):
            cached_logits.append(logits)
            ids.append(int(logits.argmax()))
            step = vlm.embed_tokens(torch.tensor([[ids[-1]]]))
            logits = vlm.forward(step, cache)[0, -1]
            embeds = torch.cat([embeds, step], 1)
        # uncached: a full forward over the prompt plus the tokens so far, at every step
        full = vlm.forward(embeds)[0]
    t = prepared.input_ids.numel()
    for i in range(8):
        torch.testing.assert_close(cached_logits[i], full[t - 1 + i], **TOL)
        assert int(full[t - 1 + i].argmax()) == ids[i]
    # and the engine produces the same greedy tokens (eos may end it early)
    result = generate(vlm, prepared, GREEDY)
    assert list(result.token_ids) == ids[: len(result.token_ids)]


@pytest.mark.parametrize("chunk", [1, 37, 256])
def test_chunked_prefill_equals_one_shot(vlm, chunk):
    prepared = prompt(vlm, images=(picture(300, 900, seed=1),))
    whole = generate(vlm, prepared, GenerationConfig(max_tokens=6, prefill_chunk=100_000))
    chunked = generate(vlm, prepared, GenerationConfig(max_tokens=6, prefill_chunk=chunk))
    assert chunked.token_ids == whole.token_ids
    with torch.inference_mode():
        a, b = PromptCache(), PromptCache()
        la = Prefill(vlm, prepared, a, 100_000).run()
        lb = Prefill(vlm, prepared, b, chunk).run()
    torch.testing.assert_close(la, lb, **TOL)
    for ca, cb in zip(a.cache.layers, b.cache.layers):
        assert ca.length == cb.length == prepared.input_ids.numel()


def test_multi_turn_follow_up_reuses_cache_and_skips_vision(vlm, monkeypatch):
    img = picture(640, 480, seed=2)
    first = [user_message("What is this?", [img])]
    cache = PromptCache()
    answer = generate(vlm, vlm.prepare(first), GenerationConfig(max_tokens=5), cache)
    history = first + [Message("assistant", answer.text), user_message("And the colours?")]
    follow = vlm.prepare(history)

    calls = []
    original = vlm.model.vision.forward
    monkeypatch.setattr(vlm.model.vision, "forward", lambda x: calls.append(x.shape[0]) or original(x))
    events = list(stream_generate(vlm, follow, GenerationConfig(max_tokens=5), cache))
    prefilled = next(e for e in events if isinstance(e, Prefilled))
    assert calls == []  # the image was not encoded again
    assert prefilled.reused_tokens > sum(i.num_tokens for i in follow.images)

    # same logits as processing the whole conversation from scratch
    with torch.inference_mode():
        fresh = Prefill(vlm, follow, PromptCache(), 512).run()
        cache2 = PromptCache()
        generate(vlm, vlm.prepare(first), GenerationConfig(max_tokens=5), cache2)
        job = Prefill(vlm, follow, cache2, 512)
        reused, n = job.run(), job.reused
    assert n > 0
    torch.testing.assert_close(reused, fresh, **TOL)


def test_edited_history_invalidates_cache(vlm):
    img_a, img_b = picture(400, 400, seed=3), picture(400, 400, seed=4)
    cache = PromptCache()
    generate(vlm, vlm.prepare([user_message("Describe.", [img_a])]), GenerationConfig(max_tokens=3), cache)
    # same text and same token count, different image: nothing after the image start may be reused
    edited = vlm.prepare([user_message("Describe.", [img_b])])
    events = list(stream_generate(vlm, edited, GenerationConfig(max_tokens=3), cache))
    reused = next(e for e in events if isinstance(e, Prefilled)).reused_tokens
    first_image = int(edited.image_mask.nonzero()[0])
    assert reused <= first_image
    fresh = generate(vlm, edited, GenerationConfig(max_tokens=3))
    assert events[-1].token_ids == fresh.token_ids


def test_batch_equals_one_by_one(vlm):
    prompts = [
        prompt(vlm, "Describe this image.", [picture(640, 480, seed=5)]),
        prompt(vlm, "Read the text.", [picture(200, 900, seed=6)]),
        vlm.prepare([user_message("Just text, no image here at all.", [])]),
    ]
    config = GenerationConfig(max_tokens=6)
    batch = generate_batch(vlm, prompts, config)
    single = [generate(vlm, p, config) for p in prompts]
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]
    assert [r.finish_reason for r in batch] == [r.finish_reason for r in single]


def test_batch_rows_keep_their_own_answer_budgets(vlm):
    """ocr plans a budget per page: each row stops at its own, as it would alone."""
    prompts = [prompt(vlm, "Describe this image.", [picture(640, 480, seed=5)]),
               vlm.prepare([user_message("Just text, no image here at all.", [])])]
    config = GenerationConfig(max_tokens=6)
    batch = generate_batch(vlm, prompts, config, max_tokens=[2, 5])
    single = [generate(vlm, p, replace(config, max_tokens=m)) for p, m in zip(prompts, [2, 5])]
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]
    assert [r.finish_reason for r in batch] == [r.finish_reason for r in single]
    assert len(batch[0].token_ids) <= 2 and len(batch[1].token_ids) <= 5


def test_mla_cache_bytes_per_token(models, shared_dir):
    for name, vlm in models.items():
        lm = vlm.config.language
        prepared = prompt(vlm)
        result = generate(vlm, prepared, GenerationConfig(max_tokens=1))
        per_token = result.stats.cache_bytes / prepared.input_ids.numel()
        expected = lm.num_hidden_layers * lm.cache_values_per_token() * 4  # float32
        assert per_token == expected, name
        if lm.use_mla:
            assert lm.cache_values_per_token() == lm.kv_lora_rank + lm.qk_rope_head_dim
    # the real small config: 27 layers x 576 x 2 bytes = 31,104 B/token vs 276,480 B for full K/V
    cfg = ModelConfig.from_dir(shared_dir / "reference" / "deepseek-vl2").language
    import dataclasses
    small = dataclasses.replace(cfg, num_hidden_layers=27, num_attention_heads=16)
    assert small.num_hidden_layers * small.cache_values_per_token() * 2 == 31_104
    assert small.num_hidden_layers * small.full_kv_values_per_token() * 2 == 276_480


def test_context_limit_is_a_clear_error(models):
    vlm = models["tiny-like"]
    prepared = vlm.prepare([user_message("word " * 5000, [picture(640, 480)])])
    with pytest.raises(ContextTooLongError, match=r"prompt is \d+ tokens \(images 1023, text \d+\) .* 4096"):
        generate(vlm, prepared)


def test_stream_events_are_typed_and_join_to_result(vlm):
    prepared = prompt(vlm)
    events = list(stream_generate(vlm, prepared, GenerationConfig(max_tokens=7)))
    progress = [e for e in events if isinstance(e, Prefilling)]
    events = events[len(progress):]  # the prefill's progress comes first, nothing of it after
    assert progress and isinstance(events[0], Prefilled) and isinstance(events[-1], Done)
    tokens = [e for e in events if isinstance(e, Token)]
    done = events[-1]
    assert "".join(t.text for t in tokens) == done.text
    assert tuple(t.id for t in tokens if t.id is not None) == done.token_ids
    assert done.finish_reason in ("eos", "length")
    assert done.text == clean_text(vlm.tokenizer.decode(list(done.token_ids), skip_special_tokens=True))
    s = done.stats
    assert s.prompt_tokens == prepared.input_ids.numel() and s.generated_tokens == len(done.token_ids)
    assert s.time_to_first_token > 0 and s.image_tokens == prepared.images[0].num_tokens


def test_max_tokens_and_stop_strings(models):
    vlm = models["tiny-like"]
    prepared = prompt(vlm)
    long = generate(vlm, prepared, GenerationConfig(max_tokens=12))
    if long.finish_reason != "length" or len(long.text) < 4:
        pytest.skip("fixture answer too short to cut")
    assert len(long.token_ids) == 12
    stop = long.text[2:4]
    cut = generate(vlm, prepared, GenerationConfig(max_tokens=12, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == long.text[: long.text.find(stop)]


def test_seeded_sampling_is_reproducible(models):
    vlm = models["small-like"]
    prepared = prompt(vlm)
    cfg = GenerationConfig(max_tokens=10, sampling=SamplingParams(temperature=1.0, top_p=0.95, seed=7))
    a, b = generate(vlm, prepared, cfg), generate(vlm, prepared, cfg)
    assert a.token_ids == b.token_ids
    other = generate(vlm, prepared, GenerationConfig(max_tokens=10, sampling=SamplingParams(temperature=1.0, seed=8)))
    greedy = generate(vlm, prepared, GenerationConfig(max_tokens=10))
    assert other.token_ids != a.token_ids or greedy.token_ids != a.token_ids


def test_stop_matcher_across_token_boundaries():
    m = StopMatcher(["</end>"])
    out, hits = [], []
    for piece in ["hel", "lo </", "en", "d> more"]:
        text, hit = m.feed(piece)
        out.append(text)
        hits.append(hit)
    assert "".join(out) == "hello " and hits == [False, False, False, True]
    # a partial match that does not complete is released
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)
    assert m.feed("ART") == ("START", False)
    assert m.feed("", final=True) == ("", False)
    assert StopMatcher([]).feed("anything") == ("anything", False)


# ------------------------------------------------------------------ context limit and padding

SHORT_CONTEXT = 48


def short_context_copy(src, dst, limit=SHORT_CONTEXT):
    """`src` checkpoint with max_position_embeddings = limit (weights linked, not copied)."""
    import json
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg["language_config"]["max_position_embeddings"] = limit
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module", params=["tiny-like", "small-like"])
def short_vlm(request, tmp_path_factory, ckpt_tiny, ckpt_small):
    src = {"tiny-like": ckpt_tiny, "small-like": ckpt_small}[request.param]
    path = short_context_copy(src, tmp_path_factory.mktemp("short") / request.param)
    return load_vlm(path)


def text_prompt(vlm, words: int):
    return vlm.prepare([user_message(" ".join(["word"] * words), [])])


def test_generation_ends_at_the_context_limit(short_vlm):
    p = text_prompt(short_vlm, 3)
    n = p.input_ids.numel()
    result = generate(short_vlm, p, GenerationConfig(max_tokens=1000))
    assert result.finish_reason == "context"
    # every position is used: the prompt, then all answer tokens but the last one (never fed)
    assert len(result.token_ids) == SHORT_CONTEXT - n + 1


def test_batch_rows_reaching_the_context_limit_equal_one_by_one(short_vlm):
    """Issue 16: rows of different lengths end at their own limit while others still decode."""
    prompts = [text_prompt(short_vlm, w) for w in (1, 12, 5)]
    config = GenerationConfig(max_tokens=1000)
    batch = generate_batch(short_vlm, prompts, config)
    single = [generate(short_vlm, p, config) for p in prompts]
    assert [r.finish_reason for r in single] == ["context"] * 3
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]
    assert [r.finish_reason for r in batch] == [r.finish_reason for r in single]


def test_batch_rows_ignore_their_padding(vlm):
    """Left-padded rows give each prompt's own logits: at the prompt's end and for decode steps."""
    prompts = [vlm.prepare([user_message(t, [])]) for t in ("Hi.", "A much longer question than the first one?")]
    lengths = [p.input_ids.numel() for p in prompts]
    width = max(lengths)
    pad = torch.tensor([width - n for n in lengths])
    ids = torch.full((2, width), vlm.tokenizer.pad_id)
    for row, p in enumerate(prompts):
        ids[row, pad[row]:] = p.input_ids
    step = torch.tensor([[7], [7]])
    with torch.inference_mode():
        cache = vlm.new_cache(2, pad)
        batch = [vlm.forward(vlm.embed_tokens(ids), cache, last_only=True)[:, -1]]
        for _ in range(2):
            batch.append(vlm.forward(vlm.embed_tokens(step), cache)[:, -1])
        for row, p in enumerate(prompts):
            alone = vlm.new_cache(1)
            single = [vlm.forward(vlm.embed_tokens(p.input_ids[None]), alone, last_only=True)[0, -1]]
            for _ in range(2):
                single.append(vlm.forward(vlm.embed_tokens(step[:1]), alone)[0, -1])
            for b, s in zip(batch, single):
                torch.testing.assert_close(b[row], s, **TOL)


def test_same_prompt_again_with_its_prompt_cache(vlm):
    """The cache covers the whole prompt: its last position is recomputed for the first token."""
    p = prompt(vlm)
    cache = PromptCache()
    first = generate(vlm, p, GREEDY, cache)
    events = list(stream_generate(vlm, p, GREEDY, cache))
    assert next(e for e in events if isinstance(e, Prefilled)).reused_tokens == p.input_ids.numel() - 1
    assert events[-1].token_ids == first.token_ids
    assert isinstance(first, dsvl2_cli.Result)  # Result is Done's old name
