"""Memory-mapped loading: weights are views of one private mapping of the converted layout, equal
to the copy path's, and a damaged, stale or foreign layout is caught before a page is touched."""

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers import fresh_copy, load_module, mapping_ranges

from dsvl2_cli.engine.loading import mapped


def _entry(folder, dtype=torch.bfloat16):
    return mapped.entry_paths(folder, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mapped_weights_equal_copied_and_live_in_the_mapping(ckpt, dtype, tmp_path, monkeypatch):
    folder = fresh_copy(ckpt, tmp_path, monkeypatch)
    copied = dict(load_module(folder, dtype, mmap=False).named_parameters())
    assert not _entry(folder, dtype)[0].exists()  # mmap=False writes nothing
    model = load_module(folder, dtype, mmap=True)
    data_path = _entry(folder, dtype)[0]
    ranges = mapping_ranges(data_path)
    assert ranges, "the layout file is not mapped"
    params = dict(model.named_parameters())  # after fast.install's module swaps
    assert params.keys() == copied.keys()
    for name, p in params.items():
        assert p.dtype == copied[name].dtype and torch.equal(p, copied[name]), name
        assert any(lo <= p.data_ptr() < hi for lo, hi in ranges), f"{name} is not a view of the mapping"
    assert len({p.untyped_storage().data_ptr() for p in params.values()}) == 1  # one mapping, no copies


def test_second_load_maps_without_writing(ckpt_small, tmp_path, monkeypatch):
    folder = fresh_copy(ckpt_small, tmp_path, monkeypatch)
    load_module(folder)
    data_path, record = _entry(folder)
    before = (data_path.stat().st_mtime_ns, record.read_bytes())
    os.utime(record, ns=(1, 1))
    monkeypatch.setattr(mapped, "write_entry", lambda *a, **k: pytest.fail("rewrote a sound entry"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "rebuilding" warning either
        load_module(folder)
    assert (data_path.stat().st_mtime_ns, record.read_bytes()) == before
    assert record.stat().st_mtime_ns > 1  # the record's time is the entry's last use (`dsvl2 cache`)


def _damaged_entry_is_rebuilt(folder, damage, reason):
    reference = dict(load_module(folder, mmap=False).named_parameters())
    load_module(folder)
    data_path, record = _entry(folder)
    damage(data_path, record)
    if reason is None:  # no record: a writer that died before finishing, rebuilt without a word
        model = load_module(folder)
    else:
        with pytest.warns(UserWarning, match=reason):
            model = load_module(folder)
    for name, p in model.named_parameters():
        assert torch.equal(p, reference[name]), name
    assert isinstance(mapped.check_entry(data_path, record, mapped.param_table(model, torch.bfloat16),
                                         str(folder.resolve()), torch.bfloat16), tuple)


def test_truncated_layout_is_caught_and_rebuilt(ckpt_tiny, tmp_path, monkeypatch):
    def truncate(data_path, _):
        with data_path.open("r+b") as f:
            f.truncate(data_path.stat().st_size - 4096)  # mapping it would SIGBUS on the last page
    _damaged_entry_is_rebuilt(fresh_copy(ckpt_tiny, tmp_path, monkeypatch), truncate,
                              r"the layout needs \d+ \(truncated")


def test_same_size_rewrite_is_caught_and_rebuilt(ckpt_tiny, tmp_path, monkeypatch):
    def rewrite(data_path, _):
        data_path.write_bytes(bytes(range(256)) * (data_path.stat().st_size // 256) +
                              b"x" * (data_path.stat().st_size % 256))
    _damaged_entry_is_rebuilt(fresh_copy(ckpt_tiny, tmp_path, monkeypatch), rewrite, "its header does not match")


def test_rewritten_sampled_data_page_is_caught(ckpt_tiny, tmp_path, monkeypatch):
    def flip_last_page(data_path, _):  # the last sampled page: tensor bytes only, header intact
        with data_path.open("r+b") as f:
            f.seek(data_path.stat().st_size - 16)
            f.write(b"\x7f" * 16)
    _damaged_entry_is_rebuilt(fresh_copy(ckpt_tiny, tmp_path, monkeypatch), flip_last_page, "its contents do not match")


def test_missing_or_foreign_record_rebuilds(ckpt_tiny, tmp_path, monkeypatch):
    folder = fresh_copy(ckpt_tiny, tmp_path, monkeypatch)
    _damaged_entry_is_rebuilt(folder, lambda _, record: record.unlink(), None)  # a crash before the record
    _damaged_entry_is_rebuilt(
        folder, lambda _, rec: rec.write_text(json.dumps({**json.loads(rec.read_text()), "source": "/else"})),
        "completion record is for another model")


def test_rewritten_source_is_a_new_entry_and_the_old_one_goes(ckpt_tiny, tmp_path, monkeypatch):
    folder = fresh_copy(ckpt_tiny, tmp_path, monkeypatch)
    load_module(folder)
    old_data, old_record = _entry(folder)
    from safetensors.torch import load_file, save_file
    tensors = load_file(folder / "model.safetensors")
    name = "language.model.norm.weight"
    tensors[name] = tensors[name] + 1
    save_file(tensors, folder / "model.safetensors")
    new_data, _ = _entry(folder)
    assert new_data != old_data
    model = load_module(folder)
    assert torch.equal(model.language.model.norm.weight.float(), tensors[name].to(torch.bfloat16).float())
    assert new_data.exists() and not old_data.exists() and not old_record.exists()


def test_env_switch_keeps_the_copy_path(ckpt_tiny, tmp_path, monkeypatch):
    folder = fresh_copy(ckpt_tiny, tmp_path, monkeypatch)
    monkeypatch.setenv("DSVL2_MMAP", "0")
    load_module(folder)
    load_module(folder, torch.float32, quantize="int8")  # quantized loads too (see test_mapped_quant.py)
    assert not (tmp_path / "mapped").exists() or not any((tmp_path / "mapped").iterdir())


def test_no_room_warns_and_copies(ckpt_tiny, tmp_path, monkeypatch):
    folder = fresh_copy(ckpt_tiny, tmp_path, monkeypatch)
    monkeypatch.setattr(mapped.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.warns(UserWarning, match="no room"):
        model = load_module(folder)
    assert not _entry(folder)[0].exists()
    assert model.language.model.norm.weight.dtype == torch.bfloat16


def test_layout_offsets_are_aligned_and_file_is_valid_safetensors(ckpt_small, tmp_path, monkeypatch):
    from safetensors import safe_open
    folder = fresh_copy(ckpt_small, tmp_path, monkeypatch)
    model = load_module(folder)
    data_path, _ = _entry(folder)
    base = model.language.model.norm.weight.untyped_storage().data_ptr()
    assert all((p.data_ptr() - base) % 64 == 0 for p in model.parameters())  # cache lines, any dtype
    with safe_open(data_path, framework="pt") as f:  # the safetensors library reads it as its own
        assert torch.equal(f.get_tensor("language.model.norm.weight"), model.language.model.norm.weight)



def test_load_imports_no_dynamo(ckpt_small, tmp_path):
    """A meta build that runs Python meta kernels imports torch._dynamo: seconds of every load."""
    import os
    import subprocess
    import sys
    code = ("import sys, torch; from dsvl2_cli.engine.runtime import load_model; "
            "from dsvl2_cli.model.config import ModelConfig; "
            f"from pathlib import Path; f = Path({str(ckpt_small)!r}); load_model(f, ModelConfig.from_dir(f), torch.bfloat16, torch.device('cpu')); "
            "print('torch._dynamo' in sys.modules)")
    root = str(Path(__file__).resolve().parents[1])  # this checkout, not an installed dsvl2_cli
    env = {**os.environ, "DSVL2_MMAP_DIR": str(tmp_path), "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"
