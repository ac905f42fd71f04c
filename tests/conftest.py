"""Shared pytest fixtures: small random checkpoints in the real on-disk layout, the tiny one loaded,
test images, and the optional ../shared reference data (plain helper functions: helpers.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # plain `pytest` without an installed package
    sys.path.insert(0, str(REPO_ROOT))

from dsvl2_cli.dev.synthetic import FAMILIES, write_checkpoint, write_image  # noqa: E402
from helpers import load_vlm  # noqa: E402

# (name, width, height): landscape, tall portrait, wide panorama, tiny.
TEST_IMAGES = (
    ("landscape_640x480.png", 640, 480),
    ("portrait_300x900.png", 300, 900),
    ("wide_1200x400.png", 1200, 400),
    ("tiny_50x50.png", 50, 50),
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: long-running test (real-size weights); runs only with DSVL2_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DSVL2_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set DSVL2_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _caches(tmp_path_factory):
    """Everything dsvl2 caches goes to the session's tmp, never the user's ~/.cache: mapped
    layouts (engine/loading/mapped.py), saved prompts, page texts and compiled kernels (DSVL2_CACHE);
    subprocesses inherit both."""
    os.environ["DSVL2_MMAP_DIR"] = str(tmp_path_factory.mktemp("mapped"))
    os.environ["DSVL2_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def ckpt_tiny(tmp_path_factory) -> Path:
    """tiny-like: plain MHA, softmax greedy router, single model.safetensors."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-like", "tiny-like")


@pytest.fixture(scope="session")
def ckpt_small(tmp_path_factory) -> Path:
    """small-like: MLA, softmax router, no bos/eos/use_mla in config, different special ids."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "small-like", "small-like")


@pytest.fixture(scope="session")
def ckpt_vl2(tmp_path_factory) -> Path:
    """vl2-like: MLA, sigmoid/noaux_tc router with correction bias; two shards + index."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "vl2-like", "vl2-like", shards=2)


_CKPT_FIXTURES = {"tiny-like": "ckpt_tiny", "small-like": "ckpt_small", "vl2-like": "ckpt_vl2"}


@pytest.fixture(params=FAMILIES, ids=list(FAMILIES))
def ckpt(request) -> Path:
    """Each small family in turn (the same session-scoped folders as ckpt_tiny/_small/_vl2)."""
    return request.getfixturevalue(_CKPT_FIXTURES[request.param])


@pytest.fixture(scope="module")
def vlm(ckpt_tiny):
    """The tiny-like checkpoint loaded in float32 on the CPU, once per module. A module that runs on
    other families or dtypes overrides `vlm` with its own parameters (loading with helpers.load_vlm)."""
    return load_vlm(ckpt_tiny)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only reference data next to the repository (../shared); skip when absent."""
    path = REPO_ROOT.parent / "shared"
    if not path.is_dir():
        pytest.skip("../shared not present")
    return path


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory) -> Path:
    """A folder of deterministic RGB PNGs of several aspect ratios (see TEST_IMAGES)."""
    root = tmp_path_factory.mktemp("images")
    for seed, (name, w, h) in enumerate(TEST_IMAGES):
        write_image(root / name, w, h, seed=seed)
    return root


@pytest.fixture(autouse=True)
def _private_prompt_cache(monkeypatch, tmp_path):
    """Model commands save image prompts by default: in-process tests keep them in a folder of
    their own, never in the user's ~/.cache, one folder per test (tests of the cache itself put it back on
    $XDG_CACHE_HOME with their own folder)."""
    from dsvl2_cli import settings

    folder = tmp_path / "prompt-cache"  # per test: one test's answers never reuse another's
    monkeypatch.setattr(settings, "prompt_cache_dir", lambda: folder)
