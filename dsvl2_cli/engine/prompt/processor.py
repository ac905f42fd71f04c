"""Processor: conversation + images -> prompt token ids, image-token mask and tile pixels.

Implements DeepSeek-VL2's dynamic tiling (paper section 2, "dynamic tiling strategy") and the
"deepseek" prompt template, matching the official DeepseekVLV2Processor token for token:

    <bos>[system\\n\\n]<|User|>: {user}\\n\\n<|Assistant|>:{answer}<eos><|User|>: ...<|Assistant|>:

Each `<image>` in a user turn becomes `image_token_count(tiles_w, tiles_h)` copies of the image
token id; the model replaces their embeddings with the image's global view, a view separator
and the local tiles (14 tokens per tile side, plus one newline per row).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps

from ...errors import ConfigError, PromptError
from .messages import MAX_TILED_IMAGES, Message, user_message  # noqa: F401  (re-exported: their old home)
from .tokenizer import ASSISTANT_TOKEN, IMAGE_TOKEN, USER_TOKEN, Tokenizer


@dataclass(frozen=True)
class ProcessorSettings:
    candidate_resolutions: tuple[tuple[int, int], ...]  # (width, height), processor_config order
    image_size: int = 384
    patch_size: int = 14
    downsample_ratio: int = 2
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if not self.candidate_resolutions:
            raise ConfigError("candidate_resolutions is empty; the processor needs at least one tiling")
        for w, h in self.candidate_resolutions:
            if w <= 0 or h <= 0 or w % self.image_size or h % self.image_size:
                raise ConfigError(f"candidate resolution {w}x{h} is not a positive multiple of "
                                  f"the tile size {self.image_size}")

    @property
    def tokens_per_tile_side(self) -> int:
        # 384 // 14 = 27 patches per side; 2x2 pooling after padding to 28 -> 14.
        return math.ceil((self.image_size // self.patch_size) / self.downsample_ratio)

    @property
    def pad_color(self) -> tuple[int, ...]:
        return tuple(int(m * 255) for m in self.image_mean)  # (127, 127, 127), as the reference

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ProcessorSettings":
        """Read processor_config.json; without it, config.json's candidate_resolutions."""
        model_dir = Path(model_dir)
        proc = _read_optional_json(model_dir / "processor_config.json")
        source = model_dir / "processor_config.json"
        if not proc or "candidate_resolutions" not in proc:
            cfg = _read_optional_json(model_dir / "config.json") or {}
            if "candidate_resolutions" not in cfg:
                raise ConfigError(f"{model_dir}: neither processor_config.json nor config.json gives "
                                  "candidate_resolutions; is this a DeepSeek-VL2 model folder?")
            proc = {**(proc or {}), "candidate_resolutions": cfg["candidate_resolutions"]}
            source = model_dir / "config.json"
        try:
            cands = tuple((int(w), int(h)) for w, h in proc["candidate_resolutions"])
            # The reference takes the tile size from the first candidate (384x384).
            kwargs = {"image_size": int(proc.get("image_size", cands[0][0]))}
            for key in ("patch_size", "downsample_ratio"):
                if key in proc:
                    kwargs[key] = int(proc[key])
            for key in ("image_mean", "image_std"):
                if key in proc:
                    kwargs[key] = tuple(float(v) for v in proc[key])
                    if len(kwargs[key]) != 3:
                        raise ValueError(f"{key} needs 3 values")
        except (TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"{source}: bad processor settings ({exc})") from exc
        return cls(candidate_resolutions=cands, **kwargs)


def _read_optional_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read JSON ({exc}); re-download the model files") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def select_tiling(width: int, height: int, candidates: Sequence[tuple[int, int]],
                  max_tiles: int | None = None, tile: int = 384) -> tuple[int, int]:
    """The candidate (w, h) that keeps the most of the image's resolution, then wastes least;
    with `max_tiles`, among the candidates of at most that many `tile`-sized tiles (a context
    budget trades detail for room; one tile always remains)."""
    if max_tiles is not None:
        allowed = [(w, h) for w, h in candidates if (w // tile) * (h // tile) <= max_tiles]
        candidates = allowed or [(tile, tile)]
    best, best_eff, best_waste = None, -1, math.inf
    for w, h in candidates:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - effective
        if effective > best_eff or (effective == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), effective, waste
    assert best is not None, "no candidate resolutions"
    return best


def image_token_count(tiles_w: int, tiles_h: int, side: int = 14) -> int:
    """Global view (side rows of side + 1 newline), 1 separator, local grid rows with newlines."""
    return side * (side + 1) + 1 + (tiles_h * side) * (tiles_w * side + 1)


@dataclass
class PreparedImage:
    size: tuple[int, int]        # original (W, H)
    grid: tuple[int, int]        # (tiles_w, tiles_h)
    num_tokens: int
    pixel_values: torch.Tensor   # (1 + tiles_w*tiles_h, 3, S, S) float32: global, then tiles row by row


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 tensor, without torchvision or numpy."""
    w, h = img.size
    raw = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return raw.view(h, w, 3).permute(2, 0, 1)


def tiling_grid(size: tuple[int, int], settings: ProcessorSettings, tiling: bool = True,
                max_tiles: int | None = None) -> tuple[int, int]:
    """(tiles_w, tiles_h) an image of `size` gets: (1, 1) untiled, else the chosen candidate."""
    S = settings.image_size
    if not tiling:
        return 1, 1
    w, h = select_tiling(*size, settings.candidate_resolutions, max_tiles, S)
    return w // S, h // S


def preprocess_image(img: Image.Image, settings: ProcessorSettings, tiling: bool,
                     max_tiles: int | None = None) -> PreparedImage:
    """Global view padded to S x S, local view padded to the chosen tiling and cut into S x S tiles."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    S = settings.image_size
    grid_w, grid_h = tiling_grid(img.size, settings, tiling, max_tiles)
    best_w, best_h = grid_w * S, grid_h * S
    tiles_w, tiles_h = best_w // S, best_h // S
    color = settings.pad_color
    global_view = _to_tensor(ImageOps.pad(img, (S, S), color=color))            # (3, S, S)
    local = _to_tensor(ImageOps.pad(img, (best_w, best_h), color=color))        # (3, th*S, tw*S)
    tiles = (local.view(3, tiles_h, S, tiles_w, S)
             .permute(1, 3, 0, 2, 4)                                            # (th, tw, 3, S, S)
             .reshape(tiles_h * tiles_w, 3, S, S))
    pixels = torch.cat([global_view.unsqueeze(0), tiles]).to(torch.float32).div_(255)
    mean = torch.tensor(settings.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(settings.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (pixels - mean) / std                                              # (1 + n, 3, S, S)
    side = settings.tokens_per_tile_side
    return PreparedImage(size=img.size, grid=(tiles_w, tiles_h),
                         num_tokens=image_token_count(tiles_w, tiles_h, side), pixel_values=pixels)


@dataclass
class Prepared:
    input_ids: torch.Tensor                  # (T,) int64
    image_mask: torch.Tensor                 # (T,) bool, True at <image> token positions
    images: list[PreparedImage] = field(default_factory=list)  # prompt order

    def pixel_values(self) -> torch.Tensor | None:
        """All tiles of all images, (N, 3, S, S), or None without images."""
        if not self.images:
            return None
        return torch.cat([im.pixel_values for im in self.images])

    @property
    def num_image_tokens(self) -> list[int]:
        return [im.num_tokens for im in self.images]

    @property
    def grids(self) -> list[tuple[int, int]]:
        """(tiles_w, tiles_h) per image: the reference's images_spatial_crop."""
        return [im.grid for im in self.images]


class Processor:
    """Builds model inputs from a conversation.

    System prompt: `system.strip() + "\\n\\n"` is encoded right after `<bos>`, before the first
    turn (the reference's text form; its token form encodes the text bare, without "\\n\\n").
    It comes from the `system=` argument or a leading system message; the argument wins.
    Past assistant answers are their stripped text + `<eos>`, directly after "<|Assistant|>:"
    (the reference's token form). Preparing [u1] gives a prefix of [u1, a1, u2] as long as both
    use the same tiling mode (tiling stops once the conversation holds 3+ images).
    """

    def __init__(self, tokenizer: Tokenizer, settings: ProcessorSettings):
        self.tokenizer = tokenizer
        self.settings = settings

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Processor":
        return cls(Tokenizer.from_dir(model_dir), ProcessorSettings.from_model_dir(model_dir))

    def prepare(self, messages: Sequence[Message], *, system: str | None = None,
                max_tiles: int | Sequence[int | None] | None = None) -> Prepared:
        """`max_tiles`: the most local tiles per image (one number for all, or one per image in
        prompt order; None = the reference's full choice), for prompts planned to a budget."""
        turns, system_text = _check_conversation(messages, system)
        n_images = sum(len(m.images) for m in turns)
        caps = list(max_tiles) if isinstance(max_tiles, Sequence) else [max_tiles] * n_images
        if len(caps) != n_images:
            raise PromptError(f"max_tiles gives {len(caps)} limit(s) for {n_images} image(s)")
        tiling = sum(len(m.images) for m in turns) <= MAX_TILED_IMAGES
        tok = self.tokenizer
        ids: list[int] = [tok.bos_id]
        mask: list[bool] = [False]
        images: list[PreparedImage] = []

        def add_text(text: str) -> None:
            if text:
                piece = tok.encode(text)
                ids.extend(piece)
                mask.extend([False] * len(piece))

        if system_text:
            add_text(system_text + "\n\n")
        last = len(turns) - 1
        for i, msg in enumerate(turns):
            content = msg.content.strip()
            if msg.kind == "assistant":
                if i == last and not content:
                    break  # the generation slot: the prompt already ends with "<|Assistant|>:"
                add_text(content)
                ids.append(tok.eos_id)
                mask.append(False)
                continue
            text = f"{USER_TOKEN}: {content}\n\n{ASSISTANT_TOKEN}:"
            pieces = text.split(IMAGE_TOKEN)
            for j, piece in enumerate(pieces):
                add_text(piece)
                if j < len(pieces) - 1:
                    prepared = preprocess_image(msg.images[j], self.settings, tiling, caps[len(images)])
                    images.append(prepared)
                    ids.extend([tok.image_id] * prepared.num_tokens)
                    mask.extend([True] * prepared.num_tokens)
        return Prepared(input_ids=torch.tensor(ids, dtype=torch.int64),
                        image_mask=torch.tensor(mask, dtype=torch.bool), images=images)


def _check_conversation(messages: Sequence[Message], system: str | None) -> tuple[list[Message], str]:
    """Validate roles, placeholders and emptiness; return the turns and the system text."""
    msgs = list(messages)
    system_text = ""
    if msgs and msgs[0].kind == "system":
        system_text = msgs[0].content.strip()
        if msgs[0].images:
            raise PromptError("the system message cannot carry images")
        msgs = msgs[1:]
    if system is not None and system.strip():
        system_text = system.strip()
    prev = None
    for i, m in enumerate(msgs, start=1):
        where = f"message {i} ({m.kind})"
        if m.kind == "system":
            raise PromptError(f"{where}: a system message may only come first")
        n = m.content.count(IMAGE_TOKEN)
        if m.kind == "assistant" and (n or m.images):
            raise PromptError(f"{where}: assistant messages cannot hold images or <image>")
        if n != len(m.images):
            raise PromptError(f"{where}: {n} <image> placeholder(s) but {len(m.images)} image(s) "
                              "attached; use one <image> per image")
        if m.kind == "user":
            if not m.content.strip() and not m.images:
                raise PromptError(f"{where}: empty prompt; give some text or an image")
            if prev == "user":
                raise PromptError(f"{where}: two user messages in a row; merge them or put the "
                                  "assistant's answer between them")
        prev = m.kind
    if not any(m.kind == "user" for m in msgs):
        raise PromptError("empty prompt: the conversation has no user message")
    return msgs, system_text
