"""Full multimodal forward passes on every fixture family, 1, 2 and 3 images of several shapes."""

import pytest
import torch
from helpers import load_vlm, picture

import dsvl2_cli
from dsvl2_cli.engine.prompt.processor import Message, user_message

SHAPES = [(640, 480), (300, 900), (1200, 400), (50, 50)]


@pytest.fixture(scope="module", params=["tiny-like", "small-like", "vl2-like"])
def vlm(request, ckpt_tiny, ckpt_small, ckpt_vl2):
    path = {"tiny-like": ckpt_tiny, "small-like": ckpt_small, "vl2-like": ckpt_vl2}[request.param]
    return load_vlm(path)


@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_forward_with_images(vlm, n_images):
    images = [picture(*SHAPES[(i + n_images) % len(SHAPES)], seed=i) for i in range(n_images)]
    prepared = vlm.prepare([user_message("Compare these.", images)])
    side = vlm.config.tokens_per_tile_side
    for img in prepared.images:
        w, h = img.grid
        assert img.num_tokens == side * (side + 1) + 1 + (h * side) * (w * side + 1)
        if n_images >= 3:
            assert img.grid == (1, 1)  # no tiling with 3+ images
    logits = vlm.logits(prepared)
    assert logits.shape == (prepared.input_ids.numel(), vlm.config.language.vocab_size)
    assert torch.isfinite(logits).all()
    # the images matter: another image changes the last logits, same prompt otherwise
    other = vlm.prepare([user_message("Compare these.", [picture(*SHAPES[0], seed=99)] * n_images)])
    if other.input_ids.numel() == prepared.input_ids.numel():
        assert not torch.allclose(vlm.logits(other)[-1], logits[-1])


def test_text_only_and_multi_turn(vlm):
    prepared = vlm.prepare([Message("user", "Hello there."), Message("assistant", "Hi."), Message("user", "Bye.")])
    assert prepared.images == [] and torch.isfinite(vlm.logits(prepared)).all()


def test_bfloat16_forward_close_to_float32(vlm):
    prepared = vlm.prepare([user_message("Describe.", [picture(640, 480, seed=5)])])
    ref = vlm.logits(prepared)[-1]
    bf16 = dsvl2_cli.load(vlm.path, dtype="bfloat16", device="cpu")
    out = bf16.logits(prepared)[-1]
    assert out.dtype == torch.float32
    # bf16 keeps ~3 significant digits; across a few layers the logits stay close in direction
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=0)
    assert cos > 0.99, float(cos)
