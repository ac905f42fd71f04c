"""DeepSeek-VL2: vision tower + adaptor + DeepSeekMoE language model (paper section 2).

Image embeddings are laid out per image as in the paper's figure 3 with tile_tag "2D" and the
global view first:
    global view: 14 rows x (14 + 1 image_newline)            = 210
    view_seperator                                             = 1
    local tiles: (n_h*14) rows x (n_w*14 + 1 image_newline)   = (n_h*14)(n_w*14 + 1)
and replace, in order, the `<image>` token positions of the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import ModelConfig
from .language import LanguageModel
from .vision import Projector, VisionTower


class DeepseekVL2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.projector = Projector(cfg.projector)
        d = cfg.language.hidden_size
        self.image_newline = nn.Parameter(torch.empty(d))
        self.view_seperator = nn.Parameter(torch.empty(d))  # sic: the checkpoint's spelling
        self.language = LanguageModel(cfg.language)

    @property
    def dtype(self) -> torch.dtype:
        return self.language.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language.lm_head.weight.device

    def encode_tiles(self, pixels: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """Normalised tiles (N, 3, S, S) -> adaptor outputs (N, 196, D), `batch` tiles at a time."""
        pixels = pixels.to(self.device, self.dtype)
        step = batch or pixels.shape[0]
        out = [self.projector(self.vision(pixels[i:i + step])) for i in range(0, pixels.shape[0], step)]
        return torch.cat(out) if len(out) > 1 else out[0]

    def layout_image(self, tiles: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """One image's tile embeddings (1 + n_w*n_h, 196, D) -> its token rows (num_tokens, D)."""
        n_w, n_h = grid
        _, hw, d = tiles.shape
        side = int(round(hw**0.5))  # 14
        newline = self.image_newline.to(tiles.dtype)

        glob = tiles[0].view(side, side, d)
        glob = torch.cat([glob, newline.expand(side, 1, d)], dim=1).reshape(-1, d)  # (14*15, D)

        local = tiles[1:].view(n_h, n_w, side, side, d)  # tiles row by row
        local = local.permute(0, 2, 1, 3, 4).reshape(n_h * side, n_w * side, d)  # stitch the grid
        local = torch.cat([local, newline.expand(n_h * side, 1, d)], dim=1).reshape(-1, d)

        return torch.cat([glob, self.view_seperator.to(tiles.dtype)[None], local])

    def embed(
        self,
        input_ids: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        grids: Sequence[tuple[int, int]] = (),
        tile_batch: int | None = None,
        tiles: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> input embeddings (B, T, D), image tokens filled in prompt order.

        `pixel_values` holds every image's tiles (global view first, then its local tiles),
        images in order across the whole batch; `grids` their (tiles wide, tiles high).
        `tiles`: those tiles already encoded (encode_tiles), instead of pixel_values.
        """
        ids = input_ids.to(self.device)
        embeds = self.language.model.embed_tokens(ids)  # (B, T, D)
        if not grids:
            return embeds
        if tiles is None:
            tiles = self.encode_tiles(pixel_values, tile_batch)
        rows, start = [], 0
        for n_w, n_h in grids:
            count = 1 + n_w * n_h
            rows.append(self.layout_image(tiles[start:start + count], (n_w, n_h)))
            start += count
        image_rows = torch.cat(rows)  # (total image tokens, D)
        mask = image_mask.to(self.device)
        if int(mask.sum()) != image_rows.shape[0]:
            raise ValueError(
                f"prompt has {int(mask.sum())} image positions but the images give {image_rows.shape[0]} tokens"
            )
        embeds = embeds.clone()
        embeds[mask] = image_rows
        return embeds
