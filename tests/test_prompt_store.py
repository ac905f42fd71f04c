"""The persistent prompt cache's store: exact round trips, and every way an entry can be wrong
(another model, dtype or image; truncated, damaged or foreign files) is a miss, never trusted."""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings

import pytest
import torch
from helpers import picture

from dsvl2_cli.engine.generate import GenerationConfig, PromptCache, generate, image_spans, position_keys
from dsvl2_cli.engine.prompt.processor import user_message
from dsvl2_cli.engine.prompt_store import EntryKey, PromptStore, model_fingerprint


def _prefix(vlm, prepared):
    """(key, PromptCache after one generated token) for the image prefix of `prepared`."""
    pcache = PromptCache()
    generate(vlm, prepared, GenerationConfig(max_tokens=1), pcache)
    end = image_spans(prepared)[-1][1]
    keys = tuple(position_keys(prepared)[:end])
    return EntryKey(model_fingerprint(vlm.path), str(vlm.dtype), vlm.device.type, keys), pcache


def _new_cache(vlm):
    return lambda: vlm.new_cache(1)


def test_round_trip_is_exact_and_reuse_gives_the_same_tokens(vlm, tmp_path):
    img = picture(80, 60, 0, randint=True)
    prepared = vlm.prepare([user_message("What is this?", [img])])
    key, pcache = _prefix(vlm, prepared)
    store = PromptStore(tmp_path)
    path = store.save(key, pcache.cache)
    assert path is not None and path.is_file()
    loaded = store.load(key, _new_cache(vlm), vlm.device)
    assert loaded is not None and loaded.length == len(key.keys)
    for a, b in zip(loaded.layers, pcache.cache.layers):
        for x, y in zip(a.contents(), b.contents()):
            assert torch.equal(x, y.narrow(2 if y.dim() == 4 else 1, 0, len(key.keys)))
    # a new question about the same image: the loaded prefix is reused, the tokens do not change
    other = vlm.prepare([user_message("Describe it in detail.", [img])])
    fresh = generate(vlm, other, GenerationConfig(max_tokens=6))
    reuse = PromptCache()
    reuse.cache, reuse.keys = loaded, list(key.keys)
    again = generate(vlm, other, GenerationConfig(max_tokens=6), reuse)
    assert again.token_ids == fresh.token_ids
    assert again.stats.reused_tokens == len(key.keys)


def test_another_image_dtype_or_model_misses(vlm, ckpt_tiny, tmp_path):
    prepared = vlm.prepare([user_message("What is this?", [picture(80, 60, 0, randint=True)])])
    key, pcache = _prefix(vlm, prepared)
    store = PromptStore(tmp_path / "store")
    store.save(key, pcache.cache)
    other_image, _ = _prefix(vlm, vlm.prepare([user_message("What is this?", [picture(80, 60, 1, randint=True)])]))
    assert other_image.name != key.name and store.load(other_image, _new_cache(vlm), vlm.device) is None
    other_dtype = EntryKey(key.model, "torch.bfloat16", key.device, key.keys)
    assert store.load(other_dtype, _new_cache(vlm), vlm.device) is None
    copy = tmp_path / "copy"
    shutil.copytree(ckpt_tiny, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "note": 1}))
    assert model_fingerprint(copy) != key.model  # another config is another model
    os.utime(copy / "model.safetensors", ns=(1, 1))
    before = model_fingerprint(copy)
    os.utime(copy / "model.safetensors", ns=(2, 2))  # a rewritten weight file
    assert model_fingerprint(copy) != before


def _saved(vlm, tmp_path):
    prepared = vlm.prepare([user_message("What is this?", [picture(80, 60, 2, randint=True)])])
    key, pcache = _prefix(vlm, prepared)
    store = PromptStore(tmp_path)
    return store, key, store.save(key, pcache.cache)


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign", "empty"])
def test_damaged_entries_are_ignored_with_a_warning_and_removed(vlm, tmp_path, damage):
    store, key, path = _saved(vlm, tmp_path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])  # inside the tensor bytes
    elif damage == "foreign":
        path.write_bytes(b"not a safetensors file at all" * 100)
    else:
        path.write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert store.load(key, _new_cache(vlm), vlm.device) is None
    assert any("ignored and removed" in str(w.message) for w in caught)
    assert not path.exists()


def test_an_entry_for_other_facts_under_this_name_is_not_trusted(vlm, tmp_path):
    store, key, path = _saved(vlm, tmp_path)
    liar = EntryKey(key.model, key.dtype, key.device, key.keys[:-1])
    path.rename(tmp_path / liar.name)  # right name for `liar`, facts of `key` inside
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert store.load(liar, _new_cache(vlm), vlm.device) is None


def test_least_recently_used_entries_are_evicted(vlm, tmp_path):
    store, key, path = _saved(vlm, tmp_path)
    size = path.stat().st_size
    prepared = vlm.prepare([user_message("What is this?", [picture(80, 60, 3, randint=True)])])
    key2, pcache2 = _prefix(vlm, prepared)
    store.cap_bytes = int(size * 1.5)  # room for one entry
    store.load(key, _new_cache(vlm), vlm.device)  # key is used... then key2 is newer still
    path2 = store.save(key2, pcache2.cache)
    assert path2.exists() and not path.exists()
    size2 = path2.stat().st_size
    assert store.clear() == (1, size2)
    assert store.entries() == []


def test_concurrent_writers_never_expose_half_an_entry(vlm, tmp_path):
    store, key, path = _saved(vlm, tmp_path)
    cache = store.load(key, _new_cache(vlm), vlm.device)
    stop, bad = threading.Event(), []

    def write():
        while not stop.is_set():
            PromptStore(tmp_path).save(key, cache)

    def read():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(30):
                PromptStore(tmp_path).load(key, _new_cache(vlm), vlm.device)
            bad.extend(w for w in caught if "ignored" in str(w.message))

    writers = [threading.Thread(target=write) for _ in range(2)]
    for w in writers:
        w.start()
    read()
    stop.set()
    for w in writers:
        w.join()
    assert bad == []
