"""Where a model comes from: a local folder, the Hugging Face cache, or a download.

The cache is the one transformers uses (HF_HOME / HF_HUB_CACHE), so a checkpoint downloaded by
either tool serves both. Only the files the runtime reads are fetched: safetensors, JSON and the
tokenizer; never Python files (we never run code from a model folder) nor pickles.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ... import settings
from ...errors import ModelError
from ...settings import DEFAULT_MODEL

ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*"]
# "tokenizer*" would also match e.g. tokenizer_x.py: code and pickles are never fetched.
IGNORE_PATTERNS = ["*.py", "*.pyc", "*.so", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.npy",
                   "*.npz", "*.h5", "*.msgpack"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    source: str  # "local folder", "Hugging Face cache" or "downloaded"
    name: str  # what the user asked for


def is_offline() -> bool:
    return settings.hf_offline()


def requested(name: str | os.PathLike | None = None) -> str:
    """The model asked for: `name`, else $DSVL2_MODEL, else the default."""
    return str(name or settings.default_model())


def local_folder(name: str | os.PathLike | None = None) -> Path | None:
    """The model folder `name` names, when it is one (None for a Hugging Face id)."""
    path = Path(requested(name)).expanduser()
    return path.resolve() if path.is_dir() else None


def check_repo_id(name: str) -> None:
    """Refuse, before any download starts, what cannot be downloaded: a name that is not an id
    (owner/name), or any id while downloads are off (HF_HUB_OFFLINE)."""
    if "/" not in name or any(c.isspace() for c in name):
        raise ModelError(f"{name}: not a Hugging Face id (owner/name) nor a folder; e.g. {DEFAULT_MODEL}")
    if is_offline():
        raise ModelError(f"{name}: cannot download while HF_HUB_OFFLINE is set; unset it on a connected machine "
                         "and run dsvl2 pull again")


def resolve_local(name: str | os.PathLike | None = None) -> ResolvedModel:
    """`resolve` without downloading: a folder or the cache. A Hugging Face id that is not
    cached yet says how to fetch it."""
    try:
        return resolve(name, download=False)
    except ModelError:
        asked = requested(name)
        if is_offline() or Path(asked).expanduser().exists() or "/" not in asked:
            raise
        raise ModelError(f"{asked}: not downloaded yet; `dsvl2 pull {asked}` fetches it (info reads local files "
                         "only)") from None


def resolve(name: str | os.PathLike | None = None, *, download: bool = True) -> ResolvedModel:
    """Folder if `name` is one, else a Hugging Face id looked up in the cache, else downloaded."""
    name = requested(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return ResolvedModel(path.resolve(), "local folder", name)
    if path.exists():
        raise ModelError(f"{name}: is a file; --model takes a model folder or a Hugging Face id like {DEFAULT_MODEL}")
    if not _REPO_ID.match(name):
        raise ModelError(f"{name}: no such folder, and not a Hugging Face id (owner/name); "
                         f"give a model folder or an id like {DEFAULT_MODEL}")
    cached = _from_cache(name)
    if cached is not None:
        return ResolvedModel(cached, "Hugging Face cache", name)
    if is_offline():
        raise ModelError(
            f"{name}: not in the Hugging Face cache and downloads are off (HF_HUB_OFFLINE); "
            f"fetch it on a connected machine with `dsvl2 pull {name}` (or `hf download {name}`), "
            "or pass the model folder with -m PATH"
        )
    if not download:
        raise ModelError(f"{name}: not in the Hugging Face cache; download it with `dsvl2 pull {name}` "
                         "or pass the model folder with -m PATH")
    return ResolvedModel(download_model(name), "downloaded", name)


def _from_cache(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS,
                                      local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss (not cached, partial, bad cache dir) means "not cached"
        return None
    return path if (path / "config.json").is_file() else None


# What a failed download suggests instead; `dsvl2 pull` takes no -m, so it says where -m goes.
LOCAL_FOLDER_HINT = ", or pass a local folder with -m PATH"
PULL_LOCAL_FOLDER_HINT = ("; a model folder already on disk needs no pull: give it to the other commands "
                          "(dsvl2 chat -m FOLDER ...)")


def download_model(repo_id: str, hint: str = LOCAL_FOLDER_HINT) -> Path:
    """Download into the shared Hugging Face cache (huggingface_hub shows its progress bars)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))
    except Exception as err:  # noqa: BLE001 - network, auth, missing repo: all become one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{repo_id}: download failed ({reason}); check the id and your connection{hint}") from None
