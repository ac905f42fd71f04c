"""The native decode kernels against torch's own computation (bfloat16, CPU)."""

import os
import platform
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import picture

import dsvl2_cli
from dsvl2_cli.engine.native import kernels
from dsvl2_cli.engine.generate import GenerationConfig, generate
from dsvl2_cli.engine.prompt.processor import user_message
from dsvl2_cli.model.attention import RMSNorm, apply_rope, few_query_attention
from dsvl2_cli.model.moe import Experts, combine_experts, silu_gate

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
@pytest.mark.parametrize("n, k", [(64, 1280), (100, 100), (7, 33), (1000, 896), (3, 129), (9, 120)])
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
    (3, 4, 4, 64, 64, 131),       # one query per head, 64-wide values, keys not a multiple of 4
    (1, 2, 2, 256, 128, 7),       # one query per head, the widest head the register path takes
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
        prepared = vlm.prepare([user_message("Describe.", [picture(400, 300, seed=0)])])
        fast = generate(vlm, prepared, GenerationConfig(max_tokens=8))
        with kernels.disabled():
            slow = generate(vlm, prepared, GenerationConfig(max_tokens=8))
        assert fast.token_ids == slow.token_ids


# ---------------------------------------------------------------------- prefill attention

def _prefill_inputs(b, h, hk, t, length, d, dv, seed, q_gain=1.0, key_ramp=0.0):
    """q (B, H, T, d), k (B, Hk, L, d), v (B, Hk, L, dv) bf16. With d == dv and h == hk: strided
    views of one (B, T, 3, H, d) tensor, as the vision tower's qkv projection gives them."""
    g = torch.Generator().manual_seed(seed)
    if d == dv and h == hk and t == length:
        qkv = torch.randn(b, t, 3, h, d, generator=g).bfloat16()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, d), non-contiguous
    else:
        q = torch.randn(b, h, t, d, generator=g).bfloat16()
        k = torch.randn(b, hk, length, d, generator=g).bfloat16()
        v = torch.randn(b, hk, length, dv, generator=g).bfloat16()
    if q_gain != 1.0:  # large scores: exp overflows without the max subtraction
        q = (q.float() * q_gain).bfloat16()
    if key_ramp:  # scores growing along the keys: the running max rises block after block
        k = (k.float() * torch.linspace(1.0, 1.0 + key_ramp, length)[:, None]).bfloat16()
    return q, k, v


def prefill_reference(q, k, v, scale, causal, offset):
    """float32 SDPA on the same bf16 inputs; causal: query i sees keys 0..offset+i."""
    rep = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    mask = None
    if causal:
        mask = torch.arange(k.shape[2])[None, :] <= (offset + torch.arange(q.shape[2]))[:, None]  # (T, L)
    return F.scaled_dot_product_attention(q.float(), kf, vf, attn_mask=mask, scale=scale)


# The bound: O = sum_j bf16(p_j) v_j / sum_j p_j, and bf16 rounding moves each weight by at most
# 2^-9 relative, so O moves by at most 2^-9 max|v|; the output's own rounding adds 2^-9 |O| <=
# 2^-9 max|v|. fp32 sums and the exp polynomial (~2e-6 relative) are far below that.
PREFILL_CASES = [  # b, h, hk, t, length, d, dv, causal, offset, q_gain, key_ramp
    (2, 4, 4, 729, 729, 72, 72, False, 0, 1.0, 0.0),      # vision: strided qkv views, head dim 72
    (1, 4, 4, 300, 300, 128, 128, True, 0, 1.0, 0.0),     # tiny's MHA prefill, causal
    (1, 2, 2, 100, 357, 128, 128, True, 257, 1.0, 0.0),   # a chunk after 257 cached tokens
    (1, 3, 3, 200, 200, 192, 128, True, 0, 1.0, 0.0),     # MLA decompressed: dk 192 != dv 128
    (1, 4, 2, 130, 130, 64, 64, False, 0, 1.0, 0.0),      # grouped-query heads
    (1, 2, 2, 150, 150, 64, 64, False, 0, 40.0, 0.0),     # huge scores: the max subtraction
    (1, 2, 2, 260, 260, 64, 64, True, 0, 8.0, 6.0),       # rising scores: the lazy rescaling
    (1, 2, 1, 3, 3, 7, 5, False, 0, 1.0, 0.0),            # odd feature counts, 3 rows
    (1, 2, 2, 2, 2, 16, 16, True, 0, 1.0, 0.0),
    (2, 1, 1, 1, 1, 72, 72, True, 0, 1.0, 0.0),           # one row
    (1, 1, 1, 1, 70, 40, 24, True, 69, 1.0, 0.0),         # one row after a cache
]


@needs_kernels
@pytest.mark.parametrize("b, h, hk, t, length, d, dv, causal, offset, q_gain, key_ramp", PREFILL_CASES)
def test_prefill_attention_matches_float_reference(b, h, hk, t, length, d, dv, causal, offset, q_gain, key_ramp):
    q, k, v = _prefill_inputs(b, h, hk, t, length, d, dv, t + length + d, q_gain, key_ramp)
    scale = d**-0.5
    got = kernels.prefill_attention(q, k, v, scale, causal, offset, min_isa=0)  # every build, not only the fast one
    assert got is not None and got.shape == (b, h, t, dv) and got.dtype == torch.bfloat16
    exact = prefill_reference(q, k, v, scale, causal, offset)
    assert bool(got.isfinite().all())
    bound = 2 * 2**-9 * v.float().abs().max() + 1e-5
    err = (got.float() - exact).abs().max()
    assert err <= bound, (float(err), float(bound))


@needs_kernels
def test_prefill_attention_merged_heads_layout():
    """merge_heads writes (B, T, H*dv) directly: the same numbers as the (B, H, T, dv) output."""
    q, k, v = _prefill_inputs(2, 3, 3, 50, 50, 40, 40, 1)
    heads = kernels.prefill_attention(q, k, v, 0.2, min_isa=0)
    merged = kernels.prefill_attention(q, k, v, 0.2, merge_heads=True, min_isa=0)
    assert merged.shape == (2, 50, 120) and merged.is_contiguous()
    assert torch.equal(merged, heads.transpose(1, 2).reshape(2, 50, 120))


def test_prefill_attention_falls_back_outside_its_domain():
    q, k, v = _prefill_inputs(1, 2, 2, 8, 8, 16, 16, 2)
    assert kernels.prefill_attention(q.float(), k.float(), v.float(), 0.25) is None  # float32: torch
    assert kernels.prefill_attention(q[..., ::2], k[..., ::2], v[..., ::2], 0.25) is None  # features strided
    big = torch.zeros(1, 1, 4, 320).bfloat16()
    assert kernels.prefill_attention(big, big, big, 0.1) is None  # head dim beyond the scratch
    with kernels.disabled():
        assert kernels.prefill_attention(q, k, v, 0.25) is None


# ------------------------------------------------------------ vision elementwise (GELU, LayerNorm)
# Reference: float32 math on the very bf16 inputs. Bound per element: one bf16 rounding of the
# output (2^-8 relative), plus a float32-sized absolute slack for values near zero (GELU: the
# exp polynomial and the division, ~1e-7; LayerNorm: the statistics' summation order times the
# row's scale, where weight * x_hat and bias cancel).

def _elementwise_close(got, ref, slack):
    excess = ((got.float() - ref).abs() - ref.abs() * 2**-8).max()
    assert excess <= slack, float(excess)


@needs_kernels
@pytest.mark.parametrize("rows, n, scale", [(1, 16, 1.0), (7, 37, 4.0), (33, 1152, 3.0), (5, 4304, 8.0),
                                            (3, 15, 0.01)])
def test_bias_gelu_matches_float_reference(rows, n, scale):
    g = torch.Generator().manual_seed(rows * n)
    y = (torch.randn(rows, n, generator=g) * scale).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    ref = F.gelu(y.float() + b.float(), approximate="tanh")
    out = y.clone()
    assert kernels.bias_gelu_(out, b) is out  # in place
    _elementwise_close(out, ref, 1e-6)
    no_bias = y.clone()
    kernels.bias_gelu_(no_bias, None)
    _elementwise_close(no_bias, F.gelu(y.float(), approximate="tanh"), 1e-6)
    extremes = torch.tensor([-200.0, 200.0, 0.0, -20.0, -1e30, 1e30, -3.0] * 5).bfloat16()  # vector lanes and tail
    got = kernels.bias_gelu_(extremes.clone(), None)
    assert torch.isfinite(got).all()
    _elementwise_close(got, F.gelu(extremes.float(), approximate="tanh"), 1e-6)


@needs_kernels
@pytest.mark.parametrize("rows, n, mean, std", [(1, 16, 0.0, 1.0), (7, 37, 5.0, 0.1), (29, 1152, 1.0, 3.0),
                                                (4, 17, 0.0, 1e-4), (2, 300, -2.0, 20.0)])
def test_layer_norm_matches_float_reference(rows, n, mean, std):
    g = torch.Generator().manual_seed(rows + n)
    x = (torch.randn(rows, n, generator=g) * std + mean).bfloat16()
    w, b = (torch.randn(n, generator=g).bfloat16() for _ in range(2))
    eps = 1e-6 if std > 1e-3 else 1e-6 + std**2  # tiny rows: eps is a visible part of the variance
    for weight, bias in ((w, b), (w, None), (None, None)):
        ref = F.layer_norm(x.float(), (n,), None if weight is None else weight.float(),
                           None if bias is None else bias.float(), eps)
        got = kernels.layer_norm(x, weight, bias, eps)
        assert got.shape == x.shape and got.dtype == torch.bfloat16
        _elementwise_close(got, ref, 2**-16 * ref.abs().max())


@needs_kernels
@pytest.mark.parametrize("rows, n, std", [(1, 1280, 1.0), (3, 2048, 0.02), (5, 512, 30.0), (2, 37, 1.0), (1, 16, 1e-3)])
def test_rms_norm_matches_the_plain_module(rows, n, std):
    """The native RMSNorm rounds as model/attention.py's RMSNorm does in bf16 (the normalised row
    to bf16, then the product with the weight): against that module's own float64 recomputation
    it is within one rounding of each step, and against the module it differs only where the
    float32 sum of squares (summed in another order) tips a rounding: one bf16 ulp, rarely."""
    g = torch.Generator().manual_seed(rows * n)
    x = (torch.randn(rows, n, generator=g) * std).bfloat16()
    norm = RMSNorm(n, 1e-6).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(n, generator=g) * 0.5 + 1)
    got = kernels.rms_norm(x, norm.weight.detach(), norm.eps)
    with torch.inference_mode():
        plain = norm(x)
    assert got is not None and got.shape == x.shape and got.dtype == torch.bfloat16
    xd = x.double()
    h = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16().double()
    _elementwise_close(got, norm.weight.detach().double() * h, 1e-30)
    ulp = plain.float().abs().clamp_min(2**-126) * 2**-7
    differ = got != plain
    assert ((got.float() - plain.float()).abs() <= ulp).all()
    assert differ.float().mean() <= 0.02
    strided = torch.cat([x, x], dim=-1)[:, :n]  # rows not contiguous: copied first, same answer
    assert torch.equal(kernels.rms_norm(strided, norm.weight.detach(), norm.eps), got)
    assert kernels.rms_norm(x.float(), norm.weight.detach(), norm.eps) is None  # float32: torch
    assert kernels.rms_norm(x, norm.weight.detach().float(), norm.eps) is None  # float32 weight


@needs_kernels
@pytest.mark.parametrize("b, h, t, d, interleaved, table_batch", [
    (1, 10, 1, 128, False, 1),   # tiny's decode: one query row per head
    (2, 16, 7, 64, True, 2),     # MLA's rope part, two sequences at their own positions (padding)
    (2, 1, 5, 64, True, 1),      # MLA's shared key, one table broadcast over the batch
    (1, 3, 300, 8, False, 1),    # a prefill chunk: enough rows for both threads
])
def test_rope_is_torch_bit_for_bit(b, h, t, d, interleaved, table_batch):
    """The native RoPE makes torch's three bf16 roundings (x*cos, rotate_half(x)*sin, their sum),
    so it equals model/attention.py's apply_rope exactly, for strided views as the projections
    give them (heads transposed out of the token dim, rope dims split off the end of a row)."""
    g = torch.Generator().manual_seed(b * h * t * d)
    x = (torch.randn(b, t, h, d + 6, generator=g) * 3).bfloat16()[..., 3:3 + d].transpose(1, 2)  # (B, H, T, d)
    angles = torch.randn(table_batch, 1, t, d, generator=g) * 20
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    got = kernels.rope(x, cos, sin, interleaved)
    assert got is not None and got.is_contiguous()
    assert torch.equal(got, apply_rope(x, cos, sin, interleaved))
    assert kernels.rope(x.float(), cos.float(), sin.float(), interleaved) is None  # float32: torch
    assert kernels.rope(x, cos[..., : d // 2], sin[..., : d // 2], interleaved) is None  # table too narrow
    with kernels.disabled():
        assert kernels.rope(x, cos, sin, interleaved) is None


@needs_kernels
@pytest.mark.parametrize("rows, inner", [(1, 16), (7, 37), (300, 896), (33, 1408)])
def test_silu_mul_is_torch_bit_for_bit(rows, inner):
    """silu(gate) * up natively, with torch's two bf16 roundings, equals model/moe.py's silu_gate."""
    g = torch.Generator().manual_seed(rows + inner)
    h = (torch.randn(rows, 2 * inner, generator=g) * 4).bfloat16()
    got = kernels.silu_mul(h, inner)
    assert got is not None and got.shape == (rows, inner)
    assert torch.equal(got, silu_gate(h, inner))
    assert torch.equal(kernels.silu_mul(h[None], inner)[0], got)  # leading dims kept
    assert kernels.silu_mul(h.float(), inner) is None and kernels.silu_mul(h, inner + 1) is None


@needs_kernels
@pytest.mark.parametrize("n, k, d, experts", [(1000, 6, 1280, 64), (37, 2, 33, 5), (5, 1, 16, 3)])
def test_moe_combine_is_torch_bit_for_bit(n, k, d, experts):
    """The native combine (rows back in token order, weighted, summed over k in float32: products
    rounded before the sum) equals combine_experts' torch path exactly. With the products fused
    into the adds (the compiler's fp-contract), ~1e-5 of the first case's elements differ."""
    g = torch.Generator().manual_seed(n * k)
    x = torch.randn(n, d, generator=g).bfloat16()
    ids = torch.randint(0, experts, (n, k), generator=g)
    weights = torch.rand(n, k, generator=g)

    def run(routed, counts):  # stands in for the experts
        return (routed.float() * 1.37).bfloat16()

    plain = combine_experts(x, ids, weights, experts, run)
    native = combine_experts(x, ids, weights, experts, run, kernels.moe_combine)
    assert torch.equal(native, plain)
    assert kernels.moe_combine(run(x, None)[:-1], ids.flatten().argsort(), weights) is None  # wrong row count


def test_scratch_is_reused_grown_and_capped():
    """The wrappers' per-thread scratch: at least what was asked, the same buffer again for as much
    or less, a bigger one kept when more is asked, and one above SCRATCH_KEPT not kept."""
    first = kernels.scratch(1000)
    assert first.numel() >= 1000 and kernels.scratch(10).data_ptr() == first.data_ptr()
    bigger = kernels.scratch(first.numel() + 1)
    assert bigger.numel() > first.numel() and kernels.scratch(first.numel()).data_ptr() == bigger.data_ptr()
    huge = kernels.scratch(kernels.SCRATCH_KEPT + 1)
    assert huge.numel() > kernels.SCRATCH_KEPT and kernels.scratch(16).data_ptr() == bigger.data_ptr()
    del huge


@needs_kernels
def test_vision_elementwise_fall_back_outside_their_domain():
    x = torch.randn(4, 32).bfloat16()
    w = torch.ones(32).bfloat16()
    assert kernels.layer_norm(x.float(), None, None, 1e-6) is None  # float32: torch
    assert kernels.layer_norm(x[:, ::2], None, None, 1e-6) is None  # strided rows
    assert kernels.layer_norm(x, w[:16], None, 1e-6) is None  # wrong weight shape
    assert kernels.bias_gelu_(x.t(), None) is None  # non-contiguous
    assert kernels.bias_gelu_(x, w.float()) is None  # float32 bias
    with kernels.disabled():
        assert kernels.layer_norm(x, w, w, 1e-6) is None and kernels.bias_gelu_(x, w) is None


@needs_kernels
def test_vision_fast_modules_match_and_fall_back():
    """install_vision's swaps hold the same tensors, agree with the plain modules within bf16
    rounding, and are the plain modules exactly with the kernels off (or in float32)."""
    from dsvl2_cli.engine.native.fast import FastLayerNorm, FastVisionMLP, install_vision
    from dsvl2_cli.model.config import VisionConfig
    from dsvl2_cli.model.vision import VisionTower

    cfg = VisionConfig("siglip_so400m_patch14_384", 56, 14, 40, 2, 4, 2.5)  # 16 patches, MLP 100 wide
    torch.manual_seed(0)
    plain = VisionTower(cfg).eval()
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    plain = plain.bfloat16()
    fast = VisionTower(cfg).bfloat16().eval()
    fast.load_state_dict(plain.state_dict())
    held = fast.blocks[0].mlp.fc1.weight.data_ptr(), fast.norm.weight.data_ptr()
    install_vision(fast, native=True)
    assert type(fast.blocks[1].mlp) is FastVisionMLP and type(fast.blocks[1].norm2) is FastLayerNorm
    assert (fast.blocks[0].mlp.fc1.weight.data_ptr(), fast.norm.weight.data_ptr()) == held  # no copies
    pixels = torch.rand(3, 3, 56, 56).bfloat16() * 2 - 1
    with torch.inference_mode():
        want = plain(pixels)
        bf16_close(fast(pixels), want, ulps=4)
        with kernels.disabled():
            assert torch.equal(fast(pixels), want)
        x = torch.randn(2, 5, 40)
        assert torch.equal(fast.blocks[0].mlp.float()(x), plain.blocks[0].mlp.float()(x))
        assert torch.equal(fast.norm.float()(x), plain.norm.float()(x))
