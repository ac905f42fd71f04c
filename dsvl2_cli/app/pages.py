"""Page selection for `ask`: which pages of a document most likely hold the answer.

A long document cannot be asked about whole: with more than two pages the model sees each one
untiled (384x384, text unreadable), and 30 pages do not fit the context at all. So, without
--pages, the pages are ranked by the question against their text (the PDF's text layer; for a
scanned page, its OCR), and only the best are asked about, at full detail.

Ranking is Okapi BM25 (Robertson and Zaragoza, "The Probabilistic Relevance Framework: BM25 and
Beyond", 2009), written out here in a few lines: no ranking library is installed, and BM25 over
a few dozen pages is a dozen lines of arithmetic that need no index. The OCR text of scanned
pages is kept in the prompt cache folder (`prompts/page-text/`), keyed by the model and the page's pixels,
so a second question about the same document does not OCR it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import settings
from ..engine.prompt.messages import MAX_TILED_IMAGES
from ..errors import InputError
from .inputs.sources import Source, write_atomic

MIN_TEXT_CHARS = 20     # less text than this (a page number, a stray mark): treated as scanned
SECOND_PAGE_SHARE = 0.5  # a second page is asked about too when it scores at least half the best
MAX_PAGES = MAX_TILED_IMAGES  # the most pages the model sees tiled
_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased words, a plural 's' dropped so that "totals" matches "total"."""
    out = []
    for w in _WORD.findall(text.lower()):
        out.append(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return out


def bm25(query: str, docs: Sequence[str], k1: float = 1.5, b: float = 0.75) -> list[float]:
    """The BM25 score of each document for the query (higher: more relevant; 0: no shared word)."""
    bags = [Counter(words(d)) for d in docs]
    lengths = [sum(bag.values()) for bag in bags]
    avg = (sum(lengths) / len(lengths)) if lengths and sum(lengths) else 1.0
    n = len(docs)
    scores = [0.0] * n
    for term in set(words(query)):
        df = sum(1 for bag in bags if term in bag)
        if not df:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))  # the "+1" form: never negative
        for i, bag in enumerate(bags):
            tf = bag.get(term, 0)
            if tf:
                scores[i] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[i] / avg))
    return scores


def choose(scores: Sequence[float]) -> list[int]:
    """Indices of the pages to ask about, in document order: the best page, and the runner-up
    when it scores at least SECOND_PAGE_SHARE of the best (an answer split over two pages).
    With no page sharing a word with the question, the first page."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if not order:
        return []
    best = scores[order[0]]
    if best <= 0:
        return [0]
    picked = [order[0]] + [i for i in order[1:MAX_PAGES] if scores[i] >= SECOND_PAGE_SHARE * best]
    return sorted(picked)


def has_text_layer(text: str) -> bool:
    return len("".join(text.split())) >= MIN_TEXT_CHARS


class PageTextCache:
    """OCR text of scanned pages on disk: one UTF-8 file per (model, dtype, prompt, page pixels)."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder or settings.prompt_cache_dir() / "page-text"

    def key(self, model_id: str, prompt: str, img) -> str:
        h = hashlib.blake2b(digest_size=20)
        for part in (model_id, prompt, f"{img.width}x{img.height}:{img.mode}"):
            h.update(part.encode("utf-8") + b"\0")
        h.update(img.tobytes())
        return h.hexdigest()

    def get(self, key: str) -> str | None:
        try:
            return (self.folder / f"{key}.txt").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    def put(self, key: str, text: str) -> None:
        try:
            write_atomic(self.folder / f"{key}.txt", text.encode("utf-8"))
        except InputError:  # a cache that cannot be written only costs time on the next question
            pass

    def entries(self) -> list[tuple[Path, int, float]]:
        """(path, bytes, last write) of every saved page text, oldest first."""
        out = []
        if self.folder.is_dir():
            for p in self.folder.glob("*.txt"):
                with contextlib.suppress(OSError):
                    st = p.stat()
                    out.append((p, st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e[2])

    def clear(self) -> tuple[int, int]:
        """Remove every saved page text; returns (files, bytes) removed."""
        from ..engine.prompt_store import remove_file  # torch: `ask` itself does not need it
        n = size = 0
        for path, nbytes, _ in self.entries():
            if remove_file(path):
                n, size = n + 1, size + nbytes
        return n, size


@dataclass(frozen=True)
class Selection:
    """ask without --pages: the pages chosen for a question, and every page's BM25 score."""

    chosen: tuple[Source, ...]
    ranked: tuple[tuple[Source, float], ...]  # document order
    ocr_pages: int = 0  # pages without a text layer, read by OCR for the ranking (or from its cache)

    def as_json(self) -> dict:
        return {"method": "bm25", "ocr_pages": self.ocr_pages,
                "scores": [{"input": s.input, "page": s.page, "score": round(v, 4)} for s, v in self.ranked]}

    def note(self) -> str:
        used = ", ".join(s.title for s in self.chosen)
        ocr = f", {self.ocr_pages} read by OCR" if self.ocr_pages else ""
        return (f"asking about {used}: the best match for the question among {len(self.ranked)} pages "
                f"(ranked by their text{ocr}); --pages chooses others")


def selectable(sources: Sequence[Source]) -> bool:
    """Whether ask should choose pages: more pages than are tiled, all from PDFs."""
    return len(sources) > MAX_PAGES and all(src.text is not None for src in sources)


def scanned_pages(texts: Sequence[str]) -> list[int]:
    """Indices of the pages whose text layer is missing (they need OCR to be ranked)."""
    return [i for i, text in enumerate(texts) if not has_text_layer(text)]


def select_pages(question: str, sources: Sequence[Source], texts: Sequence[str], ocr_pages: int = 0) -> Selection:
    """The pages to ask `question` about, ranked by BM25 over `texts` (choose)."""
    scores = bm25(question, texts)
    chosen = tuple(sources[i] for i in choose(scores))
    return Selection(chosen, tuple(zip(sources, scores)), ocr_pages)
