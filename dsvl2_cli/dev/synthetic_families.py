"""The synthetic checkpoints' families (synthetic.py): the dimensions of each, small fixture
families for tests and the real shapes for benchmarks, and the config.json each is written with,
laid out as the Hugging Face releases lay theirs out (the keys the real files omit, omitted)."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, replace

import torch

from .synthetic_tokenizer import dump_json

FAMILIES = ("tiny-like", "small-like", "vl2-like")
REAL_FAMILIES = ("tiny", "small", "vl2")
ALL_FAMILIES = FAMILIES + REAL_FAMILIES

# The 23 (w, h) tile-grid sizes of the real processor_config.json / config.json, in file order.
CANDIDATE_RESOLUTIONS = (
    (384, 384), (384, 768), (768, 384), (384, 1152), (1152, 384), (384, 1536), (1536, 384),
    (768, 768), (384, 1920), (1920, 384), (384, 2304), (2304, 384), (768, 1152), (1152, 768),
    (384, 2688), (2688, 384), (384, 3072), (3072, 384), (768, 1536), (1536, 768),
    (384, 3456), (3456, 384), (1152, 1152),
)


# --------------------------------------------------------------------------------------------
# Family specifications
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LMSpec:
    hidden: int
    intermediate: int
    moe_intermediate: int
    layers: int
    heads: int
    use_mla: bool
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head: int
    n_routed: int
    n_shared: int
    top_k: int
    first_k_dense: int
    scoring_func: str  # "softmax" | "sigmoid"
    topk_method: str  # "greedy" | "noaux_tc"
    norm_topk_prob: bool
    routed_scaling_factor: float
    vocab_size: int

    @property
    def head_dim(self) -> int:  # plain MHA only
        return self.hidden // self.heads

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_k_dense


@dataclass(frozen=True)
class VisionSpec:
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    patch: int = 14
    image_size: int = 384

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2


@dataclass(frozen=True)
class FamilySpec:
    name: str
    real: bool
    lm: LMSpec
    vision: VisionSpec
    tokenizer_layout: str  # key of _TOKENIZER_LAYOUTS


_FIXTURE_LM = LMSpec(
    hidden=64, intermediate=128, moe_intermediate=32, layers=3, heads=4, use_mla=True,
    kv_lora_rank=32, qk_nope=16, qk_rope=8, v_head=16, n_routed=8, n_shared=2, top_k=3,
    first_k_dense=1, scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
    routed_scaling_factor=1.0, vocab_size=1024,
)
_FIXTURE_VISION = VisionSpec(width=64, layers=2, heads=4, mlp_ratio=2.0)
_SIGLIP_SO400M = VisionSpec(width=1152, layers=27, heads=16, mlp_ratio=3.7362)

_SPECS = {
    "tiny-like": FamilySpec(
        "tiny-like", False,
        replace(_FIXTURE_LM, use_mla=False, kv_lora_rank=0, qk_nope=0, qk_rope=0, v_head=0,
                top_k=2),
        _FIXTURE_VISION, "fixture"),
    "small-like": FamilySpec(
        "small-like", False, replace(_FIXTURE_LM, vocab_size=1100), _FIXTURE_VISION,
        "fixture-small"),
    "vl2-like": FamilySpec(
        "vl2-like", False,
        replace(_FIXTURE_LM, scoring_func="sigmoid", topk_method="noaux_tc",
                norm_topk_prob=True, routed_scaling_factor=2.0),
        replace(_FIXTURE_VISION, mlp_ratio=3.7362), "fixture"),
    "tiny": FamilySpec(
        "tiny", True,
        LMSpec(hidden=1280, intermediate=6848, moe_intermediate=896, layers=12, heads=10,
               use_mla=False, kv_lora_rank=0, qk_nope=0, qk_rope=0, v_head=0, n_routed=64,
               n_shared=2, top_k=6, first_k_dense=1, scoring_func="softmax",
               topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
               vocab_size=129280),
        _SIGLIP_SO400M, "real-129k"),
    "small": FamilySpec(
        "small", True,
        LMSpec(hidden=2048, intermediate=10944, moe_intermediate=1408, layers=27, heads=16,
               use_mla=True, kv_lora_rank=512, qk_nope=128, qk_rope=64, v_head=128,
               n_routed=64, n_shared=2, top_k=6, first_k_dense=1, scoring_func="softmax",
               topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
               vocab_size=102400),
        _SIGLIP_SO400M, "real-100k"),
    "vl2": FamilySpec(
        "vl2", True,
        LMSpec(hidden=2560, intermediate=12288, moe_intermediate=1536, layers=30, heads=32,
               use_mla=True, kv_lora_rank=512, qk_nope=128, qk_rope=64, v_head=128,
               n_routed=72, n_shared=2, top_k=6, first_k_dense=1, scoring_func="sigmoid",
               topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.0,
               vocab_size=129280),
        _SIGLIP_SO400M, "real-129k"),
}


def family_spec(family: str, layers: int | None = None) -> FamilySpec:
    """The dimensions of a family (with the LM layer count overridden when ``layers`` is given)."""
    try:
        spec = _SPECS[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(ALL_FAMILIES)}") from None
    if layers is not None:
        if layers < 1:
            raise ValueError("layers must be >= 1")
        spec = replace(spec, lm=replace(spec.lm, layers=int(layers)))
    return spec


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def config_json(spec: FamilySpec, dtype: torch.dtype) -> dict:
    """The config.json of ``spec``, with the keys (and the omissions) of its real release."""
    lm, v = spec.lm, spec.vision
    dname = DTYPE_NAMES[dtype]
    lc: dict = {
        "architectures": ["DeepseekV2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekV2Config",
            "AutoModel": "modeling_deepseek.DeepseekV2Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
        },
        "first_k_dense_replace": lm.first_k_dense,
        "hidden_size": lm.hidden,
        "intermediate_size": lm.intermediate,
        "lm_head": True,
        "max_position_embeddings": 4096,
        "model_type": "deepseek_v2",
        "moe_intermediate_size": lm.moe_intermediate,
        "n_group": 1,
        "n_routed_experts": lm.n_routed,
        "n_shared_experts": lm.n_shared,
        "num_experts_per_tok": lm.top_k,
        "q_lora_rank": None,
        "rm_head": False,
        "topk_group": 1,
        "topk_method": lm.topk_method,
        "torch_dtype": dname,
        "vocab_size": lm.vocab_size,
    }
    name = spec.name
    if name != "small-like" and name != "small":
        lc["bos_token_id"] = 0
        lc["eos_token_id"] = 1
    if lm.scoring_func != "softmax":
        lc["scoring_func"] = lm.scoring_func
    if lm.norm_topk_prob:
        lc["norm_topk_prob"] = True
    if lm.routed_scaling_factor != 1.0:
        lc["routed_scaling_factor"] = lm.routed_scaling_factor

    if name == "vl2":
        # The real 27B file omits layers/heads/MLA sizes (defaults: 30, 32, 512/128/64/128).
        lc["lm_head"] = False
        if lm.layers != 30:
            lc["num_hidden_layers"] = lm.layers
    else:
        lc["num_hidden_layers"] = lm.layers
        lc["num_attention_heads"] = lm.heads
        lc["num_key_value_heads"] = lm.heads
        if not lm.use_mla:
            lc.update(kv_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0,
                      use_mla=False)
        elif not spec.real:
            # Fixture MLA sizes differ from the defaults, so they must be spelled out
            # (as in the parity sample); small-like still has no use_mla key.
            lc.update(kv_lora_rank=lm.kv_lora_rank, qk_nope_head_dim=lm.qk_nope,
                      qk_rope_head_dim=lm.qk_rope, v_head_dim=lm.v_head)
        if name == "vl2-like":
            lc["lm_head"] = False

    vision: dict = {
        "layers": v.layers,
        "mlp_ratio": v.mlp_ratio,
        "model_name": "siglip_so400m_patch14_384",
        "model_type": "vision",
        "patch_size": v.patch,
        "width": v.width,
    }
    projector: dict = {"model_type": "mlp_projector", "n_embed": lm.hidden}
    if not spec.real:
        vision["heads"] = v.heads
        projector["input_dim"] = v.width
    return {
        "candidate_resolutions": [list(r) for r in CANDIDATE_RESOLUTIONS],
        "global_view_pos": "head",
        "language_config": lc,
        "model_type": "deepseek_vl_v2",
        "projector_config": projector,
        "tile_tag": "2D",
        "torch_dtype": dname,
        "transformers_version": "4.38.2",
        "vision_config": vision,
    }


def write_config(out_dir, family: str, *, layers: int | None = None,
                 dtype: torch.dtype = torch.float32) -> pathlib.Path:
    """Write only config.json (formatted as Hugging Face writes it) and return its path."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    dump_json(path, config_json(family_spec(family, layers), dtype), ascii_=True, sort_keys=True,
              newline=True)
    return path

