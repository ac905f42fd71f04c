"""Model configuration: config.json of a DeepSeek-VL2 checkpoint as frozen dataclasses.

The real files leave many keys out (the 27B config.json has no layer count, head count or MLA
sizes), so absent keys take the defaults of the reference code (DeepseekV2Config,
VisionEncoderConfig, MlpProjectorConfig in github.com/deepseek-ai/DeepSeek-VL2), gathered in
the `*_DEFAULTS` tables below and nowhere else. Values this runtime cannot run are refused here
with a ConfigError, so nothing fails later in the middle of a forward pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# Reference defaults for keys absent from config.json (ARCHITECTURE-NOTES section 5).
LANGUAGE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 102400,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "moe_intermediate_size": 1407,
    "num_hidden_layers": 30,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "n_shared_experts": None,
    "n_routed_experts": None,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    # The reference default is the typo 'gready', which its gate does not implement; every
    # published config sets the method, so an absent key is read as plain greedy.
    "topk_method": "greedy",
    "n_group": None,
    "topk_group": None,
    "num_experts_per_tok": None,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 0,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "use_mla": True,
}

VISION_DEFAULTS: dict[str, Any] = {
    "model_name": "siglip_large_patch16_384",
    "image_size": 384,
    "patch_size": 16,
    "width": 1024,
    "layers": 24,
    "heads": 16,
    "mlp_ratio": 4.0,
}

PROJECTOR_DEFAULTS: dict[str, Any] = {
    "projector_type": "downsample_mlp_gelu",
    "input_dim": 1152,
    "n_embed": 2048,
    "depth": 2,
    "mlp_ratio": 1,
    "downsample_ratio": 2,
}

TOP_DEFAULTS: dict[str, Any] = {
    "tile_tag": "tile_tag",
    "global_view_pos": "head",
    "candidate_resolutions": [[384, 384]],
}


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP ViT (siglip_vit.py in the reference): no class token, learned position table."""

    model_name: str
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float

    @property
    def grid(self) -> int:  # patches per side: 384 // 14 = 27
        return self.image_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:  # timm truncates: int(1152 * 3.7362) = 4304
        return int(self.width * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass(frozen=True)
class ProjectorConfig:
    """The 2x2 'downsample_mlp_gelu' adaptor between the vision tower and the language model."""

    projector_type: str
    input_dim: int
    n_embed: int
    depth: int
    mlp_ratio: int
    downsample_ratio: int


@dataclass(frozen=True)
class LanguageConfig:
    """DeepSeek-V2 / DeepSeekMoE decoder (configuration_deepseek.py in the reference)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    n_shared_experts: int | None
    n_routed_experts: int | None
    routed_scaling_factor: float
    kv_lora_rank: int | None
    q_lora_rank: int | None
    qk_rope_head_dim: int
    v_head_dim: int
    qk_nope_head_dim: int
    topk_method: str
    n_group: int | None
    topk_group: int | None
    num_experts_per_tok: int | None
    moe_layer_freq: int
    first_k_dense_replace: int
    norm_topk_prob: bool
    scoring_func: str
    hidden_act: str
    max_position_embeddings: int
    rms_norm_eps: float
    bos_token_id: int | None
    eos_token_id: int | None
    rope_theta: float
    rope_scaling: dict | None
    attention_bias: bool
    use_mla: bool

    @property
    def head_dim(self) -> int:
        """Per-head width of plain multi-head attention (tiny: 1280 / 10 = 128)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def q_head_dim(self) -> int:  # MLA query/key width: nope + rope = 192
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        # Same rule as the reference decoder layer: dense for the first k layers, then MoE
        # on every moe_layer_freq-th layer.
        return (
            self.n_routed_experts is not None
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    def cache_values_per_token(self) -> int:
        """Cached values per token and layer: latent + rope key for MLA, K and V otherwise."""
        if self.use_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_key_value_heads * self.head_dim

    def full_kv_values_per_token(self) -> int:
        """What an uncompressed MLA cache would hold: every head's key (nope+rope) and value."""
        if self.use_mla:
            return self.num_attention_heads * (self.q_head_dim + self.v_head_dim)
        return self.cache_values_per_token()


@dataclass(frozen=True)
class ModelConfig:
    """A whole DeepSeek-VL2 checkpoint's config.json."""

    vision: VisionConfig
    projector: ProjectorConfig
    language: LanguageConfig
    tile_tag: str
    global_view_pos: str
    candidate_resolutions: tuple[tuple[int, int], ...]

    @property
    def tokens_per_tile_side(self) -> int:  # ceil(27 / 2) = 14
        return math.ceil(self.vision.grid / self.projector.downsample_ratio)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object at the top level")
        model_type = raw.get("model_type")
        if model_type != "deepseek_vl_v2":
            raise ConfigError(
                f"{source}: model_type is {model_type!r}, not 'deepseek_vl_v2'; "
                "this folder is not a DeepSeek-VL2 checkpoint"
            )
        for key in ("language_config", "vision_config", "projector_config"):
            if not isinstance(raw.get(key), dict):
                raise ConfigError(f"{source}: the '{key}' section is missing or not an object")

        language = _build(LanguageConfig, LANGUAGE_DEFAULTS, raw["language_config"], source, "language_config")
        vision = _build(VisionConfig, VISION_DEFAULTS, raw["vision_config"], source, "vision_config")
        projector = _build(ProjectorConfig, PROJECTOR_DEFAULTS, raw["projector_config"], source, "projector_config")
        top = {k: raw.get(k, v) for k, v in TOP_DEFAULTS.items()}
        try:
            resolutions = tuple((int(w), int(h)) for w, h in top["candidate_resolutions"])
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: candidate_resolutions must be a list of [width, height] pairs") from None
        cfg = cls(
            vision=vision,
            projector=projector,
            language=language,
            tile_tag=top["tile_tag"],
            global_view_pos=top["global_view_pos"],
            candidate_resolutions=resolutions,
        )
        _validate(cfg, source)
        return cfg

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found; a DeepSeek-VL2 model folder needs its config.json")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err}); re-download the model") from None
        return cls.from_dict(raw, str(path))


def _build(kind, defaults: dict[str, Any], raw: dict[str, Any], source: str, section: str):
    values = {}
    for f in fields(kind):
        value = raw.get(f.name, defaults[f.name])
        # The published configs write several unused sizes as null (tiny's kv_lora_rank) or 0;
        # null for a key with a default other than None means "take the default".
        if value is None and defaults[f.name] is not None and f.name not in ("q_lora_rank", "kv_lora_rank"):
            value = defaults[f.name]
        values[f.name] = value
    try:
        return kind(**values)
    except TypeError as err:  # pragma: no cover - fields() and the defaults tables agree
        raise ConfigError(f"{source}: {section}: {err}") from None


def _validate(cfg: ModelConfig, source: str) -> None:
    """Refuse configurations this runtime cannot run, with the key and the reason."""
    lm, vis, proj = cfg.language, cfg.vision, cfg.projector

    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{source}: {msg}")

    def positive(section: str, obj: Any, *names: str) -> None:
        for name in names:
            value = getattr(obj, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(f"{section}.{name} must be a positive integer, got {value!r}")

    positive("language_config", lm, "vocab_size", "hidden_size", "intermediate_size",
             "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "max_position_embeddings", "moe_layer_freq")
    positive("vision_config", vis, "image_size", "patch_size", "width", "layers", "heads")
    positive("projector_config", proj, "input_dim", "n_embed", "downsample_ratio")

    if lm.hidden_act != "silu":
        raise bad(f"language_config.hidden_act {lm.hidden_act!r} is not supported (only 'silu')")
    if lm.rope_scaling is not None:
        raise bad("language_config.rope_scaling is set; no DeepSeek-VL2 checkpoint uses it and it is not supported")
    if lm.attention_bias:
        raise bad("language_config.attention_bias true is not supported")
    if lm.q_lora_rank is not None:
        raise bad("language_config.q_lora_rank must be null (no DeepSeek-VL2 checkpoint uses a query LoRA)")
    if lm.use_mla:
        if not lm.kv_lora_rank or lm.kv_lora_rank <= 0:
            raise bad("language_config.kv_lora_rank must be positive for MLA (use_mla true)")
        positive("language_config", lm, "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
        if lm.qk_rope_head_dim % 2:
            raise bad("language_config.qk_rope_head_dim must be even")
    else:
        if lm.hidden_size % lm.num_attention_heads or lm.head_dim % 2:
            raise bad("hidden_size must split into attention heads of even width")
        if lm.num_attention_heads % lm.num_key_value_heads:
            raise bad("num_attention_heads must be a multiple of num_key_value_heads")
    if lm.n_routed_experts is not None:
        positive("language_config", lm, "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")
        if lm.num_experts_per_tok > lm.n_routed_experts:
            raise bad("num_experts_per_tok is larger than n_routed_experts")
        if lm.scoring_func not in ("softmax", "sigmoid"):
            raise bad(f"language_config.scoring_func {lm.scoring_func!r} is not supported (softmax, sigmoid)")
        if lm.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise bad(f"language_config.topk_method {lm.topk_method!r} is not supported "
                      "(greedy, group_limited_greedy, noaux_tc)")
        if lm.topk_method != "greedy":
            groups, chosen = lm.n_group or 1, lm.topk_group or 1
            if lm.n_routed_experts % groups or not 0 < chosen <= groups:
                raise bad("n_group must divide n_routed_experts and topk_group must be in 1..n_group")
    if vis.width % vis.heads:
        raise bad("vision_config.width must be a multiple of vision_config.heads")
    if vis.image_size < vis.patch_size:
        raise bad("vision_config.image_size is smaller than patch_size")
    if proj.projector_type != "downsample_mlp_gelu":
        raise bad(f"projector_config.projector_type {proj.projector_type!r} is not supported")
    if proj.depth != 2 or proj.mlp_ratio != 1:
        raise bad("projector_config: only depth 2 with mlp_ratio 1 is supported (as in every DeepSeek-VL2 checkpoint)")
    if proj.input_dim != vis.width:
        raise bad(f"projector_config.input_dim {proj.input_dim} differs from vision width {vis.width}")
    if proj.n_embed != lm.hidden_size:
        raise bad(f"projector_config.n_embed {proj.n_embed} differs from language hidden_size {lm.hidden_size}")
    if cfg.tile_tag != "2D":
        raise bad(f"tile_tag {cfg.tile_tag!r} is not supported (only '2D')")
    if cfg.global_view_pos != "head":
        raise bad(f"global_view_pos {cfg.global_view_pos!r} is not supported (only 'head')")
    for w, h in cfg.candidate_resolutions:
        if w <= 0 or h <= 0 or w % vis.image_size or h % vis.image_size:
            raise bad(f"candidate resolution {w}x{h} is not a positive multiple of {vis.image_size}")
