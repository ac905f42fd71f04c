"""Whole documents: context budgets (app/budget.py, --max-tiles, refusals before loading), page
selection for ask (app/pages.py: BM25 over text layers, OCR of scanned pages kept in the cache),
and batched OCR (--batch: page order, resumption, batch == one by one in float32).

Most CLI tests replace the generation (backends.stream_generate / documents.generate_batch) with canned
answers: what they check is the prompt each command plans and what it prints, not random tokens."""

from __future__ import annotations

import json

import pytest
from helpers import write_pdf
from PIL import Image
from reliability_support import answer_events
from test_cli import _isolated, assert_one_line_error, model_args, run  # noqa: F401 - fixture

from dsvl2_cli import settings
from dsvl2_cli.app import backends, budget, documents, pages, tasks
from dsvl2_cli.app.terminal import cli
from dsvl2_cli.app.inputs.sources import Source, tag
from dsvl2_cli.dev.synthetic import write_image
from dsvl2_cli.engine.generate import Done
from dsvl2_cli.engine.prompt.processor import user_message
from dsvl2_cli.errors import ContextTooLongError

A4 = (1190, 1684)  # an A4 page at the default 144 dpi
CONTEXT = 4096


# ------------------------------------------------------------------------------------ helpers

def _done(vlm, prepared, text: str) -> Done:
    *_, done = answer_events(vlm, prepared, text)
    return done


class Generations:
    """Canned generation for both paths, counting prompts: one-by-one (stream) and batched."""

    def __init__(self, monkeypatch, text=lambda n: "page text", interrupt_at_batch: int | None = None):
        self.streamed, self.batched, self.batches, self.prompts, self.max_tokens = 0, 0, 0, [], []
        self.text, self.interrupt_at_batch = text, interrupt_at_batch
        monkeypatch.setattr(backends, "stream_generate", self.stream)
        monkeypatch.setattr(backends, "generate_batch", self.batch)

    def stream(self, vlm, prepared, config=None, prompt_cache=None):
        self.streamed += 1
        self.prompts.append(prepared)
        self.max_tokens.append(config.max_tokens)
        yield from answer_events(vlm, prepared, self.text(len(self.prompts)))

    def batch(self, vlm, prompts, config=None, max_tokens=None):
        self.batches += 1
        self.max_tokens.extend(max_tokens or [config.max_tokens] * len(prompts))
        if self.batches == self.interrupt_at_batch:
            raise KeyboardInterrupt
        out = []
        for p in prompts:
            self.batched += 1
            self.prompts.append(p)
            out.append(_done(vlm, p, self.text(len(self.prompts))))
        return out


def text_pdf(path, texts, size=(595, 842)):
    return write_pdf(path, texts, size, at=(60, 80))


def scanned_pdf(path, pictures, texts=()):
    """`texts` pages with a text layer, then a page that is only a picture for each of `pictures`."""
    return write_pdf(path, [*texts, *(("", picture) for picture in pictures)], (300, 400), at=(30, 50))


@pytest.fixture(scope="module")
def planner(ckpt_tiny) -> budget.Planner:
    return budget.planner_for(ckpt_tiny)


def _page(size=A4, name="doc.pdf", page=1):
    return tag(Image.new("RGB", size, "white"), name, page)


# ----------------------------------------------------------------------------- budget planning

def test_two_a4_pages_fit_with_the_answer_budget(planner):
    plan = planner.plan([user_message("What is the total amount due?", [_page(), _page(page=2)])],
                        system=None, answer_budget=1024)
    assert plan.full_grids == ((3, 3), (3, 3))  # what full detail would take: 4000+ tokens
    assert plan.prompt_tokens + 1024 <= CONTEXT
    assert plan.grids == ((2, 3), (2, 3))  # the most detail that fits, the same for like pages
    assert [img.grid for img in plan.prepared.images] == list(plan.grids)  # prepared as planned
    note = plan.note(["doc.pdf page 1", "doc.pdf page 2"])
    assert "doc.pdf page 1 3x3 -> 2x3" in note and "doc.pdf page 2 3x3 -> 2x3" in note and "\n" not in note


def test_a_prompt_that_fits_keeps_full_tiling(planner):
    plan = planner.plan([user_message("Read it.", [_page()])], system=None, answer_budget=1024)
    assert plan.grids == plan.full_grids == ((3, 3),) and not plan.reduced and plan.note(["x"]) is None


def test_the_largest_image_shrinks_first(planner):
    small = Image.new("RGB", (768, 384))  # 2x1: 211 + 14 * 29 = 617 tokens
    plan = planner.plan([user_message("Compare.", [small, _page()])], system=None, answer_budget=1500)
    assert plan.full_grids == ((2, 1), (3, 3))
    # one step sufficed, and it was the page's (2017 tokens) to its best layout of at most 8 tiles
    one_step = budget.tiling_grid(A4, planner.processor.settings, True, 8)
    assert plan.grids == ((2, 1), one_step) and one_step != (3, 3)
    assert plan.prompt_tokens + 1500 <= CONTEXT


def test_max_tiles_caps_every_image(planner):
    plan = planner.plan([user_message("Read.", [_page()])], system=None, answer_budget=64, max_tiles=2)
    (grid,) = plan.grids
    assert grid[0] * grid[1] <= 2 and plan.prepared.images[0].grid == grid
    one = planner.plan([user_message("Read.", [_page()])], system=None, answer_budget=64, max_tiles=1)
    assert one.grids == ((1, 1),) and one.prepared.num_image_tokens == [421]


def test_a_prompt_that_cannot_fit_untiled_is_refused_with_its_numbers(planner):
    with pytest.raises(ContextTooLongError) as err:
        planner.plan([user_message("Read.", [_page()])], system=None, answer_budget=3900)
    message = str(err.value)
    assert "images 421 untiled" in message and "3900" in message and "4096" in message
    assert "lower --max-tokens to at most" in message


def test_many_pages_are_refused_with_a_count(planner):
    pages_ = [_page(page=i) for i in range(1, 11)]  # 10 pages: untiled, 421 tokens each
    with pytest.raises(ContextTooLongError) as err:
        planner.plan([user_message("What?", pages_)], system=None, answer_budget=1024)
    assert "10 images untiled 4210" in str(err.value) and "fewer images (--pages)" in str(err.value)


def test_ask_warns_once_with_the_grids_and_reports_them(monkeypatch, ckpt_tiny, tmp_path):
    """The README's `ask invoice.pdf ... --pages 1-2` on two A4 pages at the default --max-tokens."""
    pdf = text_pdf(tmp_path / "invoice.pdf", ["Invoice", "Total due: 120 EUR"])
    gen = Generations(monkeypatch)
    r = run(monkeypatch, "ask", "-m", ckpt_tiny, "--dtype", "float32", "--json", pdf, "What is the total amount due?",
            "--pages", "1-2")
    assert r.code == 0, r.stderr
    (rec,) = r.json_lines
    assert [img["grid"] for img in rec["images"]] == [[2, 3], [2, 3]]
    assert [img["full_grid"] for img in rec["images"]] == [[3, 3], [3, 3]]
    assert rec["usage"]["prompt_tokens"] + 1024 <= CONTEXT and rec["pages"] == [1, 2]
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "1024-token answer" in warnings[0]
    assert f"{pdf} page 1 3x3 -> 2x3" in warnings[0] and f"{pdf} page 2 3x3 -> 2x3" in warnings[0]
    assert gen.streamed == 1


def test_ocr_of_an_a4_page_keeps_full_detail_at_the_default_budget(monkeypatch, ckpt_tiny, tmp_path):
    """3x3 (2074 tokens) + 2048 overflows 4096 by 26: the default budget gives way, not the tiles."""
    pdf = text_pdf(tmp_path / "page.pdf", ["Some text"])
    gen = Generations(monkeypatch)
    r = run(monkeypatch, "ocr", "-m", ckpt_tiny, "--dtype", "float32", "--json", pdf)
    assert r.code == 0, r.stderr
    (rec,) = r.json_lines
    assert rec["images"][0]["grid"] == rec["images"][0]["full_grid"] == [3, 3]
    assert not [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    budget_ = rec["answer_budget"]
    assert 2048 - 2048 // 8 <= budget_ < 2048 and rec["usage"]["prompt_tokens"] + budget_ == CONTEXT
    assert gen.max_tokens == [budget_]  # what generation was asked for: the answer ends by "length", not "context"


def test_an_explicit_budget_is_kept_whole(planner):
    page = [user_message("Read.", [_page()])]
    flexible = planner.plan(page, system=None, answer_budget=2100, flexible=True)  # 2027 + 2100 > 4096
    fixed = planner.plan(page, system=None, answer_budget=2100)
    assert flexible.grids == ((3, 3),) and flexible.answer_budget == CONTEXT - flexible.prompt_tokens < 2100
    assert fixed.grids != ((3, 3),) and fixed.answer_budget == 2100
    # a default budget gives at most an eighth: two pages still lose tiles, with at most 1024 left
    two = planner.plan([user_message("Q?", [_page(), _page(page=2)])], system=None, answer_budget=1024, flexible=True)
    assert two.reduced and 896 <= two.answer_budget <= 1024 and two.prompt_tokens + two.answer_budget <= CONTEXT


@pytest.mark.parametrize("batch", ["1", "2"])
def test_ocr_of_like_pages_warns_once(monkeypatch, ckpt_tiny, tmp_path, batch):
    pdf = text_pdf(tmp_path / "doc.pdf", ["one", "two", "three"])
    Generations(monkeypatch)
    r = run(monkeypatch, "ocr", "-m", ckpt_tiny, "--dtype", "float32", "--max-tokens", "2500", "--batch", batch,
            "--json", pdf)
    assert r.code == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "each page 3x3 -> " in warnings[0] and "2500-token answer" in warnings[0]
    assert all(rec["usage"]["prompt_tokens"] + 2500 <= CONTEXT for rec in r.json_lines)
    assert [rec["page"] for rec in r.json_lines] == [1, 2, 3]


def test_max_tiles_option(monkeypatch, ckpt_tiny, tmp_path):
    pdf = text_pdf(tmp_path / "page.pdf", ["Some text"])
    Generations(monkeypatch)
    r = run(monkeypatch, "ask", *model_args(ckpt_tiny), "--json", "--max-tiles", "2", pdf, "What?")
    assert r.code == 0, r.stderr
    w, h = r.json_lines[0]["images"][0]["grid"]
    assert w * h <= 2
    r = run(monkeypatch, "ask", *model_args(ckpt_tiny), "--max-tiles", "10", pdf, "What?")
    assert r.code == 2 and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["ocr", "ask"])
def test_refusal_comes_before_the_model_loads(monkeypatch, ckpt_tiny, tmp_path, command):
    pdf = text_pdf(tmp_path / "doc.pdf", ["one", "two", "three"])

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "load_weights", no_load)
    tail = [pdf] if command == "ocr" else [pdf, "What?", "--pages", "1-3"]
    r = run(monkeypatch, command, "-m", ckpt_tiny, "--max-tokens", "3800", *tail)
    assert_one_line_error(r, "prompt is", "untiled", "the answer may take 3800", "context holds 4096")


# ----------------------------------------------------------------------------- page selection

def test_bm25_ranks_the_page_with_the_question_words():
    docs = ["shipping terms and conditions", "the total amount due is 120 EUR", "contact us", ""]
    scores = pages.bm25("What is the total amount due?", docs)
    assert scores.index(max(scores)) == 1 and scores[3] == 0
    assert pages.choose(scores) == [1]
    assert pages.choose([1.0, 0.0, 0.9]) == [0, 2]  # a close runner-up comes along, in page order
    assert pages.choose([1.0, 0.2, 0.4]) == [0]
    assert pages.choose([0.0, 0.0]) == [0]  # nothing matches: the first page


DISTRACTORS = ["Shipping terms: goods travel at the buyer's risk.", "Thank you for your order, we value it.",
               "Contact: support desk, Monday to Friday.", "Warranty: two years on parts and labour.",
               "Returns are accepted within thirty days."]


def test_ask_without_pages_picks_the_answer_page(monkeypatch, ckpt_tiny, tmp_path):
    texts = DISTRACTORS[:3] + ["Invoice summary: the total amount due is 120 EUR."] + DISTRACTORS[3:]
    pdf = text_pdf(tmp_path / "invoice.pdf", texts, size=(300, 400))
    gen = Generations(monkeypatch)
    r = run(monkeypatch, "ask", *model_args(ckpt_tiny), "--json", pdf, "What is the total amount due?")
    assert r.code == 0, r.stderr
    (rec,) = r.json_lines
    assert rec["pages"] == [4] and [img["page"] for img in rec["images"]] == [4]
    assert rec["page_selection"]["method"] == "bm25" and len(rec["page_selection"]["scores"]) == 6
    assert f"asking about {pdf} page 4" in r.stderr
    assert gen.streamed == 1 and len(gen.prompts[0].images) == 1  # one page, tiled
    # --pages always wins
    r = run(monkeypatch, "ask", *model_args(ckpt_tiny), "--json", pdf, "What is the total amount due?", "--pages", "2")
    assert r.code == 0 and r.json_lines[0]["pages"] == [2] and "asking about" not in r.stderr
    assert "page_selection" not in r.json_lines[0]


def test_scanned_pages_are_read_once_and_their_text_kept(monkeypatch, ckpt_tiny, tmp_path):
    pictures = [write_image(tmp_path / f"scan{i}.png", 150, 200, seed=7 + i) for i in range(2)]
    pdf = scanned_pdf(tmp_path / "scans.pdf", pictures, texts=["Total amount due: 99 EUR, payable now.", DISTRACTORS[0]])
    monkeypatch.setenv("DSVL2_CACHE", str(tmp_path / "cache"))
    gen = Generations(monkeypatch)
    args = [*model_args(ckpt_tiny), "--json", "--dpi", "36", pdf, "What is the total amount due?"]
    r = run(monkeypatch, "ask", *args)
    assert r.code == 0, r.stderr
    assert gen.streamed + gen.batched == 3  # two scanned pages read, then the answer
    assert r.json_lines[0]["page_selection"]["ocr_pages"] == 2 and r.json_lines[0]["pages"] == [1]
    assert len(list(settings.prompt_cache_dir().glob("page-text/*.txt"))) == 2  # kept with the prompt cache
    gen2 = Generations(monkeypatch)
    r = run(monkeypatch, "ask", *args)
    assert r.code == 0, r.stderr
    assert gen2.streamed + gen2.batched == 1  # the answer only: the pages' text came from the cache


# ---------------------------------------------------------------------------------- batched OCR

def test_batch_equals_one_by_one_in_float32(vlm, tmp_path):
    paths = [write_image(tmp_path / f"p{i}.png", 60 + 10 * i, 50, seed=i) for i in range(3)]
    sources = [Source(str(p), None, (lambda p=p: tag(Image.open(p).convert("RGB"), str(p)))) for p in paths]
    opts = tasks.Options(max_tokens=6)

    def read(batch):
        events = tasks.read_pages(vlm, sources, tasks.OCR_PROMPTS["text"], opts, batch=batch)
        return [(e.record["input"], e.record["token_ids"]) for e in events if isinstance(e, tasks.Answer)]

    one = read(1)
    assert [name for name, _ in one] == [str(p) for p in paths] and all(len(ids) for _, ids in one)
    assert read(3) == one
    assert read(2) == one  # an uneven last batch too


def test_batched_ocr_prints_pages_in_order(monkeypatch, ckpt_tiny, tmp_path):
    pdf = text_pdf(tmp_path / "doc.pdf", ["a", "b", "c"], size=(200, 250))
    gen = Generations(monkeypatch, text=lambda n: f"text {n}")
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny), "--dpi", "36", "--batch", "2", pdf)
    assert r.code == 0, r.stderr
    assert r.stdout == (f"==> {pdf} page 1 <==\ntext 1\n\n==> {pdf} page 2 <==\ntext 2\n\n"
                        f"==> {pdf} page 3 <==\ntext 3\n")
    assert gen.batches == 2 and gen.streamed == 0
    Generations(monkeypatch, text=lambda n: f"text {n}")
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny), "--dpi", "36", "--batch", "2", "--json", pdf)
    assert [(rec["page"], rec["text"]) for rec in r.json_lines] == [(1, "text 1"), (2, "text 2"), (3, "text 3")]


def test_interrupted_batched_run_leaves_whole_pages_and_resumes(monkeypatch, ckpt_tiny, tmp_path):
    pdf = text_pdf(tmp_path / "doc.pdf", ["a", "b", "c", "d"], size=(200, 250))
    out = tmp_path / "out"
    Generations(monkeypatch, interrupt_at_batch=2)
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny), "--dpi", "36", "--batch", "2", "--out", out, pdf)
    assert r.code == 130, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["doc-p001.txt", "doc-p002.txt"]  # no partial files
    assert (out / "doc-p002.txt").read_text() == "page text\n"
    gen = Generations(monkeypatch)
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny), "--dpi", "36", "--batch", "2", "--out", out,
            "--skip-existing", pdf)
    assert r.code == 0, r.stderr
    assert gen.batched == 2  # only pages 3 and 4 were read again
    assert sorted(p.name for p in out.iterdir()) == [f"doc-p00{i}.txt" for i in range(1, 5)]


def test_default_batch_follows_memory(vlm, monkeypatch):
    from dsvl2_cli.engine.loading import fit

    plenty = fit.Available(2**40, "test", {})
    monkeypatch.setattr(fit, "available_memory", lambda device: plenty)
    assert tasks.default_ocr_batch(vlm, 50) == documents.OCR_BATCH_CPU
    assert tasks.default_ocr_batch(vlm, 2) == 2
    monkeypatch.setattr(fit, "available_memory", lambda device: fit.Available(1, "test", {}))
    assert tasks.default_ocr_batch(vlm, 50) == 1


# ------------------------------------------------------------------------------------ formats

def test_format_json_gives_a_record_per_page_with_boxes(monkeypatch, ckpt_tiny, tmp_path):
    pdf = text_pdf(tmp_path / "doc.pdf", ["a", "b"], size=(200, 250))
    answers = {1: "<|ref|>Total<|/ref|><|det|>[[0, 0, 999, 499]]<|/det|> 120 EUR", 2: "plain words"}
    Generations(monkeypatch, text=lambda n: answers[n])
    out = tmp_path / "out"
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny), "--dpi", "72", "--batch", "1", "-f", "json", "--out", out, pdf)
    assert r.code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["doc-p001.json", "doc-p002.json"]
    first, second = (json.loads((out / f"doc-p00{i}.json").read_text()) for i in (1, 2))
    assert first["page"] == 1 and first["text"] == "Total 120 EUR"
    assert [b["xyxy"] for b in first["boxes"]] == [[0, 0, 200, 125]] and first["boxes"][0]["label"] == "Total"
    assert second["boxes"] == [] and second["text"] == "plain words"
    assert tasks.OCR_PROMPTS["json"] in tasks.OCR_PROMPTS.values()


def test_format_markdown_keeps_the_models_tables(monkeypatch, ckpt_tiny, tmp_path):
    table = "| item | price |\n|---|---|\n| tea | 3 |"
    Generations(monkeypatch, text=lambda n: table)
    pdf = text_pdf(tmp_path / "doc.pdf", ["a"], size=(200, 250))
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny), "--dpi", "72", "-f", "markdown", "--out", tmp_path / "o", pdf)
    assert r.code == 0, r.stderr
    assert (tmp_path / "o" / "doc-p001.md").read_text() == table + "\n"
