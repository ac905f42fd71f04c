"""The synthetic checkpoints' weights (synthetic.py): every tensor of a family in module order with
its shape and initialisation, each drawn from its own generator seeded by (seed, name) so that
values do not depend on the sharding, written one safetensors shard at a time (at most one
shard's tensors in memory) with Hugging Face's shard names and index."""

from __future__ import annotations

import hashlib
import math
import os
import pathlib
from dataclasses import dataclass

import torch

from .synthetic_families import FamilySpec, family_spec
from .synthetic_tokenizer import dump_json

DEFAULT_MAX_SHARD_BYTES = 2_000_000_000


# --------------------------------------------------------------------------------------------
# Tensor plan
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _TensorDef:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal" | "norm" (1 + N) | "uniform"
    scale: float  # std for normal/norm, half-width for uniform

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensor_plan(spec: FamilySpec) -> list[_TensorDef]:
    """Every tensor of the checkpoint, in module order, with its shape and initialisation."""
    plan: list[_TensorDef] = []

    def linear(name: str, out_f: int, in_f: int, bias: bool = False, gain: float = 1.0) -> None:
        plan.append(_TensorDef(f"{name}.weight", (out_f, in_f), "normal", gain / math.sqrt(in_f)))
        if bias:
            plan.append(_TensorDef(f"{name}.bias", (out_f,), "normal", 0.02))

    def layernorm(name: str, dim: int) -> None:
        plan.append(_TensorDef(f"{name}.weight", (dim,), "norm", 0.1))
        plan.append(_TensorDef(f"{name}.bias", (dim,), "normal", 0.02))

    def rmsnorm(name: str, dim: int) -> None:
        plan.append(_TensorDef(f"{name}.weight", (dim,), "norm", 0.1))

    v, lm = spec.vision, spec.lm
    W, D, hid = v.width, lm.hidden, v.mlp_hidden

    # Vision tower (SigLIP ViT).
    plan.append(_TensorDef("vision.pos_embed", (1, v.num_patches, W), "normal", 0.5))
    fan = 3 * v.patch * v.patch
    plan.append(_TensorDef("vision.patch_embed.proj.weight", (W, 3, v.patch, v.patch), "normal",
                           1.0 / math.sqrt(fan)))
    plan.append(_TensorDef("vision.patch_embed.proj.bias", (W,), "normal", 0.02))
    for i in range(v.layers):
        b = f"vision.blocks.{i}"
        layernorm(f"{b}.norm1", W)
        linear(f"{b}.attn.qkv", 3 * W, W, bias=True)
        linear(f"{b}.attn.proj", W, W, bias=True)
        layernorm(f"{b}.norm2", W)
        linear(f"{b}.mlp.fc1", hid, W, bias=True)
        linear(f"{b}.mlp.fc2", W, hid, bias=True)
    layernorm("vision.norm", W)
    # Attention-pooling head: present in the real files, unused by the model.
    plan.append(_TensorDef("vision.attn_pool.latent", (1, 1, W), "normal", 0.02))
    linear("vision.attn_pool.q", W, W, bias=True)
    linear("vision.attn_pool.kv", 2 * W, W, bias=True)
    linear("vision.attn_pool.proj", W, W, bias=True)
    layernorm("vision.attn_pool.norm", W)
    linear("vision.attn_pool.mlp.fc1", hid, W, bias=True)
    linear("vision.attn_pool.mlp.fc2", W, hid, bias=True)

    # Projector (downsample_mlp_gelu, depth 2) and the two learned separators.
    linear("projector.layers.0", D, 4 * W, bias=True)
    linear("projector.layers.2", D, D, bias=True)
    plan.append(_TensorDef("image_newline", (D,), "normal", 1.0))
    plan.append(_TensorDef("view_seperator", (D,), "normal", 1.0))

    # Language model.
    V = lm.vocab_size
    plan.append(_TensorDef("language.model.embed_tokens.weight", (V, D), "normal", 1.0))
    for L in range(lm.layers):
        p = f"language.model.layers.{L}"
        if lm.use_mla:
            H = lm.heads
            linear(f"{p}.self_attn.q_proj", H * (lm.qk_nope + lm.qk_rope), D)
            linear(f"{p}.self_attn.kv_a_proj_with_mqa", lm.kv_lora_rank + lm.qk_rope, D)
            rmsnorm(f"{p}.self_attn.kv_a_layernorm", lm.kv_lora_rank)
            linear(f"{p}.self_attn.kv_b_proj", H * (lm.qk_nope + lm.v_head), lm.kv_lora_rank)
            linear(f"{p}.self_attn.o_proj", D, H * lm.v_head)
        else:
            hd = lm.heads * lm.head_dim
            for proj in ("q_proj", "k_proj", "v_proj"):
                linear(f"{p}.self_attn.{proj}", hd, D)
            linear(f"{p}.self_attn.o_proj", D, hd)
        if lm.is_moe(L):
            E, M, S = lm.n_routed, lm.moe_intermediate, lm.n_shared
            # Router: scaled up so that expert choice is decisive.
            plan.append(_TensorDef(f"{p}.mlp.gate.weight", (E, D), "normal", 2.5 / math.sqrt(D)))
            if lm.topk_method == "noaux_tc":
                plan.append(_TensorDef(f"{p}.mlp.gate.e_score_correction_bias", (E,), "uniform", 0.1))
            linear(f"{p}.mlp.shared_experts.gate_proj", S * M, D)
            linear(f"{p}.mlp.shared_experts.up_proj", S * M, D)
            linear(f"{p}.mlp.shared_experts.down_proj", D, S * M)
            for e in range(E):
                linear(f"{p}.mlp.experts.{e}.gate_proj", M, D)
                linear(f"{p}.mlp.experts.{e}.up_proj", M, D)
                linear(f"{p}.mlp.experts.{e}.down_proj", D, M)
        else:
            linear(f"{p}.mlp.gate_proj", lm.intermediate, D)
            linear(f"{p}.mlp.up_proj", lm.intermediate, D)
            linear(f"{p}.mlp.down_proj", D, lm.intermediate)
        rmsnorm(f"{p}.input_layernorm", D)
        rmsnorm(f"{p}.post_attention_layernorm", D)
    rmsnorm("language.model.norm", D)
    linear("language.lm_head", V, D)
    return plan


def expected_tensors(family: str, layers: int | None = None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor ``write_checkpoint(family, layers=layers)`` writes."""
    return {t.name: t.shape for t in tensor_plan(family_spec(family, layers))}


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _materialise(t: _TensorDef, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_tensor_seed(seed, t.name))
    x = torch.empty(t.shape, dtype=dtype)
    if t.init == "normal":
        x.normal_(0.0, t.scale, generator=g)
    elif t.init == "norm":
        x.normal_(1.0, t.scale, generator=g)
    elif t.init == "uniform":
        x.uniform_(-t.scale, t.scale, generator=g)
    else:  # pragma: no cover - plan is internal
        raise AssertionError(t.init)
    return x


# --------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------

def _split_even(sizes: list[int], n: int) -> list[int]:
    """Shard index per tensor: contiguous, about equal bytes, every shard non-empty."""
    total = sum(sizes) or 1
    out, cum = [], 0
    for s in sizes:
        out.append(min(n - 1, int((cum + s / 2) * n / total)))
        cum += s
    if len(set(out)) != n:  # a huge tensor swallowed a shard: fall back to even tensor counts
        out = [i * n // len(sizes) for i in range(len(sizes))]
    return out


def _split_max_bytes(sizes: list[int], max_bytes: int) -> list[int]:
    out, cur, idx = [], 0, 0
    for s in sizes:
        if cur and cur + s > max_bytes:
            idx, cur = idx + 1, 0
        out.append(idx)
        cur += s
    return out


def _shard_name(k: int, n: int) -> str:
    # Hugging Face's naming for these checkpoints: 5-digit index, 6-digit total.
    return f"model-{k:05d}-of-{n:06d}.safetensors"


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def write_weights(out: pathlib.Path, spec: FamilySpec, dtype: torch.dtype, *, shards: int | None = None,
                  seed: int = 0, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """The weight files of ``spec`` in ``out`` (stale ones removed first); ``shards`` as in
    synthetic.write_checkpoint."""
    from safetensors.torch import save_file

    plan = tensor_plan(spec)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [t.numel * itemsize for t in plan]
    if shards is None:
        assign = _split_max_bytes(sizes, max_shard_bytes) if spec.real else [0] * len(plan)
    else:
        if not 1 <= shards <= len(plan):
            raise ValueError(f"shards must be between 1 and {len(plan)}")
        assign = _split_even(sizes, shards)
    n = max(assign) + 1
    single_file = n == 1 and not spec.real

    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()

    weight_map: dict[str, str] = {}
    for k in range(n):
        fname = "model.safetensors" if single_file else _shard_name(k + 1, n)
        names = [t for t, a in zip(plan, assign) if a == k]
        tensors = {t.name: _materialise(t, dtype, seed) for t in names}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(out / fname, 0o666 & ~umask)  # safetensors writes 0600; follow the umask like the other files
        del tensors
        for t in names:
            weight_map[t.name] = fname

    if not single_file:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        dump_json(out / "model.safetensors.index.json", index, ascii_=True, sort_keys=False, newline=False)
