"""Tests of the synthetic checkpoint writer (dsvl2_cli.dev.synthetic) and its layout fidelity."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import pytest
import torch

from dsvl2_cli.dev import synthetic as S
from dsvl2_cli.dev.synthetic_families import config_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "processor_config.json")
DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2}
VL_TOKENS = ("<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>",
             "<|User|>", "<|Assistant|>")
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"


# ------------------------------------------------------------------------------------ helpers

def read_header(path: Path) -> dict:
    """The safetensors header of one file (name -> {dtype, shape, data_offsets}), no tensor data."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    assert path.stat().st_size == 8 + n + end, f"{path.name}: size does not match its header"
    return header


def weight_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        return sorted({ckpt / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [ckpt / "model.safetensors"]


def all_headers(ckpt: Path) -> dict[str, dict]:
    """name -> header entry (plus the file name) over every weight file; names must be unique."""
    out: dict[str, dict] = {}
    for f in weight_files(ckpt):
        for name, entry in read_header(f).items():
            assert name not in out, f"{name} appears in more than one shard"
            out[name] = {**entry, "file": f.name}
    return out


def load_config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def tokenizer(ckpt: Path):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(ckpt / "tokenizer.json"))


def special_ids_from_files(ckpt: Path) -> dict[str, int]:
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))
    return {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}


def build_expected(cfg: dict, family: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape written out independently of the writer, from config.json values
    (with the DeepseekV2Config defaults for absent keys)."""
    lc, vc, pc = cfg["language_config"], cfg["vision_config"], cfg["projector_config"]
    W, blocks, hid = vc["width"], vc["layers"], int(vc["width"] * vc["mlp_ratio"])
    D, V, I = lc["hidden_size"], lc.get("vocab_size", 102400), lc["intermediate_size"]
    L, H = lc.get("num_hidden_layers", 30), lc.get("num_attention_heads", 32)
    E, S_, M = lc["n_routed_experts"], lc["n_shared_experts"], lc["moe_intermediate_size"]
    mla = lc.get("use_mla", True)
    kvr, nope = lc.get("kv_lora_rank", 512), lc.get("qk_nope_head_dim", 128)
    rope, vh = lc.get("qk_rope_head_dim", 64), lc.get("v_head_dim", 128)
    p = vc["patch_size"]
    n_patch = (384 // p) ** 2
    assert pc["n_embed"] == D
    e: dict[str, tuple[int, ...]] = {
        "vision.pos_embed": (1, n_patch, W),
        "vision.patch_embed.proj.weight": (W, 3, p, p), "vision.patch_embed.proj.bias": (W,),
        "vision.norm.weight": (W,), "vision.norm.bias": (W,),
        "vision.attn_pool.latent": (1, 1, W),
        "vision.attn_pool.q.weight": (W, W), "vision.attn_pool.q.bias": (W,),
        "vision.attn_pool.kv.weight": (2 * W, W), "vision.attn_pool.kv.bias": (2 * W,),
        "vision.attn_pool.proj.weight": (W, W), "vision.attn_pool.proj.bias": (W,),
        "vision.attn_pool.norm.weight": (W,), "vision.attn_pool.norm.bias": (W,),
        "vision.attn_pool.mlp.fc1.weight": (hid, W), "vision.attn_pool.mlp.fc1.bias": (hid,),
        "vision.attn_pool.mlp.fc2.weight": (W, hid), "vision.attn_pool.mlp.fc2.bias": (W,),
        "projector.layers.0.weight": (D, 4 * W), "projector.layers.0.bias": (D,),
        "projector.layers.2.weight": (D, D), "projector.layers.2.bias": (D,),
        "image_newline": (D,), "view_seperator": (D,),
        "language.model.embed_tokens.weight": (V, D),
        "language.model.norm.weight": (D,),
        "language.lm_head.weight": (V, D),
    }
    for i in range(blocks):
        b = f"vision.blocks.{i}."
        e.update({
            b + "norm1.weight": (W,), b + "norm1.bias": (W,),
            b + "norm2.weight": (W,), b + "norm2.bias": (W,),
            b + "attn.qkv.weight": (3 * W, W), b + "attn.qkv.bias": (3 * W,),
            b + "attn.proj.weight": (W, W), b + "attn.proj.bias": (W,),
            b + "mlp.fc1.weight": (hid, W), b + "mlp.fc1.bias": (hid,),
            b + "mlp.fc2.weight": (W, hid), b + "mlp.fc2.bias": (W,),
        })
    for layer in range(L):
        q = f"language.model.layers.{layer}."
        e[q + "input_layernorm.weight"] = (D,)
        e[q + "post_attention_layernorm.weight"] = (D,)
        if mla:
            e[q + "self_attn.q_proj.weight"] = (H * (nope + rope), D)
            e[q + "self_attn.kv_a_proj_with_mqa.weight"] = (kvr + rope, D)
            e[q + "self_attn.kv_a_layernorm.weight"] = (kvr,)
            e[q + "self_attn.kv_b_proj.weight"] = (H * (nope + vh), kvr)
            e[q + "self_attn.o_proj.weight"] = (D, H * vh)
        else:
            hd = D // H
            for proj in ("q_proj", "k_proj", "v_proj"):
                e[q + f"self_attn.{proj}.weight"] = (H * hd, D)
            e[q + "self_attn.o_proj.weight"] = (D, H * hd)
        if layer < lc["first_k_dense_replace"]:
            e[q + "mlp.gate_proj.weight"] = (I, D)
            e[q + "mlp.up_proj.weight"] = (I, D)
            e[q + "mlp.down_proj.weight"] = (D, I)
        else:
            e[q + "mlp.gate.weight"] = (E, D)
            if lc.get("topk_method") == "noaux_tc":
                e[q + "mlp.gate.e_score_correction_bias"] = (E,)
            for x in range(E):
                e[q + f"mlp.experts.{x}.gate_proj.weight"] = (M, D)
                e[q + f"mlp.experts.{x}.up_proj.weight"] = (M, D)
                e[q + f"mlp.experts.{x}.down_proj.weight"] = (D, M)
            e[q + "mlp.shared_experts.gate_proj.weight"] = (S_ * M, D)
            e[q + "mlp.shared_experts.up_proj.weight"] = (S_ * M, D)
            e[q + "mlp.shared_experts.down_proj.weight"] = (D, S_ * M)
    return e


def family_of(ckpt: Path) -> str:
    return ckpt.name


# ------------------------------------------------------------------------------------ files

def test_families_constant():
    assert S.FAMILIES == ("tiny-like", "small-like", "vl2-like")


def test_files_written(ckpt):
    for name in ("config.json",) + TOKENIZER_FILES:
        assert (ckpt / name).is_file(), name
    if family_of(ckpt) == "vl2-like":
        assert not (ckpt / "model.safetensors").exists()
        assert (ckpt / "model.safetensors.index.json").is_file()
        assert (ckpt / "model-00001-of-000002.safetensors").is_file()
        assert (ckpt / "model-00002-of-000002.safetensors").is_file()
    else:
        assert (ckpt / "model.safetensors").is_file()
        assert not (ckpt / "model.safetensors.index.json").exists()
        assert not list(ckpt.glob("model-*.safetensors"))


# ------------------------------------------------------------------------------------ config

def test_config_common(ckpt):
    cfg = load_config(ckpt)
    assert set(cfg) == {"candidate_resolutions", "global_view_pos", "language_config",
                        "model_type", "projector_config", "tile_tag", "torch_dtype",
                        "transformers_version", "vision_config"}
    assert cfg["model_type"] == "deepseek_vl_v2"
    assert cfg["tile_tag"] == "2D" and cfg["global_view_pos"] == "head"
    res = [tuple(r) for r in cfg["candidate_resolutions"]]
    assert len(res) == 23 and res == list(S.CANDIDATE_RESOLUTIONS)
    assert all(w % 384 == 0 and h % 384 == 0 and (w // 384) * (h // 384) <= 9 for w, h in res)
    assert len(set(res)) == 23
    lc = cfg["language_config"]
    assert lc["model_type"] == "deepseek_v2"
    assert lc["hidden_size"] == 64 and lc["intermediate_size"] == 128
    assert lc["num_hidden_layers"] == 3 and lc["first_k_dense_replace"] == 1
    assert lc["n_routed_experts"] == 8 and lc["n_shared_experts"] == 2
    assert lc["moe_intermediate_size"] == 32 and lc["num_attention_heads"] == 4
    assert lc["max_position_embeddings"] == 4096 and lc["q_lora_rank"] is None
    assert lc["vocab_size"] == tokenizer(ckpt).get_vocab_size()
    vc = cfg["vision_config"]
    assert (vc["width"], vc["layers"], vc["heads"], vc["patch_size"]) == (64, 2, 4, 14)
    assert cfg["projector_config"] == {"input_dim": 64, "model_type": "mlp_projector",
                                       "n_embed": 64}
    assert cfg["torch_dtype"] == "float32"


def test_config_tiny_like(ckpt_tiny):
    lc = load_config(ckpt_tiny)["language_config"]
    assert lc["use_mla"] is False and lc["kv_lora_rank"] is None
    assert lc["qk_nope_head_dim"] == lc["qk_rope_head_dim"] == lc["v_head_dim"] == 0
    assert lc["bos_token_id"] == 0 and lc["eos_token_id"] == 1
    assert lc["num_experts_per_tok"] == 2 and lc["topk_method"] == "greedy"
    assert "scoring_func" not in lc and "routed_scaling_factor" not in lc
    assert load_config(ckpt_tiny)["vision_config"]["mlp_ratio"] == 2.0


def test_config_small_like(ckpt_small):
    lc = load_config(ckpt_small)["language_config"]
    for absent in ("bos_token_id", "eos_token_id", "use_mla", "scoring_func", "norm_topk_prob"):
        assert absent not in lc, absent
    assert (lc["kv_lora_rank"], lc["qk_nope_head_dim"], lc["qk_rope_head_dim"],
            lc["v_head_dim"]) == (32, 16, 8, 16)
    assert lc["num_experts_per_tok"] == 3 and lc["topk_method"] == "greedy"
    assert lc["vocab_size"] == 1100


def test_config_vl2_like(ckpt_vl2):
    cfg = load_config(ckpt_vl2)
    lc = cfg["language_config"]
    assert lc["scoring_func"] == "sigmoid" and lc["topk_method"] == "noaux_tc"
    assert lc["norm_topk_prob"] is True and lc["routed_scaling_factor"] == 2.0
    assert lc["num_experts_per_tok"] == 3 and "use_mla" not in lc
    assert (lc["bos_token_id"], lc["eos_token_id"]) == (0, 1)
    assert cfg["vision_config"]["mlp_ratio"] == 3.7362


# ------------------------------------------------------------------------------------ tensors

def test_tensor_names_and_shapes(ckpt):
    cfg = load_config(ckpt)
    headers = all_headers(ckpt)
    got = {k: tuple(v["shape"]) for k, v in headers.items()}
    expected = build_expected(cfg, family_of(ckpt))
    assert set(got) == set(expected), (set(got) ^ set(expected))
    assert got == expected
    assert S.expected_tensors(family_of(ckpt)) == expected
    assert {v["dtype"] for v in headers.values()} == {"F32"}
    # Structure counts the runtime relies on.
    fam = family_of(ckpt)
    mlp_hidden = 239 if fam == "vl2-like" else 128
    assert got["vision.blocks.0.mlp.fc1.weight"] == (mlp_hidden, 64)
    for layer in (1, 2):
        experts = [k for k in got if k.startswith(f"language.model.layers.{layer}.mlp.experts.")]
        assert len(experts) == 8 * 3
        assert got[f"language.model.layers.{layer}.mlp.shared_experts.gate_proj.weight"] == (64, 64)
    assert not any(k.startswith("language.model.layers.0.mlp.experts") for k in got)
    n_bias = sum(k.endswith("e_score_correction_bias") for k in got)
    assert n_bias == (2 if fam == "vl2-like" else 0)
    attn = {k.split(".self_attn.")[1] for k in got if ".self_attn." in k}
    if fam == "tiny-like":
        assert attn == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}
        assert got["language.model.layers.0.self_attn.q_proj.weight"] == (64, 64)
    else:
        assert attn == {"q_proj.weight", "kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight",
                        "kv_b_proj.weight", "o_proj.weight"}
        assert got["language.model.layers.0.self_attn.q_proj.weight"] == (96, 64)
        assert got["language.model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (40, 64)
        assert got["language.model.layers.0.self_attn.kv_b_proj.weight"] == (128, 32)


def test_tensor_values(ckpt):
    from safetensors.torch import load_file
    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(ckpt):
        tensors.update(load_file(str(f)))
    for name, t in tensors.items():
        assert torch.isfinite(t).all(), name
        assert t.abs().max() > 0, f"{name} is all zeros"
    norm = tensors["language.model.layers.1.input_layernorm.weight"]
    assert 0.8 < norm.mean() < 1.2 and norm.std() > 0.01
    emb = tensors["language.model.embed_tokens.weight"]
    assert 0.8 < emb.std() < 1.2
    biases = [t for n, t in tensors.items() if n.endswith("e_score_correction_bias")]
    for b in biases:
        assert b.abs().max() <= 0.1 + 1e-6 and b.abs().min() >= 0 and b.std() > 0.01
        assert (b != 0).all()
    # Router logits on unit-scale inputs are spread out enough for decisive routing.
    gate = tensors["language.model.layers.1.mlp.gate.weight"]
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    logits = x @ gate.T
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).median() > 0.2


def test_sharded_index(ckpt_vl2):
    index = json.loads((ckpt_vl2 / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    wm = index["weight_map"]
    assert set(wm.values()) == {"model-00001-of-000002.safetensors",
                                "model-00002-of-000002.safetensors"}
    seen: dict[str, str] = {}
    total = 0
    for f in sorted(set(wm.values())):
        header = read_header(ckpt_vl2 / f)
        assert header, f"{f} is empty"
        for name, entry in header.items():
            assert name not in seen
            seen[name] = f
            start, end = entry["data_offsets"]
            assert end - start == math.prod(entry["shape"]) * DTYPE_BYTES[entry["dtype"]]
            total += end - start
    assert seen == wm
    assert index["metadata"]["total_size"] == total
    assert set(wm) == set(S.expected_tensors("vl2-like"))


def test_shard_count_and_determinism(tmp_path, ckpt_tiny):
    d = S.write_checkpoint(tmp_path / "t3", "tiny-like", shards=3)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    names = sorted(set(index["weight_map"].values()))
    assert names == [f"model-0000{k}-of-000003.safetensors" for k in (1, 2, 3)]
    # Same seed: same values whatever the sharding.
    from safetensors.torch import load_file
    a = load_file(str(ckpt_tiny / "model.safetensors"))
    b: dict[str, torch.Tensor] = {}
    for n in names:
        b.update(load_file(str(d / n)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Same seed: byte-identical files; another seed: different weights, same tokenizer.
    d2 = S.write_checkpoint(tmp_path / "again", "tiny-like")
    d3 = S.write_checkpoint(tmp_path / "seed1", "tiny-like", seed=1)

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    for name in ("config.json", "model.safetensors") + TOKENIZER_FILES:
        assert digest(ckpt_tiny / name) == digest(d2 / name), name
    assert digest(d3 / "model.safetensors") != digest(d2 / "model.safetensors")
    assert digest(d3 / "tokenizer.json") == digest(d2 / "tokenizer.json")
    with pytest.raises(ValueError):
        S.write_checkpoint(tmp_path / "bad", "tiny-like", shards=10_000)
    with pytest.raises(ValueError):
        S.write_checkpoint(tmp_path / "bad", "no-such-family")


def test_rewrite_removes_stale_shards(tmp_path):
    d = S.write_checkpoint(tmp_path / "c", "tiny-like", shards=2)
    S.write_checkpoint(d, "tiny-like")
    assert not (d / "model.safetensors.index.json").exists()
    assert not list(d.glob("model-*.safetensors"))


def test_bf16_dtype(tmp_path):
    d = S.write_checkpoint(tmp_path / "bf", "vl2-like", dtype=torch.bfloat16)
    cfg = load_config(d)
    assert cfg["torch_dtype"] == "bfloat16" == cfg["language_config"]["torch_dtype"]
    assert {v["dtype"] for v in read_header(d / "model.safetensors").values()} == {"BF16"}


# ------------------------------------------------------------------------------------ tokenizer

def test_tokenizer_roundtrip(ckpt):
    tok = tokenizer(ckpt)
    for text in ("Hello, world! The quick brown fox: 12345 + 678 = 13023.",
                 "def f(x):\n    return x ** 2\n\n",
                 "héllo 世界 🙂",
                 "Привет мир — naïve café ≠ ∞ 😀🎉",
                 "  leading and trailing spaces  "):
        enc = tok.encode(text, add_special_tokens=False)
        assert enc.ids and tok.decode(enc.ids, skip_special_tokens=False) == text
    multibyte = tok.encode("héllo 世界 🙂", add_special_tokens=False).ids
    assert len(multibyte) < len("héllo 世界 🙂".encode())  # merges cover some multibyte text


def test_special_tokens_are_single_ids(ckpt):
    tok = tokenizer(ckpt)
    ids = special_ids_from_files(ckpt)
    assert ids == S.special_token_ids(family_of(ckpt))
    vocab_size = load_config(ckpt)["language_config"]["vocab_size"]
    for content in (BOS, EOS, PAD) + VL_TOKENS:
        assert content in ids, content
        assert tok.token_to_id(content) == ids[content]
        assert tok.encode(content, add_special_tokens=False).ids == [ids[content]]
        assert ids[content] < vocab_size
    user, asst, image = ids["<|User|>"], ids["<|Assistant|>"], ids["<image>"]
    enc = tok.encode("<|User|>: hi", add_special_tokens=False).ids
    assert enc[0] == user and len(enc) >= 2 and user not in enc[1:]
    # The post-processor prepends bos (add_bos_token true) and nothing else.
    with_bos = tok.encode("<|User|>: hi", add_special_tokens=True).ids
    assert with_bos == [ids[BOS]] + enc
    prompt = "<|User|>: <image>\n<|ref|>the red cup<|/ref|>.\n\n<|Assistant|>:"
    p = tok.encode(prompt, add_special_tokens=False).ids
    assert p.count(image) == 1 and p.count(user) == 1 and p.count(asst) == 1
    assert tok.decode(p, skip_special_tokens=False) == prompt
    assert "<image>" not in tok.decode(p, skip_special_tokens=True)
    # No special token id is ever produced by the BPE for plain text.
    plain = tok.encode("<image is not a token> <|User : x", add_special_tokens=False).ids
    assert not set(plain) & set(ids.values())


def test_special_ids_differ_between_families(ckpt_tiny, ckpt_small):
    a, b = special_ids_from_files(ckpt_tiny), special_ids_from_files(ckpt_small)
    assert (a[BOS], a[EOS], a[PAD], a["<image>"], a["<|User|>"]) == (0, 1, 2, 1016, 1022)
    for content in (BOS, EOS, PAD) + VL_TOKENS:
        assert a[content] != b[content], content
    assert load_config(ckpt_tiny)["language_config"]["vocab_size"] != \
        load_config(ckpt_small)["language_config"]["vocab_size"]


def test_tokenizer_side_files(ckpt):
    tc = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tc["tokenizer_class"] == "LlamaTokenizer"
    assert tc["add_bos_token"] is True and tc["add_eos_token"] is False
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"]) == (BOS, EOS, PAD)
    assert tc["additional_special_tokens"] == ["<|User|>", "<|Assistant|>"]
    assert all(v["special"] and not v["normalized"] for v in tc["added_tokens_decoder"].values())
    sm = json.loads((ckpt / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert [t["content"] for t in sm["additional_special_tokens"]] == ["<|User|>", "<|Assistant|>"]
    assert sm["bos_token"]["content"] == BOS and sm["eos_token"]["content"] == EOS
    assert sm["pad_token"]["content"] == PAD
    pc = json.loads((ckpt / "processor_config.json").read_text())
    assert pc["candidate_resolutions"] == load_config(ckpt)["candidate_resolutions"]
    assert (pc["patch_size"], pc["downsample_ratio"], pc["ignore_id"]) == (14, 2, -100)
    assert pc["image_mean"] == pc["image_std"] == [0.5, 0.5, 0.5]
    assert (pc["image_token"], pc["pad_token"], pc["sft_format"]) == ("<image>", PAD, "deepseek")
    assert pc["processor_class"] == "DeepseekVLV2Processor"
    assert pc["add_special_token"] is False and pc["mask_prompt"] is False
    assert pc["normalize"] is True
    tj = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    assert tj["model"]["type"] == "BPE" and tj["decoder"]["type"] == "ByteLevel"
    assert tj["pre_tokenizer"]["pretokenizers"][-1]["type"] == "ByteLevel"
    assert tj["post_processor"]["type"] == "TemplateProcessing"


@pytest.mark.parametrize("family", S.REAL_FAMILIES)
def test_real_family_tokenizer_ids(tmp_path, family):
    S.write_tokenizer(tmp_path, family)
    tok = tokenizer(tmp_path)
    ids = special_ids_from_files(tmp_path)
    vocab = S.family_spec(family).lm.vocab_size
    if family in ("tiny", "vl2"):
        want = {BOS: 0, EOS: 1, PAD: 2, "<image>": 128815, "<|ref|>": 128816,
                "<|/ref|>": 128817, "<|det|>": 128818, "<|/det|>": 128819,
                "<|grounding|>": 128820, "<|User|>": 128821, "<|Assistant|>": 128822}
        assert vocab == 129280
    else:
        want = {BOS: 100000, EOS: 100001}
        assert vocab == 102400
        assert all(100000 <= ids[c] < vocab for c in (PAD,) + VL_TOKENS)
    for content, i in want.items():
        assert ids[content] == i
    for content, i in ids.items():
        assert i < vocab and tok.token_to_id(content) == i
        assert tok.encode(content, add_special_tokens=False).ids == [i]
    text = "<|User|>: héllo 世界 🙂\n\n<|Assistant|>:"
    enc = tok.encode(text).ids
    assert enc[:2] == [ids[BOS], ids["<|User|>"]]
    assert tok.decode(enc, skip_special_tokens=False) == BOS + text


# ------------------------------------------------------------------------------------ real shapes

REAL_COUNTS = {  # tensors and bf16 bytes of the real checkpoints (ARCHITECTURE-NOTES 1 and 4)
    "tiny": (2582, 6_741_002_880),
    "small": (5639, 32_296_699_008),
    "vl2": (6973, 54_960_268_496),
}


@pytest.mark.parametrize("family", S.REAL_FAMILIES)
def test_real_shapes_match_published_sizes(family):
    shapes = S.expected_tensors(family)
    count, nbytes = REAL_COUNTS[family]
    assert len(shapes) == count
    assert sum(math.prod(s) for s in shapes.values()) * 2 == nbytes
    assert shapes["vision.blocks.26.mlp.fc1.weight"] == (4304, 1152)
    assert shapes["vision.pos_embed"] == (1, 729, 1152)
    D = S.family_spec(family).lm.hidden
    assert shapes["projector.layers.0.weight"] == (D, 4608)


def test_real_configs():
    tiny = config_json(S.family_spec("tiny"), torch.bfloat16)["language_config"]
    assert tiny["use_mla"] is False and tiny["kv_lora_rank"] is None
    assert tiny["qk_nope_head_dim"] == tiny["qk_rope_head_dim"] == tiny["v_head_dim"] == 0
    assert (tiny["num_hidden_layers"], tiny["hidden_size"], tiny["num_attention_heads"],
            tiny["vocab_size"], tiny["bos_token_id"]) == (12, 1280, 10, 129280, 0)
    small = config_json(S.family_spec("small", layers=4), torch.bfloat16)["language_config"]
    for absent in ("bos_token_id", "eos_token_id", "use_mla", "kv_lora_rank",
                   "qk_nope_head_dim", "scoring_func"):
        assert absent not in small, absent
    assert (small["num_hidden_layers"], small["hidden_size"], small["vocab_size"]) == \
        (4, 2048, 102400)
    vl2 = config_json(S.family_spec("vl2"), torch.bfloat16)
    for absent in ("num_hidden_layers", "num_attention_heads", "kv_lora_rank", "use_mla",
                   "qk_rope_head_dim"):
        assert absent not in vl2["language_config"], absent
    assert "heads" not in vl2["vision_config"] and "input_dim" not in vl2["projector_config"]
    vl2_4 = config_json(S.family_spec("vl2", layers=4), torch.bfloat16)["language_config"]
    assert vl2_4["num_hidden_layers"] == 4
    assert set(vl2_4) - set(vl2["language_config"]) == {"num_hidden_layers"}


# ------------------------------------------------------------------------------------ vs ../shared

def test_vl2_config_equals_real_file(tmp_path, shared_dir):
    """The real-shape vl2 config.json is byte-identical to the real 27B file."""
    ours = S.write_config(tmp_path, "vl2", dtype=torch.bfloat16)
    assert ours.read_bytes() == (shared_dir / "reference/deepseek-vl2/config.json").read_bytes()


def test_vl2_names_equal_real_index(shared_dir):
    real = json.loads(
        (shared_dir / "reference/deepseek-vl2/model.safetensors.index.json").read_text())
    assert set(S.expected_tensors("vl2")) == set(real["weight_map"])
    assert real["metadata"]["total_size"] == REAL_COUNTS["vl2"][1]


def test_real_side_files_match_reference(tmp_path, shared_dir):
    ref = shared_dir / "reference/deepseek-vl2"
    S.write_tokenizer(tmp_path, "vl2")
    assert (tmp_path / "processor_config.json").read_bytes() == \
        (ref / "processor_config.json").read_bytes()
    for name in ("special_tokens_map.json",):
        assert json.loads((tmp_path / name).read_text(encoding="utf-8")) == \
            json.loads((ref / name).read_text(encoding="utf-8"))
    ours = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    real = json.loads((ref / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert set(ours) == set(real)
    assert {k: v for k, v in ours.items() if k != "added_tokens_decoder"} == \
        {k: v for k, v in real.items() if k != "added_tokens_decoder"}
    for i, entry in ours["added_tokens_decoder"].items():
        assert real["added_tokens_decoder"][i] == entry, i


def test_layout_matches_parity_sample(ckpt, shared_dir):
    fam = family_of(ckpt)
    parity = shared_dir / "parity-sample/fixtures" / fam
    if not parity.is_dir():
        pytest.skip("parity sample not present")
    ours_cfg, ref_cfg = load_config(ckpt), load_config(parity)
    assert set(ours_cfg) == set(ref_cfg)
    assert set(ours_cfg["language_config"]) == set(ref_cfg["language_config"])
    for key in ("vision_config", "projector_config", "candidate_resolutions"):
        assert ours_cfg[key] == ref_cfg[key], key
    differ = {"vocab_size"} if fam == "small-like" else set()
    for key, value in ref_cfg["language_config"].items():
        if key not in differ:
            assert ours_cfg["language_config"][key] == value, key
    # Same tensor names and shapes (small-like: only the vocab dimension differs).
    ours = {k: tuple(v["shape"]) for k, v in all_headers(ckpt).items()}
    ref = {k: tuple(v["shape"]) for k, v in read_header(parity / "model.safetensors").items()}
    assert set(ours) == set(ref)
    for k in ref:
        if fam == "small-like" and k in ("language.lm_head.weight",
                                         "language.model.embed_tokens.weight"):
            assert ours[k] == (1100, 64)
        else:
            assert ours[k] == ref[k], k
    # Tokenizer structure and side files.
    tj, rj = (json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
              for d in (ckpt, parity))
    assert list(tj) == list(rj) and list(tj["model"]) == list(rj["model"])
    assert tj["pre_tokenizer"] == rj["pre_tokenizer"] and tj["decoder"] == rj["decoder"]
    assert tj["normalizer"] == rj["normalizer"]
    if fam != "small-like":
        assert tj["post_processor"] == rj["post_processor"]
        assert [(t["id"], t["content"]) for t in tj["added_tokens"]] == \
            [(t["id"], t["content"]) for t in rj["added_tokens"]]
        assert len(tj["model"]["vocab"]) == len(rj["model"]["vocab"])
    assert (ckpt / "processor_config.json").read_bytes() == \
        (parity / "processor_config.json").read_bytes()
    assert (ckpt / "special_tokens_map.json").read_text(encoding="utf-8").strip() == \
        (parity / "special_tokens_map.json").read_text(encoding="utf-8").strip()
    tc = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))
    rc = json.loads((parity / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert {k: v for k, v in tc.items() if k != "added_tokens_decoder"} == \
        {k: v for k, v in rc.items() if k != "added_tokens_decoder"}


# ------------------------------------------------------------------------------------ images

def test_images(images_dir):
    from PIL import Image
    sizes = {}
    for p in sorted(images_dir.glob("*.png")):
        with Image.open(p) as im:
            assert im.mode == "RGB"
            sizes[p.name] = im.size
            colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is None or len(colours) > (20 if min(im.size) < 100 else 500)
    assert sorted(sizes.values()) == sorted([(640, 480), (300, 900), (1200, 400), (50, 50)])


def test_write_image_deterministic(tmp_path):
    a = S.write_image(tmp_path / "a.png", 123, 77, seed=5).read_bytes()
    b = S.write_image(tmp_path / "b.png", 123, 77, seed=5).read_bytes()
    c = S.write_image(tmp_path / "c.png", 123, 77, seed=6).read_bytes()
    assert a == b and a != c


# ------------------------------------------------------------------------------------ slow

@pytest.mark.slow
def test_real_tiny_write(tmp_path):
    """Real-shape tiny (bf16) with 2 LM layers (dense layer 0 + one real-size MoE layer)."""
    d = S.write_checkpoint(tmp_path / "tiny", "tiny", layers=2, dtype=torch.bfloat16)
    cfg = load_config(d)
    assert cfg["language_config"]["num_hidden_layers"] == 2
    index = json.loads((d / "model.safetensors.index.json").read_text())
    headers = all_headers(d)
    assert {k: v["file"] for k, v in headers.items()} == index["weight_map"]
    assert {v["dtype"] for v in headers.values()} == {"BF16"}
    got = {k: tuple(v["shape"]) for k, v in headers.items()}
    assert got == build_expected(cfg, "tiny") == S.expected_tensors("tiny", layers=2)
    total = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in headers.values())
    assert index["metadata"]["total_size"] == total
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert files == [f"model-{k:05d}-of-{n:06d}.safetensors" for k in range(1, n + 1)]
    assert all((d / f).stat().st_size < 2_100_000_000 for f in files)
    assert got["language.model.embed_tokens.weight"] == (129280, 1280)
    assert got["language.model.layers.1.mlp.experts.63.down_proj.weight"] == (1280, 896)
    assert got["language.model.layers.0.self_attn.q_proj.weight"] == (1280, 1280)
    ids = special_ids_from_files(d)
    assert ids["<image>"] == 128815 and ids["<|Assistant|>"] == 128822
