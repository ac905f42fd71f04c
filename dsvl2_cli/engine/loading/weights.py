"""Loading a checkpoint's safetensors into the model, as small pure steps:

1. `weight_files`      which files hold the weights (sharded index or one file; never pickles)
2. `read_headers`      name -> (file, shape, dtype) from the safetensors headers, nothing loaded
3. `expected_tensors`  name -> shape that the config implies, with the real checkpoint names
4. `check_tensors`     strict: any missing, unexpected or mis-shaped tensor is an error naming it
5. `load_into`         fill a model built on the meta device, one tensor (or one layer's experts)
                       at a time, converting names on the way: gate/up fused, experts stacked,
                       kv_b_proj split for MLA. Peak memory is the model plus one layer's experts.
                       An `experts` hook may build each MoE layer's routed-experts module instead
                       (quantization: engine/quant). The model owns its memory: no tensor aliases the
                       memory-mapped files, which are let go of as loading proceeds. (On CPU,
                       engine/loading/mapped.py streams `build_params` into a converted layout once and
                       maps that instead: the weights are then the mapping's pages.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ...errors import WeightsError
from ...model.config import ModelConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
IGNORED_PREFIXES = ("vision.attn_pool.",)  # SigLIP's pooling head: in the files, unused by the model
FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise WeightsError(f"{index}: not a valid safetensors index ({err!s}); re-download the model") from None
        files = []
        for shard in shards:
            path = model_dir / shard
            if Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise WeightsError(f"{index}: names an unusable shard {shard!r}; only .safetensors files in the folder are read")
            if not path.is_file():
                raise WeightsError(f"{path}: shard listed in {INDEX_NAME} is missing; re-download the model")
            files.append(path)
        return files
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if len(found) == 1:
        return found
    pickles = [p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickles:
        raise WeightsError(
            f"{model_dir}: only pickle weights ({', '.join(pickles[:3])}) found; dsvl2 loads safetensors only "
            "and never unpickles files: use the model's safetensors release"
        )
    raise WeightsError(f"{model_dir}: no {SINGLE_NAME} or {INDEX_NAME} found; the model download is incomplete")


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if name in infos:
                        raise WeightsError(f"tensor {name} is in both {infos[name].file.name} and {path.name}")
                    sl = f.get_slice(name)
                    infos[name] = TensorInfo(path, tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"{path}: not a readable safetensors file ({err}); re-download it") from None
    return infos


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint for `cfg` must hold (except the ignored pooling head)."""
    vis, lm = cfg.vision, cfg.language
    w, d = vis.width, lm.hidden_size
    out: dict[str, tuple[int, ...]] = {
        "vision.pos_embed": (1, vis.grid * vis.grid, w),
        "vision.patch_embed.proj.weight": (w, 3, vis.patch_size, vis.patch_size),
        "vision.patch_embed.proj.bias": (w,),
        "vision.norm.weight": (w,),
        "vision.norm.bias": (w,),
        "projector.layers.0.weight": (d, w * cfg.projector.downsample_ratio**2),
        "projector.layers.0.bias": (d,),
        "projector.layers.2.weight": (d, d),
        "projector.layers.2.bias": (d,),
        "image_newline": (d,),
        "view_seperator": (d,),
        "language.model.embed_tokens.weight": (lm.vocab_size, d),
        "language.model.norm.weight": (d,),
        "language.lm_head.weight": (lm.vocab_size, d),
    }
    for i in range(vis.layers):
        p = f"vision.blocks.{i}."
        for norm in ("norm1", "norm2"):
            out[p + norm + ".weight"] = out[p + norm + ".bias"] = (w,)
        out[p + "attn.qkv.weight"], out[p + "attn.qkv.bias"] = (3 * w, w), (3 * w,)
        out[p + "attn.proj.weight"], out[p + "attn.proj.bias"] = (w, w), (w,)
        out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = (vis.mlp_hidden, w), (vis.mlp_hidden,)
        out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = (w, vis.mlp_hidden), (w,)
    for layer in range(lm.num_hidden_layers):
        p = f"language.model.layers.{layer}."
        out[p + "input_layernorm.weight"] = out[p + "post_attention_layernorm.weight"] = (d,)
        a = p + "self_attn."
        if lm.use_mla:
            h = lm.num_attention_heads
            out[a + "q_proj.weight"] = (h * lm.q_head_dim, d)
            out[a + "kv_a_proj_with_mqa.weight"] = (lm.kv_lora_rank + lm.qk_rope_head_dim, d)
            out[a + "kv_a_layernorm.weight"] = (lm.kv_lora_rank,)
            out[a + "kv_b_proj.weight"] = (h * (lm.qk_nope_head_dim + lm.v_head_dim), lm.kv_lora_rank)
            out[a + "o_proj.weight"] = (d, h * lm.v_head_dim)
        else:
            q, kv = lm.num_attention_heads * lm.head_dim, lm.num_key_value_heads * lm.head_dim
            out[a + "q_proj.weight"], out[a + "o_proj.weight"] = (q, d), (d, q)
            out[a + "k_proj.weight"] = out[a + "v_proj.weight"] = (kv, d)
        m = p + "mlp."
        if lm.is_moe_layer(layer):
            out[m + "gate.weight"] = (lm.n_routed_experts, d)
            if lm.topk_method == "noaux_tc":
                out[m + "gate.e_score_correction_bias"] = (lm.n_routed_experts,)
            for e in range(lm.n_routed_experts):
                _mlp_shapes(out, f"{m}experts.{e}.", d, lm.moe_intermediate_size)
            if lm.n_shared_experts:
                _mlp_shapes(out, m + "shared_experts.", d, lm.moe_intermediate_size * lm.n_shared_experts)
        else:
            _mlp_shapes(out, m, d, lm.intermediate_size)
    return out


def _mlp_shapes(out: dict, prefix: str, d: int, inner: int) -> None:
    out[prefix + "gate_proj.weight"] = out[prefix + "up_proj.weight"] = (inner, d)
    out[prefix + "down_proj.weight"] = (d, inner)


def check_tensors(found: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], where: str,
                  dtypes: dict[str, str] | None = None) -> None:
    """`dtypes`: the exact safetensors dtype of some tensors (packed quantized weights); every
    other tensor must be floating point."""
    dtypes = dtypes or {}
    present = {n: i for n, i in found.items() if not n.startswith(IGNORED_PREFIXES)}
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    misshaped = [n for n in expected if n in present and present[n].shape != expected[n]]
    wrong_type = [n for n in expected if n in present and
                  (present[n].dtype != dtypes[n] if n in dtypes else present[n].dtype not in FLOAT_DTYPES)]

    def names(items: list[str]) -> str:
        more = f" and {len(items) - 3} more" if len(items) > 3 else ""
        return ", ".join(items[:3]) + more

    if missing:
        raise WeightsError(f"{where}: missing tensor(s) {names(missing)}; the checkpoint is incomplete or "
                           "does not match its config.json")
    if misshaped:
        n = misshaped[0]
        raise WeightsError(f"{where}: tensor {n} in {present[n].file.name} has shape {list(present[n].shape)}, "
                           f"config.json implies {list(expected[n])}" +
                           (f" ({len(misshaped) - 1} more mis-shaped)" if len(misshaped) > 1 else ""))
    if wrong_type:
        n = wrong_type[0]
        want = dtypes.get(n, "floating point")
        raise WeightsError(f"{where}: tensor {n} in {present[n].file.name} has dtype {present[n].dtype}; "
                           f"it must be {want}")
    if unexpected:
        raise WeightsError(f"{where}: unexpected tensor(s) {names(unexpected)}; this checkpoint does not match "
                           "its config.json (another model, or a config from a different size?)")


class TensorReader:
    """Reads single tensors by name from open safetensors files (memory-mapped by safetensors).

    The tensors returned are views of the mapped file; `close()` drops the handles, and a file's
    mapping (and the pages read through it) goes once no tensor from it is left.
    """

    def __init__(self, infos: dict[str, TensorInfo]):
        self.infos = infos
        self._handles = {}
        self.bytes_read = 0  # since the last close()

    def get(self, name: str) -> torch.Tensor:
        path = self.infos[name].file
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        try:
            tensor = self._handles[path].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"{path}: tensor {name} cannot be read ({err}); the file is corrupt, re-download it") from None
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        self._handles.clear()
        self.bytes_read = 0


# Our parameter name -> how to build it from checkpoint tensors. Anything not matched is a
# direct copy of the tensor with the same name.
Recipe = Callable[[TensorReader, str], torch.Tensor]


def _fused_gate_up(prefix: str) -> Recipe:
    return lambda r, _: torch.cat([r.get(prefix + "gate_proj.weight"), r.get(prefix + "up_proj.weight")])


def stack_experts(reader: TensorReader, prefix: str, n_experts: int, part: str) -> torch.Tensor:
    """One MoE layer's routed experts as stored in the checkpoint (dtype unchanged), stacked:
    part "gate_up" -> (E, 2M, D), gate rows then up rows; "down" -> (E, D, M). prefix: '...mlp.'"""
    first = reader.get(f"{prefix}experts.0.{'gate' if part == 'gate_up' else 'down'}_proj.weight")
    rows = first.shape[0] * (2 if part == "gate_up" else 1)
    out = torch.empty((n_experts, rows, first.shape[1]), dtype=first.dtype)
    for e in range(n_experts):
        if part == "gate_up":
            half = rows // 2
            out[e, :half] = reader.get(f"{prefix}experts.{e}.gate_proj.weight")
            out[e, half:] = reader.get(f"{prefix}experts.{e}.up_proj.weight")
        else:
            out[e] = reader.get(f"{prefix}experts.{e}.down_proj.weight")
    return out


def _recipes(cfg: ModelConfig) -> list[tuple[re.Pattern, Callable[[re.Match], Recipe]]]:
    lm = cfg.language

    def experts(m: re.Match) -> Recipe:
        return lambda r, _: stack_experts(r, m.group(1), lm.n_routed_experts, m.group(2))

    def kv_b(m: re.Match) -> Recipe:
        def build(r: TensorReader, _: str) -> torch.Tensor:
            w = r.get(m.group(1) + "kv_b_proj.weight").view(
                lm.num_attention_heads, lm.qk_nope_head_dim + lm.v_head_dim, lm.kv_lora_rank)
            part = w[:, : lm.qk_nope_head_dim] if m.group(2) == "w_kb" else w[:, lm.qk_nope_head_dim:]
            return part.contiguous()  # (H, nope, C) or (H, v, C)
        return build

    return [
        (re.compile(r"(.*\.mlp\.)experts\.(gate_up|down)$"), experts),
        (re.compile(r"(.*\.self_attn\.)(w_kb|w_vb)$"), kv_b),
        (re.compile(r"(.*\.)gate_up$"), lambda m: _fused_gate_up(m.group(1))),
    ]


EXPERTS_PARAM = re.compile(r"(.*\.mlp\.experts)\.(gate_up|down)$")
RELEASE_BYTES = 256 << 20  # let go of the mapped files after reading about this much (a layer's experts)


def load_into(model: torch.nn.Module, reader: TensorReader, cfg: ModelConfig, dtype: torch.dtype,
              device: torch.device, on_progress: Callable[[int, int], None] | None = None,
              experts: Callable[[str, TensorReader], torch.nn.Module] | None = None) -> None:
    """Materialise every parameter of a meta-device `model` from the checkpoint.

    Router weights and the correction bias stay float32 (the reference computes routing in
    float32 from weights rounded to the model dtype). `experts(module_name, reader)`, when given, is called once per MoE layer
    with the name of its routed-experts module ("language.model.layers.1.mlp.experts") and
    returns the module to put there (quantized experts), instead of loading `gate_up`/`down`.
    """
    recipes = _recipes(cfg)
    params = list(model.named_parameters())
    for done, (name, param) in enumerate(params, 1):
        m = EXPERTS_PARAM.match(name) if experts is not None else None
        if m is not None:
            if m.group(2) == "gate_up":  # the hook builds both parts
                _set_module(model, m.group(1), experts(m.group(1), reader))
        else:
            _set_param(model, name, _load_param(name, param, reader, recipes, dtype, device))
        if reader.bytes_read > RELEASE_BYTES:
            reader.close()
        if on_progress is not None:
            on_progress(done, len(params))


ROUTER_SUFFIXES = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")  # kept float32 (routing)


def param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype parameter `name` is held in when the model computes in `dtype`."""
    return torch.float32 if name.endswith(ROUTER_SUFFIXES) else dtype


def build_params(model: torch.nn.Module, reader: TensorReader, cfg: ModelConfig, dtype: torch.dtype,
                 experts: Callable[[str, TensorReader], torch.nn.Module] | None = None):
    """(name, tensor) for every parameter of a meta-device `model`, one at a time, exactly as
    `load_into` would set it on CPU (the mapped-layout writer streams these to its file). With an
    `experts` hook, each MoE layer's routed experts come as the buffers of the module it builds
    ("<module>.<buffer>", in the module's order) in place of `gate_up` and `down`."""
    recipes = _recipes(cfg)
    for name, param in model.named_parameters():
        m = EXPERTS_PARAM.match(name) if experts is not None else None
        if m is None:
            yield name, _load_param(name, param, reader, recipes, dtype, torch.device("cpu"))
        elif m.group(2) == "gate_up":  # the hook builds both parts
            for buffer, tensor in experts(m.group(1), reader).named_buffers():
                yield f"{m.group(1)}.{buffer}", tensor
        if reader.bytes_read > RELEASE_BYTES:
            reader.close()


def _load_param(name, param, reader, recipes, dtype, device) -> torch.Tensor:
    raw, from_file = _build_tensor(name, reader, recipes)
    if tuple(raw.shape) != tuple(param.shape):  # our own invariant, after the strict check
        raise WeightsError(f"{name}: built shape {list(raw.shape)} but the model needs {list(param.shape)}")
    if name.endswith(ROUTER_SUFFIXES):  # float32, from weights rounded to the model dtype (not the bias)
        tensor = raw.to(dtype).float() if name.endswith(".gate.weight") else raw.float()
    else:
        tensor = raw.to(dtype)
    tensor = tensor.to(device)
    if from_file and tensor.data_ptr() == raw.data_ptr():  # still the file's pages: take a copy of our own
        tensor = tensor.clone()
    del raw
    return tensor


def _build_tensor(name: str, reader: TensorReader, recipes) -> tuple[torch.Tensor, bool]:
    """The checkpoint tensor for our parameter `name`, and whether it is a view of the file."""
    for pattern, make in recipes:
        m = pattern.match(name)
        if m:
            return make(m)(reader, name), False
    return reader.get(name), True


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def _set_param(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(tensor, torch.nn.Parameter):
        module._parameters[attr] = tensor
    else:
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)

