"""Writing files so that a reader sees the whole of one or nothing: a temporary file (or folder)
beside the target, renamed over it at the end, removed on any failure (Ctrl-C included). The
floor every wing writes through (no torch): page texts and --out files (app/inputs/sources.py), saved
prompts (engine/prompt_store.py), mapped layouts (engine/loading/mapped.py), the native kernels
(engine/native/kernel_build.py) and pre-quantized folders (engine/quant/folder.py).

mkstemp and mkdtemp make private files (0600, 0700); `follow_umask` gives what we wrote the mode
a plain open() or mkdir() would, for the writers whose files other users may read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def follow_umask(path: str | os.PathLike, *, executable: bool = False, folder: bool = False) -> None:
    """Give `path` the mode a plain open()/mkdir() would: 0666 (0777 for a folder or an executable)
    less the user's umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if executable or folder else 0o666) & ~umask)


class Replacement:
    """A temporary file beside `path`, made at once (so that a folder that cannot be written fails
    here, before any work), that replaces `path` when the `with` block ends without an error and
    is removed otherwise. Write into `.file` (opened on first use), or have something else write
    the file named `.tmp` (a compiler, safetensors).

    fsync: flush `.file` to disk before the rename (so that after a crash the name holds the old
    file or the whole new one). normal_mode: `follow_umask` (executable: 0777 less the umask)."""

    def __init__(self, path: str | os.PathLike, *, prefix: str | None = None, suffix: str = ".part",
                 fsync: bool = False, normal_mode: bool = False, executable: bool = False):
        self.path = Path(path)
        self.fsync, self.normal_mode, self.executable = fsync, normal_mode, executable
        fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}." if prefix is None else prefix,
                                    suffix=suffix)
        self.tmp = Path(name)
        self._fd: int | None = fd
        self._file: BinaryIO | None = None

    @property
    def file(self) -> BinaryIO:
        if self._file is None:
            self._file = os.fdopen(self._fd, "wb")
            self._fd = None
        return self._file

    def __enter__(self) -> Replacement:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._finish()
                return False
        except BaseException:
            self._discard()
            raise
        self._discard()
        return False

    def _finish(self) -> None:
        if self._file is not None:
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
        self._close()
        if self.normal_mode or self.executable:
            follow_umask(self.tmp, executable=self.executable)
        os.replace(self.tmp, self.path)

    def _close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()
        elif self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _discard(self) -> None:
        with contextlib.suppress(OSError):
            self._close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def write_atomic(path: str | os.PathLike, data: bytes, *, prefix: str | None = None, suffix: str = ".part",
                 fsync: bool = True, normal_mode: bool = False) -> None:
    """`data` into `path` through a `Replacement` (fsync'd by default). OSError as it comes."""
    with Replacement(path, prefix=prefix, suffix=suffix, fsync=fsync, normal_mode=normal_mode) as out:
        out.file.write(data)


@contextlib.contextmanager
def replacing_folder(dst: str | os.PathLike, *, suffix: str = ".partial") -> Iterator[Path]:
    """A temporary folder beside `dst` for the block to fill, renamed to `dst` when the block ends
    without an error (after `follow_umask`: mkdtemp makes it 0700; an empty `dst` is replaced),
    removed with its contents otherwise."""
    dst = Path(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=suffix, dir=dst.parent))
    try:
        yield tmp
        follow_umask(tmp, folder=True)
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
