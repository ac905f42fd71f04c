"""Each model component against a naive re-statement of the reference computation."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dsvl2_cli.engine.cache import new_model_cache
from dsvl2_cli.model.attention import LatentAttention, MultiHeadAttention, RMSNorm, rope_table
from dsvl2_cli.model.config import LANGUAGE_DEFAULTS, LanguageConfig
from dsvl2_cli.model.moe import MoE, looped_experts
from dsvl2_cli.model.vision import space_to_channel


def lm_config(**over) -> LanguageConfig:
    values = dict(LANGUAGE_DEFAULTS)
    values.update(vocab_size=64, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2,
                  n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1, q_lora_rank=None,
                  kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
                  max_position_embeddings=256)
    values.update(over)
    return LanguageConfig(**values)


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / max(1, p.shape[-1]) ** 0.5)


# ---------------------------------------------------------------- adaptor

def test_space_to_channel_matches_unfold_order():
    feats = torch.randn(3, 27 * 27, 5)
    ours = space_to_channel(feats, 2)  # (3, 196, 20)
    # The reference: pad 27 -> 28 with zeros at the end, then F.unfold(kernel 2, stride 2).
    x = feats.view(3, 27, 27, 5)
    x = F.pad(x, (0, 0, 0, 1, 0, 1)).permute(0, 3, 1, 2)  # (3, 5, 28, 28)
    ref = F.unfold(x, kernel_size=2, stride=2).permute(0, 2, 1)  # (3, 196, 20)
    assert torch.equal(ours, ref)
    # and an explicit spot check of the documented order: channel-major, then (dy, dx)
    assert torch.equal(ours[0, 0, :4], torch.stack([feats[0, 0, 0], feats[0, 1, 0], feats[0, 27, 0], feats[0, 28, 0]]))


# ---------------------------------------------------------------- attention

def deinterleave(x):
    d = x.shape[-1]
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def rope_ref(x, positions, theta=10000.0):
    """Rotate-half RoPE in float64, written independently of the module."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions[:, None].double() * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def naive_mla(att: LatentAttention, cfg: LanguageConfig, x: torch.Tensor) -> torch.Tensor:
    """Textbook MLA with decompressed per-head keys and values, float64, explicit causal softmax."""
    x = x.double()[0]  # (T, D)
    t = x.shape[0]
    h, nope, rope, vd, c = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    pos = torch.arange(t)
    q = (x @ att.q_proj.weight.double().T).view(t, h, nope + rope)
    ckv = x @ att.kv_a_proj_with_mqa.weight.double().T
    latent, k_pe = ckv[:, :c], ckv[:, c:]
    latent = latent * torch.rsqrt(latent.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * att.kv_a_layernorm.weight.double()
    kv_b = torch.cat([att.w_kb, att.w_vb], dim=1).double().reshape(h * (nope + vd), c)  # the checkpoint layout
    kv = (latent @ kv_b.T).view(t, h, nope + vd)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    q_pe = rope_ref(deinterleave(q[..., nope:]).transpose(0, 1), pos)  # (H, T, R)
    k_pe = rope_ref(deinterleave(k_pe), pos)  # (T, R)
    scores = (torch.einsum("thd,shd->hts", q[..., :nope], k_nope) + q_pe @ k_pe.T) * (nope + rope) ** -0.5
    scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    out = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(t, h * vd)
    return out @ att.o_proj.weight.double().T


def layer_cache(cfg, dtype):
    """One layer's empty cache (batch 1) of the kind `cfg`'s attention uses."""
    return new_model_cache(cfg, 1, None, dtype, torch.device("cpu")).layers[0]


def run_attention(att, cfg, x, chunks):
    """Run x through `att` in the given chunk sizes with a cache (or at once without one)."""
    rope_dim = cfg.qk_rope_head_dim if cfg.use_mla else cfg.head_dim
    table = rope_table(rope_dim, 256, cfg.rope_theta)
    from dsvl2_cli.model.attention import attention_mask
    if chunks is None:
        ang = table[: x.shape[1]][None, None]
        return att(x, ang.cos(), ang.sin(), None, None)
    cache, outs, start = layer_cache(cfg, x.dtype), [], 0
    for size in chunks:
        part = x[:, start:start + size]
        ang = table[start:start + size][None, None]
        outs.append(att(part, ang.cos(), ang.sin(), attention_mask(size, start, None, x.device), cache))
        start += size
    return torch.cat(outs, 1)


@pytest.mark.parametrize("path", ["absorbed", "decompressed"])
@pytest.mark.parametrize("chunks", [None, [11], [5, 1, 1, 4], [1] * 11])
def test_mla_production_paths_match_naive(path, chunks):
    cfg = lm_config()
    att = LatentAttention(cfg, path=path)
    randomise(att)
    with torch.no_grad():
        att.kv_a_layernorm.weight.add_(1.0)
    x = torch.randn(1, 11, cfg.hidden_size)
    with torch.inference_mode():
        ours = run_attention(att, cfg, x, chunks)
    ref = naive_mla(att, cfg, x)
    torch.testing.assert_close(ours[0].double(), ref, rtol=1e-4, atol=1e-5)


def test_mla_cache_holds_only_latent_and_rope_key():
    cfg = lm_config()
    att = LatentAttention(cfg)
    randomise(att)
    cache = layer_cache(cfg, torch.float32)
    table = rope_table(cfg.qk_rope_head_dim, 256, cfg.rope_theta)[:7][None, None]
    with torch.inference_mode():
        att(torch.randn(1, 7, cfg.hidden_size), table.cos(), table.sin(), None, cache)
    assert cache.length == 7
    assert cache.nbytes == 7 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_mha_matches_naive_llama_attention():
    cfg = lm_config(use_mla=False, hidden_size=32, num_attention_heads=4, num_key_value_heads=4)
    att = MultiHeadAttention(cfg)
    randomise(att)
    x = torch.randn(1, 9, 32)
    with torch.inference_mode():
        whole = run_attention(att, cfg, x, None)
        chunked = run_attention(att, cfg, x, [4, 1, 1, 3])
    xd, t, h, hd = x.double()[0], 9, 4, 8
    pos = torch.arange(t)
    q = rope_ref((xd @ att.q_proj.weight.double().T).view(t, h, hd).transpose(0, 1), pos)  # no de-interleave
    k = rope_ref((xd @ att.k_proj.weight.double().T).view(t, h, hd).transpose(0, 1), pos)
    v = (xd @ att.v_proj.weight.double().T).view(t, h, hd).transpose(0, 1)
    s = (q @ k.transpose(1, 2)) / hd**0.5
    s = s.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    ref = (s.softmax(-1) @ v).transpose(0, 1).reshape(t, h * hd) @ att.o_proj.weight.double().T
    torch.testing.assert_close(whole[0].double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


def test_rmsnorm_matches_reference_rounding():
    norm = RMSNorm(16, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    h = x.float()
    ref = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm(x), ref)


# ---------------------------------------------------------------- MoE

ROUTERS = {
    "softmax-greedy": dict(scoring_func="softmax", topk_method="greedy"),
    "softmax-greedy-renorm-scaled": dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=True,
                                         routed_scaling_factor=1.5),
    "group-limited-greedy": dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=2),
    "sigmoid-noaux_tc": dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=1, topk_group=1,
                             norm_topk_prob=True, routed_scaling_factor=2.0),
    "sigmoid-noaux_tc-grouped": dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                                     norm_topk_prob=True, routed_scaling_factor=2.0),
}


def naive_route(moe: MoE, cfg: LanguageConfig, x: torch.Tensor):
    """Per-token routing written from SPEC.md, one token at a time."""
    out = []
    for row in x.double():
        logits = moe.gate.weight.double() @ row
        scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
        choice = scores.clone()
        if cfg.topk_method == "noaux_tc":
            choice = scores + moe.gate.e_score_correction_bias.double()
        if cfg.topk_method != "greedy" and (cfg.n_group or 1) > 1:
            groups = choice.view(cfg.n_group, -1)
            rank = groups.max(-1).values if cfg.topk_method == "group_limited_greedy" else groups.topk(2, -1).values.sum(-1)
            keep = torch.zeros(cfg.n_group, dtype=torch.bool)
            keep[rank.topk(cfg.topk_group).indices] = True
            choice = torch.where(keep.repeat_interleave(groups.shape[1]), choice, torch.zeros_like(choice))
        ids = choice.topk(cfg.num_experts_per_tok).indices
        w = scores[ids]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        out.append((ids, w * cfg.routed_scaling_factor))
    return out


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_grouped_experts_match_naive_per_token_loop(router):
    cfg = lm_config(**ROUTERS[router])
    moe = MoE(cfg)
    randomise(moe, seed=1)
    with torch.no_grad():
        moe.gate.weight.mul_(8.0)  # decisive routing: no near-ties between 3rd and 4th expert
        if hasattr(moe.gate, "e_score_correction_bias"):
            moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, cfg.n_routed_experts))
    x = torch.randn(37, cfg.hidden_size)
    with torch.inference_mode():
        ours = moe(x)
        ids, weights = moe.gate(x)
    ref_routes = naive_route(moe, cfg, x)
    e = moe.experts
    ref = []
    for row, (rids, rw) in zip(x.double(), ref_routes):
        acc = torch.zeros(cfg.hidden_size, dtype=torch.float64)
        for eid, w in zip(rids.tolist(), rw):
            gu = e.gate_up[eid].double() @ row
            g, u = gu[: cfg.moe_intermediate_size], gu[cfg.moe_intermediate_size:]
            acc += w * (e.down[eid].double() @ (F.silu(g) * u))
        sh = moe.shared_experts
        gu = sh.gate_up.double() @ row
        g, u = gu.split(sh.inner)
        acc += sh.down_proj.weight.double() @ (F.silu(g) * u)
        ref.append(acc)
    for tok, (rids, rw) in enumerate(ref_routes):
        assert sorted(ids[tok].tolist()) == sorted(rids.tolist()), f"token {tok} routed differently"
    torch.testing.assert_close(ours.double(), torch.stack(ref), rtol=1e-4, atol=1e-5)


def test_noaux_bias_changes_choice_but_not_weights():
    cfg = lm_config(**ROUTERS["sigmoid-noaux_tc"])
    moe = MoE(cfg)
    randomise(moe, seed=2)
    x = torch.randn(64, cfg.hidden_size)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
        ids0, _ = moe.gate(x)
        moe.gate.e_score_correction_bias.copy_(torch.tensor([5.0] + [0.0] * (cfg.n_routed_experts - 1)))
        ids1, w1 = moe.gate(x)
    assert (ids1 == 0).any(-1).all()  # the boosted expert is always chosen...
    assert not torch.equal(ids0, ids1)
    scores = (x @ moe.gate.weight.T).sigmoid()
    chosen = scores.gather(1, ids1)
    # ...but weighted by its un-biased score, renormalised, times 2.0
    torch.testing.assert_close(w1, chosen / chosen.sum(-1, keepdim=True) * 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_path_equals_per_expert_loop(dtype):
    from dsvl2_cli.model.moe import HAS_GROUPED_MM
    if not HAS_GROUPED_MM:
        pytest.skip("this torch has no _grouped_mm")
    cfg = lm_config(**ROUTERS["softmax-greedy"])
    moe = MoE(cfg)
    randomise(moe, seed=4)
    moe = moe.to(dtype)
    moe.gate.float()  # the loader keeps the router in float32
    x = torch.randn(50, cfg.hidden_size, dtype=dtype)  # more rows than the decode kernel takes
    with torch.inference_mode():
        grouped = moe(x)
        with looped_experts():
            looped = moe(x)
    torch.testing.assert_close(grouped, looped, rtol=0, atol=0)


def test_single_token_decode_path_matches_batch():
    cfg = lm_config(**ROUTERS["softmax-greedy"])
    moe = MoE(cfg)
    randomise(moe, seed=3)
    x = torch.randn(5, cfg.hidden_size)
    with torch.inference_mode():
        batch = moe(x)
        single = torch.cat([moe(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(single, batch, rtol=1e-5, atol=1e-6)


def test_lm_config_dataclass_is_frozen():
    cfg = lm_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3
