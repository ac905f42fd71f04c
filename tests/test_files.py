"""dsvl2_cli/files.py, the one atomic write: a temporary file (or folder) beside the target,
renamed over it when complete, removed on any failure; fsync and the umask's mode where asked."""

from __future__ import annotations

import os
import stat

import pytest

from dsvl2_cli import files


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomic_replaces_whole(tmp_path, umask022):
    target = tmp_path / "a.txt"
    files.write_atomic(target, b"one")
    files.write_atomic(target, b"two", normal_mode=True)
    assert target.read_bytes() == b"two" and mode(target) == 0o644
    files.write_atomic(target, b"three")  # without normal_mode: mkstemp's private mode, as before
    assert target.read_bytes() == b"three" and mode(target) == 0o600
    assert leftovers(tmp_path) == []


def test_fsync_only_where_asked(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    files.write_atomic(tmp_path / "a", b"x")
    files.write_atomic(tmp_path / "b", b"x", fsync=False)
    with files.Replacement(tmp_path / "c", fsync=True) as out:
        out.file.write(b"x")
    assert len(synced) == 2


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_failure_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "a.txt"
    target.write_bytes(b"old")
    with pytest.raises(error), files.Replacement(target, fsync=True) as out:
        out.file.write(b"half")
        assert out.tmp.parent == tmp_path and out.tmp.name.startswith(".a.txt.") and out.tmp.suffix == ".part"
        raise error()
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_interrupted_while_syncing(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(tmp_path / "a", b"x")
    assert list(tmp_path.iterdir()) == []


def test_written_by_name_with_prefix_suffix_and_executable_mode(tmp_path, umask022):
    target = tmp_path / "lib.so"
    with files.Replacement(target, prefix=".build-", suffix=".so", executable=True) as out:
        assert out.tmp.name.startswith(".build-") and out.tmp.name.endswith(".so")
        out.tmp.write_bytes(b"\x7fELF")  # another writer (a compiler) fills the file by its name
    assert target.read_bytes() == b"\x7fELF" and mode(target) == 0o755 and leftovers(tmp_path) == []


def test_a_folder_that_cannot_be_written_fails_before_the_work(tmp_path):
    with pytest.raises(OSError):
        files.Replacement(tmp_path / "missing" / "a")


def test_replacing_folder(tmp_path, umask022):
    dst = tmp_path / "out"
    dst.mkdir()  # an empty folder is replaced
    with files.replacing_folder(dst) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.") and tmp.name.endswith(".partial")
        (tmp / "f").write_text("x")
    assert (dst / "f").read_text() == "x" and mode(dst) == 0o755 and leftovers(tmp_path) == []
    with pytest.raises(RuntimeError), files.replacing_folder(tmp_path / "other") as tmp:
        (tmp / "f").write_text("x")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
