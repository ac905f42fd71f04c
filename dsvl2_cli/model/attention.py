"""Self-attention of the language model: RoPE, plain multi-head attention (deepseek-vl2-tiny) and
Multi-head Latent Attention (small and 27B; DeepSeek-V2 paper section 2.1).

MLA projects each token to a 512-wide latent plus one 64-wide RoPE key shared by all heads; only
those are cached. Two equivalent ways to attend over the cache:
- decompressed: expand every cached latent to per-head keys/values with kv_b_proj, then ordinary
  attention. Cheapest when many queries come at once (prefill).
- absorbed: fold the key half of kv_b_proj into the query and the value half into the output, and
  attend directly in latent space. Cheapest for a few queries over a long cache (decode).
`kv_b_proj` is split once at load time into `w_kb` (H, nope, C) and `w_vb` (H, v, C) for this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import kernels
from ..engine.cache import KVCache, LatentCache
from .config import LanguageConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32, scale in the input dtype: as the reference, bit for bit in fp32.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_table(dim: int, max_positions: int, theta: float) -> torch.Tensor:
    """(max_positions, dim) float32 angles, in rotate-half layout (both halves equal)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat([freqs, freqs], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x: (B, H, T, d); cos/sin: (B, 1, T, d) in x's dtype.

    DeepSeek-V2 weights store the rope dimensions as interleaved pairs (0,1),(2,3)...; they are
    regrouped as evens-then-odds before the usual rotate-half rotation.
    """
    if interleaved:
        b, h, t, d = x.shape
        x = x.view(b, h, t, d // 2, 2).transpose(3, 4).reshape(b, h, t, d)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention_mask(q_len: int, start: int, pad: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean (B|1, 1, q_len, start+q_len) mask, True = may attend; None = plain causal (which
    for a single query after a cache means every key).

    Padded key positions are hidden, except that a padded query still sees itself: a row with
    nothing to attend to would give NaN, and NaN values survive a zero attention weight later.
    """
    if pad is None and (start == 0 or q_len == 1):
        return None  # no cache, or one query at the end: it sees every key
    total = start + q_len
    q_pos = torch.arange(start, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, Tq, Tk)
    if pad is not None:
        real_key = k_pos[None, None] >= pad.view(-1, 1, 1, 1)  # (B, 1, 1, Tk)
        mask = (mask & real_key) | (k_pos == q_pos)[None, None]
    return mask


class MultiHeadAttention(nn.Module):
    """deepseek-vl2-tiny: LLaMA-style attention (q/k/v/o_proj, rotate-half RoPE, no interleave)."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)

    def new_cache(self, batch: int, dtype, device) -> KVCache:
        return KVCache(batch, self.kv_heads, self.head_dim, dtype, device)

    def forward(self, x, cos, sin, mask, cache: KVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = kernels.linear(x, self.q_proj.weight).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = kernels.linear(x, self.k_proj.weight).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = kernels.linear(x, self.v_proj.weight).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin, interleaved=False)
        k = apply_rope(k, cos, sin, interleaved=False)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, Hkv, T_total, hd)
        if t == 1 and x.device.type == "cpu":  # decode
            out = few_query_attention(q, k, v, mask, self.head_dim**-0.5)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
                enable_gqa=self.kv_heads != self.heads,
            )
        return kernels.linear(out.transpose(1, 2).reshape(b, t, -1), self.o_proj.weight)


class LatentAttention(nn.Module):
    """MLA without query LoRA (q_lora_rank is null in every DeepSeek-VL2 config)."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.scale = cfg.q_head_dim**-0.5
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.heads * cfg.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        # kv_b_proj (H*(nope+v), C) from the checkpoint, split at load time:
        self.w_kb = nn.Parameter(torch.empty(self.heads, self.nope, self.rank))
        self.w_vb = nn.Parameter(torch.empty(self.heads, self.v_dim, self.rank))
        self.o_proj = nn.Linear(self.heads * self.v_dim, d, bias=False)
        # Absorbed attention costs ~T*(2C + R - nope - R - v) more per cached token and layer,
        # decompression ~(nope + v)*C: pick whichever is cheaper for this many new tokens.
        self.absorb_below = (self.nope + self.v_dim) * self.rank // (2 * self.rank - self.nope - self.v_dim)
        self.force_path: str | None = None  # tests: "absorbed" or "decompressed"

    def new_cache(self, batch: int, dtype, device) -> LatentCache:
        return LatentCache(batch, self.rank, self.rope, dtype, device)

    def forward(self, x, cos, sin, mask, cache: LatentCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = kernels.linear(x, self.q_proj.weight).view(b, t, self.heads, self.nope + self.rope).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)  # (B, H, T, nope), (B, H, T, R)
        q_rope = apply_rope(q_rope, cos, sin, interleaved=True)

        latent, k_rope = kernels.linear(x, self.kv_a_proj_with_mqa.weight).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (B, T, C)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin, interleaved=True).squeeze(1)  # (B, T, R)
        entry = torch.cat([latent, k_rope], dim=-1)  # (B, T, C + R): what the cache holds
        if cache is not None:
            entry = cache.update_and_fetch(entry)  # (B, T_total, C + R)

        path = self.force_path or ("absorbed" if t < self.absorb_below else "decompressed")
        if path == "absorbed":
            out = self._absorbed(q_nope, q_rope, entry, mask)
        else:
            out = self._decompressed(q_nope, q_rope, entry, mask)
        return kernels.linear(out.transpose(1, 2).reshape(b, t, self.heads * self.v_dim), self.o_proj.weight)

    def _decompressed(self, q_nope, q_rope, entry, mask) -> torch.Tensor:
        b, h, t, _ = q_nope.shape
        latent, k_rope = entry.split([self.rank, self.rope], dim=-1)  # (B, L, C), (B, L, R)
        length = latent.shape[1]
        k_nope = torch.einsum("blc,hdc->bhld", latent, self.w_kb)  # (B, H, L, nope)
        v = torch.einsum("blc,hdc->bhld", latent, self.w_vb)  # (B, H, L, v)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(b, h, length, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, nope + R)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1, scale=self.scale
        )  # (B, H, T, v)

    def _absorbed(self, q_nope, q_rope, entry, mask) -> torch.Tensor:
        b, h, t, _ = q_nope.shape
        q_latent = kernels.head_matmul(q_nope, self.w_kb, w_is_kn=True)  # (B, H, T, C)
        if q_latent is None:
            q_latent = torch.einsum("bhtd,hdc->bhtc", q_nope, self.w_kb)
        # All heads share one key/value sequence (the latent), so fold heads into the query
        # rows: one (H*T, C+R) x (C+R, L) product instead of H broadcast ones.
        q = torch.cat([q_latent, q_rope], dim=-1).reshape(b, 1, h * t, -1)  # (B, 1, H*T, C+R)
        k = entry.unsqueeze(1)  # (B, 1, L, C + R)
        v = entry[..., : self.rank].unsqueeze(1)  # (B, 1, L, C)
        if mask is None and t > 1:
            mask = _causal(t, q.device)
        if mask is not None:
            mask = mask.repeat(1, 1, h, 1)  # rows ordered head-major, as in q
        if q.device.type == "cpu":
            out = few_query_attention(q, k, v, mask, self.scale)  # (B, 1, H*T, C)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out.view(b, h, t, self.rank)
        fast = kernels.head_matmul(out, self.w_vb, w_is_kn=False)
        return fast if fast is not None else torch.einsum("bhtc,hdc->bhtd", out, self.w_vb)  # (B, H, T, v)


def few_query_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """Attention for a few query rows over a long cache: q (B, H, Tq, d), k (B, Hk, L, d),
    v (B, Hk, L, dv), Hk dividing H. Two matmuls and a float32 softmax: on CPU, torch's SDPA takes
    ~6x longer for one query (2.4 vs 0.37 ms per layer at 2000 cached tokens, tiny's shapes)."""
    if mask is None:
        out = kernels.decode_attention(q, k, v, scale)
        if out is not None:
            return out
    if k.shape[1] != q.shape[1]:  # grouped-query heads share keys and values
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # (B, H, Tq, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v  # (B, H, Tq, dv)


def _causal(t: int, device) -> torch.Tensor:
    idx = torch.arange(t, device=device)
    return (idx[None, :] <= idx[:, None])[None, None]
