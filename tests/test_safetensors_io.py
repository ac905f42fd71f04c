import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from dsvl2_cli.errors import WeightsError
from dsvl2_cli.safetensors_io import Reader, read_header


@pytest.fixture()
def sample(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5), "bf16": torch.randn(4, 2).bfloat16(), "f16": torch.randn(7).half(),
        "i64": torch.arange(6).view(2, 3), "u8": torch.arange(9, dtype=torch.uint8), "empty": torch.zeros(0, 4),
        "big": torch.randn(300, 1000),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


def test_reads_what_safetensors_wrote(sample):
    path, tensors = sample
    reader = Reader(read_header(path))
    for name, value in tensors.items():
        assert torch.equal(reader.read(name), value), name
    # straight into a slice of a bigger tensor
    stacked = torch.empty(2, 300, 1000)
    reader.read_into("big", stacked[1])
    assert torch.equal(stacked[1], tensors["big"])
    with pytest.raises(WeightsError, match="does not fit"):
        reader.read_into("big", torch.empty(300, 999))
    reader.close()


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("edit, needle", [
    (lambda h: h["f32"].update(data_offsets=[0, 10**12]), "points outside the file"),
    (lambda h: h["f32"].update(dtype="F8_E9"), "invalid entry"),
    (lambda h: h["f32"].update(shape=[3, 6]), "bytes for shape"),
    (lambda h: h["f32"].update(shape=[-1, 15]), "invalid entry"),
    (lambda h: h.update(bad="x"), "invalid entry"),
])
def test_corrupted_headers_are_named(sample, edit, needle):
    path, _ = sample
    _rewrite_header(path, edit)
    with pytest.raises(WeightsError, match=needle) as err:
        read_header(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("damage, needle", [
    (lambda d: d[:5], "shorter than its 8-byte header"),
    (lambda d: struct.pack("<Q", 10**9) + d[8:], "does not fit in the file"),
    (lambda d: d[:8] + b"x" + d[9:], "not valid JSON"),
    (lambda d: d[: len(d) // 2], "outside the file|does not fit"),
])
def test_damaged_files(sample, damage, needle):
    path, _ = sample
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(WeightsError, match=needle):
        read_header(path)
