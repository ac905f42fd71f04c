"""The DeepSeek-V2 decoder used as DeepSeek-VL2's language model (DeepSeekMoE 3B / 16B / 27B).

Pre-norm blocks: x + attn(RMSNorm(x)), then x + ffn(RMSNorm(x)); layer 0 has a dense MLP, the
others MoE. Module names mirror the checkpoint (`language.model.layers.N...`, `language.lm_head`).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import LatentAttention, MultiHeadAttention, RMSNorm, attention_mask, rope_table
from .config import LanguageConfig
from .moe import MLP, MoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LatentAttention(cfg) if cfg.use_mla else MultiHeadAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask, cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        # The weight always comes from a checkpoint: an empty one skips nn.Embedding's normal_ init,
        # which on the meta device goes through torch._refs and imports torch._dynamo (1-6 s of a load).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    """Embeddings in, logits out, with an optional ModelCache for incremental decoding."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        rope_dim = cfg.qk_rope_head_dim if cfg.use_mla else cfg.head_dim
        # Angles, not cos/sin, so the table can be rebuilt on any device after meta init. Built on
        # meta (the engine's load) it is an empty placeholder the engine fills: computing it there
        # runs Python meta kernels that import torch._dynamo (seconds of a load).
        shape = (cfg.max_position_embeddings, rope_dim)
        angles = torch.empty(shape) if torch.empty(0).is_meta else rope_table(rope_dim, *shape[:1], cfg.rope_theta)
        self.register_buffer("rope_angles", angles, persistent=False)

    def forward(
        self,
        embeds: torch.Tensor,
        cache=None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """embeds (B, T, D) -> logits (B, T, V) float32 (or (B, 1, V) with last_only).

        With a cache (engine/cache.py's ModelCache: `length`, `pad`, one cache per layer in
        `layers`), the T new positions follow the cache's current length.
        """
        b, t, _ = embeds.shape
        start = cache.length if cache is not None else 0
        pad = cache.pad if cache is not None else None
        positions = torch.arange(start, start + t, device=embeds.device).expand(b, t)
        if pad is not None:
            positions = (positions - pad.view(-1, 1)).clamp_min(0)
        angles = self.rope_angles[positions].unsqueeze(1)  # (B, 1, T, rope_dim)
        cos, sin = angles.cos().to(embeds.dtype), angles.sin().to(embeds.dtype)
        mask = attention_mask(t, start, pad, embeds.device)

        x = embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache.layers[i] if cache is not None else None)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)).float()
