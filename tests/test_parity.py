"""End-to-end parity with the official implementation (../shared/parity-sample): checkpoints
written by its save_pretrained, and its float32 outputs for one image conversation each."""

import json

import pytest
import torch

import dsvl2_cli
from dsvl2_cli.app.inputs.images import load_image
from dsvl2_cli.engine.generate import GenerationConfig, generate
from dsvl2_cli.engine.prompt.processor import Message

FAMILIES = ["tiny-like", "small-like", "vl2-like"]


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, shared_dir):
    root = shared_dir / "parity-sample"
    expected = json.loads((root / "expected" / request.param / "single_image.json").read_text())
    vlm = dsvl2_cli.load(root / "fixtures" / request.param, dtype="float32", device="cpu")
    conv = json.loads((root / "inputs" / "cases.json").read_text())["cases"][0]["conversation"]
    messages = [Message(m["role"], m["content"], tuple(load_image(root / "inputs" / p) for p in m.get("images", [])))
                for m in conv]
    return vlm, vlm.prepare(messages), expected


def test_prompt_ids_and_tiling(case):
    _, prepared, expected = case
    assert prepared.input_ids.tolist() == expected["input_ids"]
    assert [list(img.grid) for img in prepared.images] == expected["images_spatial_crop"]
    assert prepared.num_image_tokens == expected["num_image_tokens"]


def test_image_embedding_probes(case):
    vlm, prepared, expected = case
    embeds = vlm.embed(prepared)[0]
    for name, values in expected["inputs_embeds_probes"].items():
        pos = int(name.split("@")[1])
        torch.testing.assert_close(embeds[pos], torch.tensor(values), rtol=1e-4, atol=1e-4, msg=name)
    image_rows = embeds[prepared.image_mask].double()
    assert image_rows.sum().item() == pytest.approx(expected["image_embeds_sum"], rel=1e-5)
    assert image_rows.pow(2).sum().item() == pytest.approx(expected["image_embeds_sq_sum"], rel=1e-5)


def test_prefill_logits(case):
    vlm, prepared, expected = case
    last = vlm.logits(prepared)[-1]
    torch.testing.assert_close(last, torch.tensor(expected["prefill_last_logits"]), rtol=0, atol=2e-4)
    assert last.topk(2).indices.tolist() == expected["prefill_top2"]["ids"]


def test_greedy_tokens_with_cache(case):
    vlm, prepared, expected = case
    want = expected["greedy"]["generated_ids"]
    result = generate(vlm, prepared, GenerationConfig(max_tokens=len(want)))
    eos = vlm.tokenizer.eos_id
    # the reference keeps generating past nothing: compare up to our eos, if one came
    got = list(result.token_ids) + ([eos] if result.finish_reason == "eos" else [])
    assert got == want[: len(got)] and len(got) == len(want)
