"""Quantized routed experts memory-mapped: their buffers, in the CPU kernel's layout, are views of
the mapped layout, equal to the copy path's and decoding the same tokens; a pre-quantized folder
maps too; a damaged quantized entry is caught and rebuilt; no mapping possible means copying."""

import json
import warnings

import pytest
import torch
from helpers import fresh_copy, load_vlm, mapping_ranges

from dsvl2_cli import files
from dsvl2_cli.engine.loading import mapped
from dsvl2_cli.engine import quant
from dsvl2_cli.engine.generate import GenerationConfig, generate
from dsvl2_cli.engine.prompt.processor import user_message
from dsvl2_cli.engine.quant import nf4 as quant_nf4
from dsvl2_cli.engine.quant.experts import QuantizedExperts
from dsvl2_cli.model.config import ModelConfig

try:
    quant_nf4.bitsandbytes()
    HAVE_BNB = True
except quant.QuantizationError:
    HAVE_BNB = False

METHODS = ["int8", "int4", pytest.param("nf4", marks=pytest.mark.skipif(not HAVE_BNB, reason="no bitsandbytes"))]


def _entry(vlm):
    """The data and record paths of the entry `vlm` would map."""
    spec, cfg = vlm.quantization, ModelConfig.from_dir(vlm.path)
    layout = quant.kernel_layout(spec, cfg, torch.device("cpu")) if spec is not None else None
    return mapped.entry_paths(vlm.path, torch.bfloat16, layout)


def _tensors(vlm) -> dict[str, torch.Tensor]:
    return {**dict(vlm.model.named_parameters()), **dict(vlm.model.named_buffers())}


def _decode(vlm):
    from PIL import Image
    picture = Image.new("RGB", (96, 64), (200, 40, 90))
    prepared = vlm.prepare([user_message("Describe this image.", [picture])])
    return list(generate(vlm, prepared, GenerationConfig(max_tokens=8)).token_ids)


def _quantized_buffers(vlm):
    mods = [m for m in vlm.model.modules() if isinstance(m, QuantizedExperts)]
    assert mods
    return [b for m in mods for b in m.buffers()]


@pytest.mark.parametrize("method", METHODS)
def test_quantized_mapped_equals_copied_lives_in_the_mapping_and_decodes_the_same(ckpt_small, method, tmp_path,
                                                                                     monkeypatch):
    folder = fresh_copy(ckpt_small, tmp_path, monkeypatch)
    copied = load_vlm(folder, "bfloat16", quantize=method, mmap=False)
    assert not (tmp_path / "mapped").exists() or not any((tmp_path / "mapped").iterdir())
    first = load_vlm(folder, "bfloat16", quantize=method)  # writes the entry, then maps it
    data_path, record_path = _entry(first)
    assert data_path.is_file() and json.loads(record_path.read_text())["quant"].startswith(method)
    monkeypatch.setattr(mapped, "write_entry", lambda *a, **k: pytest.fail("rewrote a sound quantized entry"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_vlm(folder, "bfloat16", quantize=method)  # maps it: no quantization, no conversion, no write
    ranges = mapping_ranges(data_path)
    assert ranges
    want, got = _tensors(copied), _tensors(model)
    assert want.keys() == got.keys()
    for name, t in got.items():
        assert t.dtype == want[name].dtype and torch.equal(t, want[name]), name
    for b in _quantized_buffers(model):  # the packed codes and scales are the file's pages
        assert any(lo <= b.data_ptr() < hi for lo, hi in ranges)
    assert {type(m).__name__ for m in model.model.modules() if isinstance(m, QuantizedExperts)} == \
        {type(m).__name__ for m in copied.model.modules() if isinstance(m, QuantizedExperts)}
    assert _decode(model) == _decode(copied)


def test_prequantized_folder_maps_its_own_entry(ckpt_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("DSVL2_MMAP_DIR", str(tmp_path / "mapped"))
    folder = quant.quantize_folder(ckpt_tiny, tmp_path / "int4", "int4")
    copied = load_vlm(folder, "bfloat16", mmap=False)
    load_vlm(folder, "bfloat16")
    model = load_vlm(folder, "bfloat16")
    data_path, _ = _entry(model)
    assert data_path.name.split("-")[2].startswith("int4g")
    ranges = mapping_ranges(data_path)
    assert all(any(lo <= b.data_ptr() < hi for lo, hi in ranges) for b in _quantized_buffers(model))
    want = _tensors(copied)
    assert all(torch.equal(t, want[n]) for n, t in _tensors(model).items())
    # the float checkpoint quantized at load is another model (other fingerprint): another entry
    load_vlm(ckpt_tiny, "bfloat16", quantize="int4")
    assert len(list((tmp_path / "mapped").glob("*.done.json"))) == 2


def _damaged_quantized_entry_is_rebuilt(folder, damage, reason):
    reference = _tensors(load_vlm(folder, "bfloat16", quantize="int4", mmap=False))
    data_path, record_path = _entry(load_vlm(folder, "bfloat16", quantize="int4"))
    damage(data_path, record_path)
    with pytest.warns(UserWarning, match=reason):
        model = load_vlm(folder, "bfloat16", quantize="int4")
    assert all(torch.equal(t, reference[n]) for n, t in _tensors(model).items())
    ranges = mapping_ranges(data_path)
    assert all(any(lo <= b.data_ptr() < hi for lo, hi in ranges) for b in _quantized_buffers(model))


def test_truncated_quantized_entry_is_caught_and_rebuilt(ckpt_tiny, tmp_path, monkeypatch):
    def truncate(data_path, _):
        with data_path.open("r+b") as f:
            f.truncate(data_path.stat().st_size - 4096)  # mapping it would SIGBUS on the last page
    _damaged_quantized_entry_is_rebuilt(fresh_copy(ckpt_tiny, tmp_path, monkeypatch), truncate,
                                        r"the layout needs \d+ \(truncated")


def test_corrupted_quantized_codes_are_caught_and_rebuilt(ckpt_tiny, tmp_path, monkeypatch):
    def flip_codes(data_path, _):  # bytes of packed codes on a sampled page; header and size intact
        head_len = int.from_bytes(data_path.read_bytes()[:8], "little")
        header = json.loads(data_path.read_bytes()[8:8 + head_len])
        base, size = 8 + head_len, data_path.stat().st_size
        span = size - base - mapped.SAMPLE_BYTES
        pages = [base + span * i // (mapped.SAMPLES - 1) for i in range(mapped.SAMPLES)]  # as mapped._digest
        codes = [(base + lo, base + hi) for name, t in header.items() if name.endswith(".gate_up_q")
                 for lo, hi in [t["data_offsets"]]]
        at = next(p for p in pages for lo, hi in codes if lo <= p < hi)
        with data_path.open("r+b") as f:
            f.seek(at)
            old = f.read(1)
            f.seek(at)
            f.write(bytes([old[0] ^ 0xFF]))
    _damaged_quantized_entry_is_rebuilt(fresh_copy(ckpt_tiny, tmp_path, monkeypatch), flip_codes,
                                        "its contents do not match")


def test_entry_of_another_packing_is_not_used(ckpt_tiny, tmp_path, monkeypatch):
    """A record naming another kernel layout (another CPU or torch packs int4 differently) is foreign."""
    folder = fresh_copy(ckpt_tiny, tmp_path, monkeypatch)
    _damaged_quantized_entry_is_rebuilt(
        folder, lambda _, rec: rec.write_text(json.dumps({**json.loads(rec.read_text()), "quant": "int4g128-cpu-0"})),
        "completion record is for another model")


def test_unwritable_cache_folder_copies_with_one_warning(ckpt_tiny, tmp_path, monkeypatch):
    folder = fresh_copy(ckpt_tiny, tmp_path, monkeypatch)
    reference = _tensors(load_vlm(folder, "bfloat16", quantize="int4", mmap=False))

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)  # the one atomic write (dsvl2_cli/files.py)
    with pytest.warns(UserWarning, match="cannot write the mapped layout .*Permission denied.*copying") as caught:
        model = load_vlm(folder, "bfloat16", quantize="int4")
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert all(torch.equal(t, reference[n]) for n, t in _tensors(model).items())
    assert not list((tmp_path / "mapped").glob("*.safetensors"))


def test_env_switch_copies_quantized_experts(ckpt_tiny, tmp_path, monkeypatch):
    folder = fresh_copy(ckpt_tiny, tmp_path, monkeypatch)
    monkeypatch.setenv("DSVL2_MMAP", "0")
    load_vlm(folder, "bfloat16", quantize="int8")
    assert not (tmp_path / "mapped").exists() or not any((tmp_path / "mapped").iterdir())
