"""Every file dsvl2 writes gets the user's umask (0644 under umask 022), as a plain open() would:
not the private 0600/0700 of mkstemp, mkdtemp and safetensors."""

from __future__ import annotations

import os
import stat

import pytest

from dsvl2_cli.engine.quant.folder import quantize_folder


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_quantized_folder_follows_the_umask(ckpt_tiny, tmp_path, umask):
    out = quantize_folder(ckpt_tiny, tmp_path / "q", "int8", max_shard_bytes=500_000)  # several shards
    files = sorted(out.rglob("*"))
    assert len([f for f in files if f.name.endswith(".safetensors")]) > 1
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for f in files:
        want = (0o777 if f.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(f.stat().st_mode) == want, (f.name, oct(f.stat().st_mode))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no partial folder left


def test_synthetic_checkpoint_follows_the_umask(tmp_path, umask):
    from dsvl2_cli.dev.synthetic import write_checkpoint
    out = write_checkpoint(tmp_path / "ck", "tiny-like")
    for f in sorted(out.rglob("*")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name
