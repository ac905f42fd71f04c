"""Self-attention of the language model: RoPE, plain multi-head attention (deepseek-vl2-tiny) and
Multi-head Latent Attention (small and 27B; DeepSeek-V2 paper section 2.1).

MLA projects each token to a 512-wide latent plus one 64-wide RoPE key shared by all heads; only
those are cached. Two equivalent ways to attend over the cache:
- decompressed: expand every cached latent to per-head keys/values with kv_b_proj, then ordinary
  attention. Cheapest when many queries come at once (prefill).
- absorbed: fold the key half of kv_b_proj into the query and the value half into the output, and
  attend directly in latent space. Cheapest for a few queries over a long cache (decode).
`kv_b_proj` is split once at load time into `w_kb` (H, nope, C) and `w_vb` (H, v, C) for this.

Plain torch throughout. Small hooks let the engine run faster code without changing the math:
`attend` (attention over the cache: MHA's, and MLA's in latent space), `rotate` (the rotary
embedding) and, for MLA, `attend_heads` (per-head attention after decompression: prefill) and
`head_matmul` (the per-head absorption products). engine/native/fast.py replaces them at load time on CPU.
Caches are duck-typed (`update_and_fetch`; engine/cache.py has them): the model imports no engine code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        self.attend = sdpa_attention  # (q, k, v, mask, scale) -> out; the engine may swap it
        self.rotate = apply_rope  # (x, cos, sin, interleaved) -> rotated x; likewise

    def forward(self, x, cos, sin, mask, cache) -> torch.Tensor:
        """x (B, T, D); cache: a KVCache or None."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = self.rotate(q, cos, sin, interleaved=False)
        k = self.rotate(k, cos, sin, interleaved=False)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, Hkv, T_total, hd)
        # (B, H, T, hd); scale None: 1/sqrt(hd); without a mask and a cache, causal over the T new
        out = self.attend(q, k, v, mask, None, causal=mask is None and t > 1)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class LatentAttention(nn.Module):
    """MLA without query LoRA (q_lora_rank is null in every DeepSeek-VL2 config)."""

    PATHS = ("absorbed", "decompressed")

    def __init__(self, cfg: LanguageConfig, path: str | None = None):
        """path: None picks per call by cost; "absorbed" or "decompressed" forces one (tests)."""
        super().__init__()
        if path is not None and path not in self.PATHS:
            raise ValueError(f"path must be one of {self.PATHS} or None, got {path!r}")
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
        self.path = path
        self.attend = sdpa_attention  # latent-space attention (q, k, v, mask, scale); the engine may swap it
        self.attend_heads = sdpa_attention  # per-head attention of the decompressed path; likewise
        self.head_matmul = head_matmul  # (x, w, w_is_kn) per-head products; the engine may swap it
        self.rotate = apply_rope  # (x, cos, sin, interleaved) -> rotated x; likewise

    def forward(self, x, cos, sin, mask, cache) -> torch.Tensor:
        """x (B, T, D); cache: a LatentCache or None."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.nope + self.rope).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)  # (B, H, T, nope), (B, H, T, R)
        q_rope = self.rotate(q_rope, cos, sin, interleaved=True)

        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (B, T, C)
        k_rope = self.rotate(k_rope.unsqueeze(1), cos, sin, interleaved=True).squeeze(1)  # (B, T, R)
        entry = torch.cat([latent, k_rope], dim=-1)  # (B, T, C + R): what the cache holds
        if cache is not None:
            entry = cache.update_and_fetch(entry)  # (B, T_total, C + R)

        path = self.path or ("absorbed" if t < self.absorb_below else "decompressed")
        if path == "absorbed":
            out = self._absorbed(q_nope, q_rope, entry, mask)
        else:
            out = self._decompressed(q_nope, q_rope, entry, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.v_dim))

    def _decompressed(self, q_nope, q_rope, entry, mask) -> torch.Tensor:
        b, h, t, _ = q_nope.shape
        latent, k_rope = entry.split([self.rank, self.rope], dim=-1)  # (B, L, C), (B, L, R)
        length = latent.shape[1]
        k_nope = torch.einsum("blc,hdc->bhld", latent, self.w_kb)  # (B, H, L, nope)
        v = torch.einsum("blc,hdc->bhld", latent, self.w_vb)  # (B, H, L, v)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(b, h, length, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, nope + R)
        return self.attend_heads(q, k, v, mask, self.scale, causal=mask is None and t > 1)  # (B, H, T, v)

    def _absorbed(self, q_nope, q_rope, entry, mask) -> torch.Tensor:
        b, h, t, _ = q_nope.shape
        q_latent = self.head_matmul(q_nope, self.w_kb, True)  # (B, H, T, C)
        # All heads share one key/value sequence (the latent), so fold heads into the query
        # rows: one (H*T, C+R) x (C+R, L) product instead of H broadcast ones.
        q = torch.cat([q_latent, q_rope], dim=-1).reshape(b, 1, h * t, -1)  # (B, 1, H*T, C+R)
        k = entry.unsqueeze(1)  # (B, 1, L, C + R)
        v = entry[..., : self.rank].unsqueeze(1)  # (B, 1, L, C)
        if mask is None and t > 1:
            mask = _causal(t, q.device)
        if mask is not None:
            mask = mask.repeat(1, 1, h, 1)  # rows ordered head-major, as in q
        out = self.attend(q, k, v, mask, self.scale).view(b, h, t, self.rank)  # (B, H, T, C)
        return self.head_matmul(out, self.w_vb, False)  # (B, H, T, v)


def sdpa_attention(q, k, v, mask, scale: float | None, causal: bool = False) -> torch.Tensor:
    """softmax(scale q k^T + mask) v: q (B, H, Tq, d), k (B, Hk, L, d), v (B, Hk, L, dv), Hk
    dividing H; mask None: every key, or causal (then Tq == L). Out (B, H, Tq, dv)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def head_matmul(x: torch.Tensor, w: torch.Tensor, w_is_kn: bool) -> torch.Tensor:
    """Per-head products: x (B, H, T, K) with w (H, K, N) when `w_is_kn` -> x @ w, else with
    w (H, N, K) -> x @ w^T; (B, H, T, N)."""
    if w_is_kn:
        return torch.einsum("bhtd,hdc->bhtc", x, w)
    return torch.einsum("bhtc,hdc->bhtd", x, w)


def few_query_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """Attention for a few query rows over a long cache, shapes as `sdpa_attention`. Two matmuls
    and a float32 softmax: on CPU, torch's SDPA takes ~6x longer for one query (2.4 vs 0.37 ms
    per layer at 2000 cached tokens, tiny's shapes), so the engine uses this there."""
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
