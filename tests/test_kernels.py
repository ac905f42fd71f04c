"""The native decode kernels against torch's own computation (bfloat16, CPU)."""

import os
import platform
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

import dsvl2_cli
from dsvl2_cli.engine import kernels
from dsvl2_cli.engine.generate import GenerationConfig, generate
from dsvl2_cli.engine.processor import user_message
from dsvl2_cli.model.attention import few_query_attention
from dsvl2_cli.model.moe import Experts

EXPECTED_HERE = (sys.platform == "linux" and platform.machine() == "x86_64" and shutil.which("cc")
                 and os.environ.get("DSVL2_KERNELS", "1") != "0")


def test_kernels_build_where_they_should():
    if not EXPECTED_HERE:
        pytest.skip("no native kernels on this platform")
    assert kernels.status().startswith("native CPU kernels"), kernels.status()


needs_kernels = pytest.mark.skipif(not EXPECTED_HERE, reason="native kernels not available here")


def bf16_close(a, b, ulps=2):
    """Equal up to a few bf16 roundings relative to the output's scale."""
    scale = b.float().abs().max().clamp_min(1e-6)
    err = (a.float() - b.float()).abs().max() / scale
    assert err <= ulps * 2**-8, float(err)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("n, k", [(64, 1280), (100, 100), (7, 33), (1000, 896), (3, 129)])
def test_linear_matches_torch(rows, n, k):
    g = torch.Generator().manual_seed(rows * n + k)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    bf16_close(kernels.linear(x, w), F.linear(x, w))


def test_linear_falls_back_outside_its_domain():
    w = torch.randn(16, 32)
    x = torch.randn(2, 32)
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))  # float32: torch path
    xb, wb = x.bfloat16(), w.bfloat16()
    big = torch.randn(kernels.MAX_ROWS + 1, 32).bfloat16()
    assert torch.equal(kernels.linear(big, wb), F.linear(big, wb))  # many rows: GEMM
    with kernels.disabled():
        assert torch.equal(kernels.linear(xb, wb), F.linear(xb, wb))


@needs_kernels
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_moe_kernel_matches_grouped_torch(tokens):
    g = torch.Generator().manual_seed(tokens)
    experts = Experts(16, 96, 40)
    with torch.no_grad():
        experts.gate_up.copy_(torch.randn(16, 80, 96, generator=g) / 10)
        experts.down.copy_(torch.randn(16, 96, 40, generator=g) / 6)
    experts = experts.bfloat16()
    x = torch.randn(tokens, 96, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(tokens)])
    weights = torch.rand(tokens, 6, generator=g)
    with torch.inference_mode():
        fast = experts(x, ids, weights)
        with kernels.disabled():
            slow = experts(x, ids, weights)
    bf16_close(fast, slow)


@needs_kernels
@pytest.mark.parametrize("b, h, hk, d, dv, length", [
    (1, 10, 10, 128, 128, 2000),  # tiny: MHA, one query per head
    (2, 8, 2, 64, 64, 300),       # grouped-query heads, two sequences
    (1, 16, 1, 576, 512, 37),     # MLA absorbed: heads folded into rows over one latent sequence
    (1, 70, 1, 96, 80, 5),        # more rows than one accumulator block, odd sizes
])
def test_decode_attention_matches_float_reference(b, h, hk, d, dv, length):
    g = torch.Generator().manual_seed(length)
    cache = torch.randn(b, hk, length + 40, d, generator=g).bfloat16()  # spare capacity, as a cache has
    k, v = cache[:, :, :length], cache[:, :, :length, :dv]  # strided views, v inside k as in MLA
    q = torch.randn(b, h, 1, d, generator=g).bfloat16()
    got = kernels.decode_attention(q, k, v, d**-0.5)
    assert got is not None and got.shape == (b, h, 1, dv)
    rep = h // hk
    kf, vf = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    exact = torch.softmax(q.float() @ kf.transpose(-1, -2) * d**-0.5, -1) @ vf
    bf16_close(got, exact)  # only the output's rounding to bf16 (and fp32 sums) apart
    with kernels.disabled():  # torch's path rounds scores and weights to bf16: further away
        torch_err = (few_query_attention(q, k, v, None, d**-0.5).float() - exact).abs().max()
    assert (got.float() - exact).abs().max() <= torch_err + 1e-6


@needs_kernels
@pytest.mark.parametrize("b, h, t, k, n", [(1, 16, 1, 128, 512), (2, 4, 3, 64, 100), (1, 3, 8, 33, 17)])
def test_head_matmul_matches_einsum(b, h, t, k, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(b, h, t, k, generator=g).bfloat16()
    w_kn, w_nk = torch.randn(h, k, n, generator=g).bfloat16(), torch.randn(h, n, k, generator=g).bfloat16()
    bf16_close(kernels.head_matmul(x, w_kn, w_is_kn=True), torch.einsum("bhtk,hkn->bhtn", x.float(), w_kn.float()))
    bf16_close(kernels.head_matmul(x, w_nk, w_is_kn=False), torch.einsum("bhtk,hnk->bhtn", x.float(), w_nk.float()))
    assert kernels.head_matmul(torch.randn(b, h, 9, k).bfloat16(), w_kn, w_is_kn=True) is None  # too many rows


@needs_kernels
def test_bf16_model_decode_same_with_and_without_kernels(ckpt_vl2, ckpt_tiny):
    for path in (ckpt_tiny, ckpt_vl2):
        vlm = dsvl2_cli.load(path, dtype="bfloat16", device="cpu")
        g = torch.Generator().manual_seed(0)
        img = (torch.rand(300, 400, 3, generator=g) * 255).to(torch.uint8).numpy()
        from PIL import Image
        prepared = vlm.prepare([user_message("Describe.", [Image.fromarray(img)])])
        fast = generate(vlm, prepared, GenerationConfig(max_tokens=8))
        with kernels.disabled():
            slow = generate(vlm, prepared, GenerationConfig(max_tokens=8))
        assert fast.token_ids == slow.token_ids
