"""SigLIP-SO400M vision tower and the 2x2 adaptor (paper section 2.1, "Vision Encoder" and
"Vision-Language Adaptor").

The tower is a plain pre-norm ViT: 14x14 patches of a 384x384 tile, a learned absolute position
table, no class token, a final LayerNorm; the checkpoint's attention-pooling head
(`vision.attn_pool.*`) is not used by DeepSeek-VL2 and is not built. Module and parameter names
mirror the checkpoint's tensor names so loading is a direct name match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProjectorConfig, VisionConfig

LAYER_NORM_EPS = 1e-6  # timm's ViT default, used by the reference siglip_vit.py


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixels)  # (N, W, 27, 27)
        # (N, 729, W), copied row-major once here: the residual stream keeps the layout of its first
        # term, and a transposed one made every LayerNorm (and GEMM) copy its input again
        return x.flatten(2).transpose(1, 2).contiguous()


def merged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention (every patch sees every patch) with the heads merged back:
    q, k, v (N, heads, T, head_dim) -> (N, T, heads * head_dim)."""
    n, h, t, hd = q.shape
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, h * hd)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.attend = merged_attention  # (q, k, v) -> (N, T, W); the engine may swap it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, w = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, T, head_dim): views of qkv
        return self.proj(self.attend(q, k, v))  # (N, T, W)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SigLIP uses the tanh approximation of GELU (the adaptor below uses the exact one).
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    """Tiles (N, 3, 384, 384), normalised to [-1, 1] -> features (N, 729, width)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.grid * cfg.grid, cfg.width))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels) + self.pos_embed  # (N, 729, W)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Projector(nn.Module):
    """2x2 space-to-channel then Linear -> GELU -> Linear: (N, 729, W) -> (N, 196, D).

    `layers.0` and `layers.2` are the checkpoint names (index 1 is the parameter-free GELU).
    """

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.ratio = cfg.downsample_ratio
        self.layers = nn.ModuleDict({
            "0": nn.Linear(cfg.input_dim * cfg.downsample_ratio**2, cfg.n_embed),
            "2": nn.Linear(cfg.n_embed, cfg.n_embed),
        })

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = space_to_channel(feats, self.ratio)  # (N, 196, 4W)
        return self.layers["2"](F.gelu(self.layers["0"](x)))


def space_to_channel(feats: torch.Tensor, ratio: int) -> torch.Tensor:
    """(N, side*side, C) -> (N, ceil(side/r)^2, C*r*r), zero-padding the grid to a multiple of r.

    Channel order is that of F.unfold: channel-major, then the r x r offsets row by row
    (c0@(0,0), c0@(0,1), c0@(1,0), c0@(1,1), c1@(0,0), ...). Written with reshapes instead of
    unfold, which on CPU is slower and has no bf16 kernel on some builds.
    """
    n, hw, c = feats.shape
    side = int(round(hw**0.5))
    pad = (-side) % ratio
    x = feats.view(n, side, side, c)
    if pad:
        x = F.pad(x, (0, 0, 0, pad, 0, pad))  # pad width then height, at the end: 27 -> 28
    s = (side + pad) // ratio
    x = x.view(n, s, ratio, s, ratio, c)  # (N, row, dy, col, dx, C)
    x = x.permute(0, 1, 3, 5, 2, 4)  # (N, row, col, C, dy, dx)
    return x.reshape(n, s * s, c * ratio * ratio)
