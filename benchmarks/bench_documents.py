"""Whole documents: OCR pages per minute one page at a time vs batched, the greedy agreement
of the two in the run's dtype, and the time to answer `ask` on a 30-page PDF with a text layer
(page selection included).

    python benchmarks/bench_documents.py [--ckpt DIR] [--pages 10] [--tokens 64] [--dtype bfloat16]
    python benchmarks/bench_documents.py --quick      # a test-size checkpoint: checks the script runs

Without --ckpt it uses the real-shape tiny synthetic checkpoint in DSVL2_BENCH_DIR/tiny (as
`dsvl2 bench`; random weights, so the answers are noise but the speed is real). Pages are
generated A4 PDFs at the default 144 dpi (3x3 tiles each). Prints one JSON object and writes it
to --out (default benchmarks/results/documents-<device>.json; --quick writes nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ["shipping", "terms", "warranty", "returns", "contact", "order", "delivery", "invoice", "payment", "schedule",
         "account", "reference", "customer", "address", "support", "hours", "parts", "labour"]


def make_pdf(path: Path, pages: int, answer_page: int | None = None) -> Path:
    import pymupdf

    doc = pymupdf.open()
    for i in range(pages):
        page = doc.new_page(width=595, height=842)  # A4 in points
        lines = [" ".join(WORDS[(i + j + k) % len(WORDS)] for k in range(9)) for j in range(30)]
        if i + 1 == answer_page:
            lines[12] = "The total amount due is 1,234.56 EUR, payable within 30 days."
        page.insert_text((56, 72), "\n".join(lines), fontsize=10)
    doc.save(str(path))
    doc.close()
    return path


def sources_of(pdf: Path, stack: contextlib.ExitStack):
    from dsvl2_cli.app.inputs.sources import collect_sources

    return collect_sources([str(pdf)], None, 144, None, lambda note: None, stack)


def ocr_run(vlm, sources, opts, batch: int) -> tuple[float, list]:
    from dsvl2_cli.app import tasks

    t0 = time.perf_counter()
    events = tasks.read_pages(vlm, sources, tasks.OCR_PROMPTS["text"], opts, batch=batch)
    answers = [e for e in events if isinstance(e, tasks.Answer)]
    return time.perf_counter() - t0, answers


def agreement(one: list, many: list) -> dict:
    """Greedy tokens of batched vs one-by-one reading: identical pages, and per page the first
    position where they differ (None: identical)."""
    firsts = []
    for a, b in zip(one, many):
        x, y = a.done.token_ids, b.done.token_ids
        diff = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        firsts.append(diff if diff is not None or len(x) == len(y) else min(len(x), len(y)))
    same = sum(f is None for f in firsts)
    return {"pages_identical": same, "pages": len(firsts), "first_difference_at": firsts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="test-size checkpoint, 4 pages, 8 tokens")
    ap.add_argument("--pages", type=int, default=10)
    ap.add_argument("--ask-pages", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import dsvl2_cli
    from dsvl2_cli import settings
    from dsvl2_cli.app import pages as page_selection
    from dsvl2_cli.app import tasks
    from dsvl2_cli.dev.bench import ensure_checkpoint
    from dsvl2_cli.dev.synthetic import write_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="dsvl2-bench-documents-"))
    if args.quick:
        args.pages, args.ask_pages, args.tokens = 4, 6, 8
        ckpt = args.ckpt or write_checkpoint(tmp / "tiny-like", "tiny-like")
    else:
        ckpt = args.ckpt or ensure_checkpoint(settings.bench_dir(), "tiny", None)
    vlm = dsvl2_cli.load(ckpt, dtype=args.dtype, device=args.device)
    opts = tasks.Options(max_tokens=args.tokens)
    report: dict = {"checkpoint": str(ckpt), "dtype": args.dtype, "device": str(vlm.device),
                    "tokens_per_page": args.tokens, "pages": args.pages}
    with contextlib.ExitStack() as stack:
        sources = sources_of(make_pdf(tmp / "ocr.pdf", args.pages), stack)
        batch = tasks.default_ocr_batch(vlm, len(sources))
        t1, one = ocr_run(vlm, sources, opts, 1)
        tb, many = ocr_run(vlm, sources, opts, batch)
        report["ocr"] = {"batch_default": batch, "pages_per_minute_batch_1": round(60 * len(one) / t1, 2),
                         f"pages_per_minute_batch_{batch}": round(60 * len(many) / tb, 2),
                         "seconds_batch_1": round(t1, 2), f"seconds_batch_{batch}": round(tb, 2),
                         "speedup": round(t1 / tb, 3), "greedy_agreement": agreement(one, many)}

        answer_page = max(1, args.ask_pages * 2 // 3)
        ask_sources = sources_of(make_pdf(tmp / "ask.pdf", args.ask_pages, answer_page), stack)
        question = "What is the total amount due?"
        t0 = time.perf_counter()
        texts = [src.text() for src in ask_sources]
        selection = page_selection.select_pages(question, ask_sources, texts)
        images = [src.image() for src in selection.chosen]
        t_select = time.perf_counter() - t0
        *_, answer = tasks.ask(vlm, images, question, opts, selection=selection)
        report["ask"] = {"document_pages": args.ask_pages, "answer_page": answer_page,
                         "pages_chosen": answer.record["pages"], "selection_s": round(t_select, 3),
                         "total_s": round(time.perf_counter() - t0, 2),
                         "prompt_tokens": answer.record["usage"]["prompt_tokens"],
                         "grids": [img["grid"] for img in answer.record["images"]]}
    print(json.dumps(report, indent=2))
    if not args.quick:
        out = args.out or ROOT / "benchmarks" / "results" / f"documents-{vlm.device.type}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
