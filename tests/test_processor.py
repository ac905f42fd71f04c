"""Processor: tiling choice, token layout, prompt format and parity with the official processor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from dsvl2_cli.app.inputs.images import load_image
from dsvl2_cli.engine.prompt.processor import (Message, Processor, ProcessorSettings, image_token_count,
                                               preprocess_image, select_tiling, user_message)
from dsvl2_cli.engine.prompt.tokenizer import Tokenizer
from dsvl2_cli.errors import ConfigError, PromptError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PARITY = SHARED / "parity-sample"
TILING_CASES = SHARED / "reference" / "tiling_cases.json"
needs_shared = pytest.mark.skipif(not PARITY.is_dir(), reason="../shared parity sample not present")

# The 23 candidates of every DeepSeek-VL2 processor_config.json, in file order.
CANDIDATES = ((384, 384), (384, 768), (768, 384), (384, 1152), (1152, 384), (384, 1536), (1536, 384),
              (768, 768), (384, 1920), (1920, 384), (384, 2304), (2304, 384), (768, 1152), (1152, 768),
              (384, 2688), (2688, 384), (384, 3072), (3072, 384), (768, 1536), (1536, 768), (384, 3456),
              (3456, 384), (1152, 1152))
SETTINGS = ProcessorSettings(candidate_resolutions=CANDIDATES)


# --- tiling ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("wh,best,tokens", [
    ((640, 480), (768, 768), 1023),
    ((1, 1), (384, 384), 421),
    ((384, 384), (384, 384), 421),
    ((1000, 300), (1152, 384), 210 + 1 + 14 * (3 * 14 + 1)),
    ((20, 5000), (384, 3456), 210 + 1 + (9 * 14) * (14 + 1)),
    # 1 px wide: every candidate scales the width to int(<1) = 0, all keep 0 pixels, least waste wins
    ((1, 5000), (384, 384), 421),
    ((4000, 4000), (1152, 1152), 210 + 1 + 42 * 43),
])
def test_tiling_by_hand(wh, best, tokens) -> None:
    got = select_tiling(*wh, CANDIDATES)
    assert got == best
    assert image_token_count(got[0] // 384, got[1] // 384) == tokens


def test_tiling_tie_goes_to_first_candidate() -> None:
    # 384x384 and 768x768 keep the same 100x100 pixels; the smaller wastes less.
    assert select_tiling(100, 100, [(768, 768), (384, 384)]) == (384, 384)
    # full tie: first in order
    assert select_tiling(100, 100, [(384, 768), (768, 384)]) == (384, 768)


def test_token_count_formula() -> None:
    assert image_token_count(1, 1) == 14 * 15 + 1 + 14 * 15 == 421
    assert image_token_count(2, 2) == 210 + 1 + 28 * 29 == 1023
    assert SETTINGS.tokens_per_tile_side == 14


@pytest.mark.skipif(not TILING_CASES.is_file(), reason="../shared tiling cases not present")
def test_all_reference_tiling_cases() -> None:
    data = json.loads(TILING_CASES.read_text())
    cands = [tuple(c) for c in data["candidate_resolutions"]]
    assert tuple(cands) == CANDIDATES
    assert len(data["cases"]) == 225
    for case in data["cases"]:
        best = select_tiling(*case["image_wh"], cands)
        tiles = (best[0] // 384, best[1] // 384)
        assert list(best) == case["best_wh"], case
        assert list(tiles) == case["tiles_wh"], case
        assert image_token_count(*tiles) == case["image_tokens"], case


# --- pixels ---------------------------------------------------------------------------------------

def test_preprocess_layout_and_padding() -> None:
    img = Image.new("RGB", (640, 480), (255, 0, 0))
    prep = preprocess_image(img, SETTINGS, tiling=True)
    assert prep.grid == (2, 2) and prep.size == (640, 480) and prep.num_tokens == 1023
    pv = prep.pixel_values
    assert pv.shape == (5, 3, 384, 384) and pv.dtype == torch.float32
    # global view: 384x288 picture centred, grey (127 -> -0.0039) bars above and below
    grey = 127 / 255 * 2 - 1
    assert torch.allclose(pv[0, :, 0, 0], torch.tensor([grey] * 3))
    assert torch.allclose(pv[0, :, 192, 192], torch.tensor([1.0, -1.0, -1.0]))
    # local view 768x768: picture scaled to 768x576, centred: rows 96..671 are red
    assert torch.allclose(pv[1, :, 0, 0], torch.tensor([grey] * 3))       # top-left tile, padding
    assert torch.allclose(pv[1, :, 383, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(pv[3, :, 383, 383], torch.tensor([grey] * 3))   # bottom-left tile, padding
    no_tiling = preprocess_image(img, SETTINGS, tiling=False)
    assert no_tiling.grid == (1, 1) and no_tiling.pixel_values.shape == (2, 3, 384, 384)


def test_tiles_are_row_major() -> None:
    img = Image.new("RGB", (768, 384))
    img.paste((255, 255, 255), (384, 0, 768, 384))  # right half white
    pv = preprocess_image(img, SETTINGS, tiling=True).pixel_values
    assert pv.shape[0] == 3
    assert pv[1].max() == -1.0 and pv[2].min() == 1.0  # left tile black, right tile white


# --- prompt format (self-contained tokenizer) ------------------------------------------------------

class FakeTokenizer:
    """One id per character, specials as single ids: makes the layout easy to read in tests."""

    bos_id, eos_id, pad_id, image_id = 1, 2, 3, 4
    SPECIAL = {"<|User|>": 5, "<|Assistant|>": 6, "<image>": 4}

    def encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            for name, tid in self.SPECIAL.items():
                if text.startswith(name, i):
                    out.append(tid)
                    i += len(name)
                    break
            else:
                out.append(1000 + ord(text[i]))
                i += 1
        return out

    def text(self, ids) -> str:
        names = {1: "<bos>", 2: "<eos>", 4: "<image>", 5: "<|User|>", 6: "<|Assistant|>"}
        return "".join(names.get(i, chr(i - 1000) if i >= 1000 else f"[{i}]") for i in ids)


@pytest.fixture()
def proc() -> Processor:
    return Processor(FakeTokenizer(), SETTINGS)  # type: ignore[arg-type]


def _text(proc: Processor, ids: torch.Tensor) -> str:
    return proc.tokenizer.text(ids.tolist())


def _img(w: int = 64, h: int = 48) -> Image.Image:
    return Image.new("RGB", (w, h), (9, 9, 9))


def test_single_turn_format(proc: Processor) -> None:
    out = proc.prepare([Message("user", "  Hello  "), Message("assistant", "")])
    assert _text(proc, out.input_ids) == "<bos><|User|>: Hello\n\n<|Assistant|>:"
    assert out.input_ids.dtype == torch.int64 and not out.image_mask.any()
    assert out.pixel_values() is None and out.num_image_tokens == []


def test_multi_turn_format(proc: Processor) -> None:
    msgs = [Message("<|User|>", "Hi"), Message("<|Assistant|>", " Hello there. "), Message("user", "Again")]
    text = _text(proc, proc.prepare(msgs).input_ids)
    assert text == "<bos><|User|>: Hi\n\n<|Assistant|>:Hello there.<eos><|User|>: Again\n\n<|Assistant|>:"
    assert text.count("<bos>") == 1


def test_system_prompt(proc: Processor) -> None:
    expected = "<bos>Be brief.\n\n<|User|>: Hi\n\n<|Assistant|>:"
    assert _text(proc, proc.prepare([Message("user", "Hi")], system=" Be brief. ").input_ids) == expected
    msgs = [Message("system", "Be brief."), Message("user", "Hi")]
    assert _text(proc, proc.prepare(msgs).input_ids) == expected
    assert _text(proc, proc.prepare(msgs, system="Other").input_ids).startswith("<bos>Other\n\n")
    assert _text(proc, proc.prepare([Message("user", "Hi")], system="  ").input_ids).startswith("<bos><|User|>")
    with pytest.raises(PromptError, match="first"):
        proc.prepare([Message("user", "Hi"), Message("system", "late")])


def test_image_tokens_replace_placeholders(proc: Processor) -> None:
    out = proc.prepare([Message("user", "<image>\nWhat is it?", (_img(640, 480),))])
    ids = out.input_ids
    assert out.num_image_tokens == [1023] and out.grids == [(2, 2)]
    assert int(out.image_mask.sum()) == 1023 and bool((ids[out.image_mask] == 4).all())
    assert int((ids == 4).sum()) == 1023
    first = int(out.image_mask.nonzero()[0])
    assert _text(proc, ids[:first]) == "<bos><|User|>: "
    assert _text(proc, ids[first + 1023:]) == "\nWhat is it?\n\n<|Assistant|>:"
    assert out.pixel_values().shape == (5, 3, 384, 384)


def test_three_images_disable_tiling(proc: Processor) -> None:
    two = proc.prepare([user_message("Compare", [_img(640, 480), _img(1000, 300)])])
    assert two.grids == [(2, 2), (3, 1)]
    msgs = [user_message("Compare", [_img(640, 480), _img(1000, 300)]), Message("assistant", "ok"),
            user_message("And this?", [_img(2000, 100)])]
    three = proc.prepare(msgs)
    assert three.grids == [(1, 1)] * 3 and three.num_image_tokens == [421] * 3
    assert three.pixel_values().shape == (6, 3, 384, 384)


def test_images_go_to_their_own_messages(proc: Processor) -> None:
    a, b = _img(640, 480), _img(384, 384)
    out = proc.prepare([user_message("one", [a]), Message("assistant", "x"), user_message("two", [b])])
    assert [im.size for im in out.images] == [(640, 480), (384, 384)]


def test_placeholder_count_mismatch(proc: Processor) -> None:
    with pytest.raises(PromptError, match="2 <image> placeholder.*1 image"):
        proc.prepare([Message("user", "<image><image> hi", (_img(),))])
    with pytest.raises(PromptError, match="0 <image> placeholder.*1 image"):
        proc.prepare([Message("user", "hi", (_img(),))])
    with pytest.raises(PromptError, match="1 <image> placeholder.*2 image"):
        user_message("<image> hi", [_img(), _img()])
    with pytest.raises(PromptError, match="assistant"):
        proc.prepare([Message("user", "hi"), Message("assistant", "<image>"), Message("user", "x")])


def test_user_message_helper() -> None:
    a, b = _img(), _img()
    assert user_message("Describe", [a, b]).content == "<image>\n<image>\nDescribe"
    assert user_message("Left <image> right <image>", [a, b]).content == "Left <image> right <image>"
    assert user_message("just text").images == ()
    assert user_message("", [a]).content == "<image>\n"


def test_empty_prompt(proc: Processor) -> None:
    for msgs in ([Message("user", "   ")], [], [Message("system", "x")], [Message("user", "")]):
        with pytest.raises(PromptError, match="empty"):
            proc.prepare(msgs)
    out = proc.prepare([user_message("", [_img()])])  # an image alone is a prompt
    assert out.num_image_tokens == [421]


def test_bad_role() -> None:
    with pytest.raises(PromptError, match="role"):
        Message("robot", "hi")


def test_prefix_property(proc: Processor) -> None:
    u1 = user_message("Describe", [_img(640, 480)])
    first = proc.prepare([u1, Message("assistant", "")]).input_ids
    second = proc.prepare([u1, Message("assistant", "A grey square."), Message("user", "Sure?")]).input_ids
    assert len(second) > len(first) and torch.equal(second[: len(first)], first)
    third = proc.prepare([u1, Message("assistant", "A grey square."), Message("user", "Sure?"),
                          Message("assistant", "Yes."), user_message("And now?", [_img()])]).input_ids
    assert torch.equal(third[: len(second)], second)


# --- settings -------------------------------------------------------------------------------------

def test_settings_from_model_dir(tmp_path: Path) -> None:
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"candidate_resolutions": [[384, 384], [768, 384]], "patch_size": 14, "downsample_ratio": 2,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    s = ProcessorSettings.from_model_dir(tmp_path)
    assert s.candidate_resolutions == ((384, 384), (768, 384)) and s.image_size == 384
    (tmp_path / "processor_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"candidate_resolutions": [[384, 384]]}))
    assert ProcessorSettings.from_model_dir(tmp_path).candidate_resolutions == ((384, 384),)
    (tmp_path / "config.json").write_text(json.dumps({}))
    with pytest.raises(ConfigError, match="candidate_resolutions"):
        ProcessorSettings.from_model_dir(tmp_path)
    (tmp_path / "processor_config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="processor_config.json"):
        ProcessorSettings.from_model_dir(tmp_path)


def test_settings_reject_bad_candidates() -> None:
    with pytest.raises(ConfigError, match="multiple"):
        ProcessorSettings(candidate_resolutions=((384, 500),))


# --- parity with the official processor ---------------------------------------------------------------

@needs_shared
@pytest.mark.parametrize("family", ["tiny-like", "small-like", "vl2-like"])
def test_parity_single_image(tmp_path: Path, family: str) -> None:
    fixture = PARITY / "fixtures" / family
    model = tmp_path / "model"  # only the small text files: no weights needed here
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json"):
        shutil.copy(fixture / name, model / name)
    expected = json.loads((PARITY / "expected" / family / "single_image.json").read_text())
    case = json.loads((PARITY / "inputs" / "cases.json").read_text())["cases"][0]
    assert case["name"] == "single_image"
    msgs = [Message(m["role"], m["content"], tuple(load_image(PARITY / "inputs" / p) for p in m.get("images", [])))
            for m in case["conversation"]]
    proc = Processor.from_dir(model)
    tok = proc.tokenizer
    assert isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.image_id) == (expected["bos_token_id"], expected["eos_token_id"],
                                                      expected["image_token_id"])
    out = proc.prepare(msgs, system=expected["system_prompt"] or None)
    assert out.input_ids.tolist() == expected["input_ids"]
    assert len(out.input_ids) == expected["num_input_tokens"]
    assert out.num_image_tokens == expected["num_image_tokens"]
    assert [list(g) for g in out.grids] == expected["images_spatial_crop"]
    assert int(out.image_mask.sum()) == expected["num_image_tokens_in_input_ids"]
    pv = out.pixel_values().double()
    assert pv.shape[0] == expected["num_tiles"]
    sums = pv.sum(dim=(1, 2, 3))
    abs_sums = pv.abs().sum(dim=(1, 2, 3))
    torch.testing.assert_close(sums, torch.tensor(expected["tile_pixel_sums"], dtype=torch.float64),
                               rtol=1e-2, atol=20.0)
    torch.testing.assert_close(abs_sums, torch.tensor(expected["tile_pixel_abs_sums"], dtype=torch.float64),
                               rtol=1e-2, atol=20.0)
