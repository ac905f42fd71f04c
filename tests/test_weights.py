"""Strict loading: every way a checkpoint can disagree with its config is an error naming it."""

import json
import shutil

import pytest
import torch
from helpers import load_module
from safetensors.torch import load_file, save_file

from dsvl2_cli.engine.runtime import load_model
from dsvl2_cli.engine.loading.weights import expected_tensors, read_headers, weight_files
from dsvl2_cli.errors import WeightsError
from dsvl2_cli.model.config import ModelConfig


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _rewrite_single(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_expected_names_match_fixture_files(ckpt):
    cfg = ModelConfig.from_dir(ckpt)
    found = read_headers(weight_files(ckpt))
    expected = expected_tensors(cfg)
    assert set(expected) == {n for n in found if not n.startswith("vision.attn_pool.")}
    assert any(n.startswith("vision.attn_pool.") for n in found)  # present in files, skipped on purpose


def test_sharded_fixture_uses_index(ckpt_vl2):
    files = weight_files(ckpt_vl2)
    assert len(files) >= 2 and all(f.name.startswith("model-") for f in files)


def test_missing_tensor_is_named(ckpt_tiny, tmp_path):
    folder = _copy(ckpt_tiny, tmp_path)
    _rewrite_single(folder, lambda t: t.pop("language.model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing tensor\(s\) language\.model\.layers\.1\.mlp\.experts\.3\.up_proj"):
        load_module(folder, torch.float32)


def test_unexpected_tensor_is_named(ckpt_tiny, tmp_path):
    folder = _copy(ckpt_tiny, tmp_path)
    _rewrite_single(folder, lambda t: t.update({"language.model.layers.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(WeightsError, match=r"unexpected tensor\(s\) language\.model\.layers\.9\.extra\.weight"):
        load_module(folder, torch.float32)


def test_misshaped_tensor_is_named(ckpt_tiny, tmp_path):
    folder = _copy(ckpt_tiny, tmp_path)

    def edit(t):
        t["image_newline"] = torch.zeros(3)
    _rewrite_single(folder, edit)
    with pytest.raises(WeightsError, match=r"tensor image_newline .* shape \[3\]"):
        load_module(folder, torch.float32)


def test_integer_tensor_is_refused(ckpt_tiny, tmp_path):
    folder = _copy(ckpt_tiny, tmp_path)

    def edit(t):
        t["view_seperator"] = torch.zeros_like(t["view_seperator"], dtype=torch.int32)
    _rewrite_single(folder, edit)
    with pytest.raises(WeightsError, match="view_seperator in model.safetensors has dtype I32"):
        load_module(folder, torch.float32)


def test_missing_shard_and_corrupt_header(ckpt_vl2, tmp_path):
    folder = _copy(ckpt_vl2, tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(WeightsError, match=f"{shard.name}: shard listed in model.safetensors.index.json is missing"):
        load_module(folder, torch.float32)

    folder2 = _copy(ckpt_vl2, tmp_path / "b")
    shard = sorted(folder2.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsError, match=f"{shard.name}: not a readable safetensors file"):
        load_module(folder2, torch.float32)


def test_truncated_file_is_an_error(ckpt_tiny, tmp_path):
    folder = _copy(ckpt_tiny, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_module(folder, torch.float32)


def test_pickle_only_folder_is_refused(ckpt_tiny, tmp_path):
    folder = _copy(ckpt_tiny, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(WeightsError, match="never unpickles"):
        load_module(folder, torch.float32)


def test_index_naming_a_path_outside_the_folder(ckpt_vl2, tmp_path):
    folder = _copy(ckpt_vl2, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="unusable shard"):
        load_module(folder, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_loads_in_each_dtype_with_float32_router(ckpt_vl2, dtype):
    model = load_model(ckpt_vl2, ModelConfig.from_dir(ckpt_vl2), dtype, torch.device("cpu"))
    assert model.language.lm_head.weight.dtype == dtype
    gate = model.language.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
