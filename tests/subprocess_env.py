"""The environment of a dsvl2 subprocess in the tests: the user's DSVL2_* settings removed (a test
must not depend on them), the session's cache folders kept (conftest points DSVL2_CACHE and
DSVL2_MMAP_DIR into tmp), so that no subprocess writes mapped layouts, prompts or kernels into
the user's ~/.cache/dsvl2; the checkout importable, the hub offline, output unbuffered."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEPT = ("DSVL2_CACHE", "DSVL2_MMAP_DIR")


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSVL2_") or k in KEPT}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env
