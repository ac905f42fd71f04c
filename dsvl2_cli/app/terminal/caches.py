"""`dsvl2 cache`: the three kinds of data dsvl2 keeps on disk, gathered for listing, clearing and
pruning (render.py formats them).

- prompts  the persistent prompt cache (engine/prompt_store.py), capped, least recently used out;
- pages    the OCR text of scanned PDF pages that `ask` ranks (pages.PageTextCache);
- mapped   the converted weight layouts that CPU loads map (engine/loading/mapped.py, mapped_store.py),
           each the size of a model's weights.
"""

from __future__ import annotations

import time

from ... import settings
from ...engine.loading import mapped_store
from ...engine.prompt_store import PromptStore
from ..pages import PageTextCache

KINDS = ("prompts", "pages", "mapped")
CLEARABLE = (*KINDS, "all")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def listing(store: PromptStore, pages: PageTextCache | None = None) -> dict:
    """`dsvl2 cache --json`. The prompt cache's keys stay at the top level, as they were before the
    other kinds were listed; "pages" and "mapped" hold the others."""
    pages = pages or PageTextCache()
    prompts, texts, layouts = store.entries(), pages.entries(), mapped_store.entries()
    return {
        "folder": str(store.folder), "cap_bytes": store.cap_bytes,
        "total_bytes": sum(size for _, size, _ in prompts),
        "entries": [{"name": p.name, "bytes": size, "last_used": _when(used)} for p, size, used in prompts],
        "pages": {"folder": str(pages.folder), "total_bytes": sum(size for _, size, _ in texts),
                  "entries": [{"name": p.name, "bytes": size, "last_used": _when(used)} for p, size, used in texts]},
        "mapped": {"folder": str(settings.mapped_dir()), "total_bytes": sum(e.bytes for e in layouts),
                   "stale_bytes": sum(e.bytes for e in layouts if e.stale),
                   "entries": [e.as_json() for e in layouts]},
    }


def clear(kind: str, store: PromptStore, pages: PageTextCache | None = None) -> list[dict]:
    """Remove every entry of `kind` ("prompts", "pages", "mapped" or "all"); what went, per kind."""
    pages = pages or PageTextCache()
    out = []
    for k in KINDS if kind == "all" else (kind,):
        if k == "prompts":
            (n, size), folder = store.clear(), store.folder
        elif k == "pages":
            (n, size), folder = pages.clear(), pages.folder
        else:
            (n, size), folder = mapped_store.clear(), settings.mapped_dir()
        out.append({"kind": k, "entries": n, "bytes": size, "folder": str(folder)})
    return out


def prune() -> list[dict]:
    """Remove the stale mapped layouts (source deleted or rewritten, or left half-written)."""
    n, size = mapped_store.prune()
    return [{"kind": "mapped", "entries": n, "bytes": size, "folder": str(settings.mapped_dir())}]
