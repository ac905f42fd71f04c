"""The task layer (app/tasks.py) on its own: no CLI, no terminal, no model weights. A stand-in
model answers through a replaced stream_generate, so these tests check what the tasks yield and
record, not what a model says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from dsvl2_cli.app import backends, budget, tasks
from dsvl2_cli.app.inputs.sources import Source, image_origin, tag
from dsvl2_cli.engine.generate import Done, Prefilled, Stats, Token
from dsvl2_cli.errors import InputError

REPO = Path(__file__).resolve().parents[1]


class FakeModel:
    """What the tasks use of a loaded model: a name and prepare()."""

    name = "fake/model"

    def __init__(self):
        self.prompts: list[str] = []

    def prepare(self, messages, system=None):
        self.prompts.append(messages[-1].content)
        n = len(messages[-1].images)
        return SimpleNamespace(images=[SimpleNamespace(grid=(2, 1), num_tokens=7)] * n, num_image_tokens=[7] * n)


class FakePlanner:
    """budget planning for FakeModel: the prompt as FakeModel prepares it, always fitting."""

    def __init__(self, vlm):
        self.vlm = vlm

    def plan(self, messages, *, system, answer_budget, max_tiles=None, flexible=False):
        prepared = self.vlm.prepare(messages, system=system)
        grids = tuple(img.grid for img in prepared.images)
        return budget.Plan(prepared, grids, grids, answer_budget, 4096)


@pytest.fixture(autouse=True)
def _fake_planning(monkeypatch):
    monkeypatch.setattr(budget, "loaded_planner", FakePlanner)


def answering(text: str):
    def fake(vlm, prepared, config=None, prompt_cache=None):
        yield Prefilled(10, 0, 7, 0.01)
        yield Token(1, text)
        yield Done("eos", f" {text} ", (1, 2), Stats(10, 0, 7, 2, 0.5, 20.0, 4.0, 0))
    return fake


@pytest.fixture
def answer_is(monkeypatch):
    return lambda text: monkeypatch.setattr(backends, "stream_generate", answering(text))


def test_tasks_need_no_terminal_libraries():
    code = ("import sys, dsvl2_cli.app.tasks; "
            "print(sorted(m for m in ('rich', 'typer', 'dsvl2_cli.app.terminal.cli', 'dsvl2_cli.app.terminal.render') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_read_pages_yields_results_and_errors_in_order(answer_is):
    answer_is("page text")

    def broken():
        raise InputError("doc.pdf: page 2 cannot be rendered")

    page = lambda: Image.new("RGB", (40, 30))  # noqa: E731
    sources = [Source("doc.pdf", 1, page, 3), Source("doc.pdf", 2, broken, 3), Source("scan.png", None, page)]
    vlm = FakeModel()
    events = list(tasks.read_pages(vlm, sources, tasks.OCR_PROMPTS["text"], tasks.Options()))

    kinds = [type(e).__name__ for e in events]
    assert kinds == ["PageStarted", "Prefilled", "Token", "Done", "Answer", "PageFailed",
                     "PageStarted", "Prefilled", "Token", "Done", "Answer"]
    started = [e.source for e in events if isinstance(e, tasks.PageStarted)]
    assert started == [sources[0], sources[2]]
    failed = next(e for e in events if isinstance(e, tasks.PageFailed))
    assert failed.source is sources[1] and failed.message == "doc.pdf: page 2 cannot be rendered"
    answers = [e for e in events if isinstance(e, tasks.Answer)]
    assert [(a.record["input"], a.record["page"]) for a in answers] == [("doc.pdf", 1), ("scan.png", None)]
    assert answers[0].text == "page text" and answers[0].record["images"][0]["size"] == [40, 30]
    assert len(vlm.prompts) == 2  # the failed page never reached the model
    assert all(p.endswith(tasks.OCR_PROMPTS["text"]) for p in vlm.prompts)


def test_read_pages_on_a_server_reads_one_page_at_a_time():
    """A server plans, tiles and batches itself: no planning here, no batch, the same events."""
    asked = []

    class Server(backends.Backend):
        name = "server/model"

        def prepare(self, messages, system):
            return backends.Prompt(tuple(messages), system)

        def answer(self, prompt, config, *, keep_special=False):
            asked.append(config.max_tokens)
            yield from answering("remote text")(None, None)

    page = lambda: Image.new("RGB", (40, 30))  # noqa: E731
    sources = [Source("doc.pdf", p, page, 2) for p in (1, 2)]
    events = list(tasks.read_pages(Server(), sources, tasks.OCR_PROMPTS["text"], tasks.Options(), batch=4))
    assert [type(e).__name__ for e in events] == ["PageStarted", "Prefilled", "Token", "Done", "Answer"] * 2
    assert asked == [tasks.task_defaults("ocr").max_tokens] * 2
    answers = [e for e in events if isinstance(e, tasks.Answer)]
    assert [a.record["page"] for a in answers] == [1, 2] and answers[0].record["images"][0]["grid"] is None


def test_page_failure_names_the_page_when_the_error_does_not():
    src = Source("doc.pdf", 4, lambda: None, 9)
    assert tasks.PageFailed(src, InputError("context too long")).message == "doc.pdf page 4: context too long"


def test_answer_record_keys_usage_and_provenance(answer_is):
    answer_is("a cat")
    imgs = [tag(Image.new("RGB", (8, 6)), "a.png"), tag(Image.new("RGB", (5, 5)), "b.png")]
    *_, answer = tasks.ask(FakeModel(), imgs, "What is it?", tasks.Options())
    r = answer.record
    assert list(r) == ["model", "input", "page", "images", "text", "finish_reason", "usage", "timings", "token_ids",
                       "answer_budget", "pages"]
    assert r["pages"] == [None, None] and r["answer_budget"] == tasks.MAX_TOKENS["chat"]
    assert r["input"] is None and r["page"] is None  # two files: neither is "the" input
    assert r["images"] == [{"input": "a.png", "page": None, "size": [8, 6], "grid": [2, 1], "tokens": 7, "full_grid": [2, 1]},
                           {"input": "b.png", "page": None, "size": [5, 5], "grid": [2, 1], "tokens": 7, "full_grid": [2, 1]}]
    assert r["text"] == "a cat" and r["token_ids"] == [1, 2]
    assert r["usage"] == {"prompt_tokens": 10, "cached_tokens": 0, "image_tokens": [7, 7], "generated_tokens": 2}
    assert image_origin(imgs[0]).as_json() == {"input": "a.png", "page": None, "size": [8, 6]}


def test_ground_answer_in_pixels_with_its_record(answer_is):
    raw = ("<|ref|>cup<|/ref|><|det|>[[0, 0, 499, 999]]<|/det|> and "
           "<|ref|>dog<|/ref|><|det|>[[999, 0, 0, 999], [1, 2]]<|/det|>")
    answer_is(raw)  # the streamed text carries the grounding tags
    img = tag(Image.new("RGB", (1000, 500)), "photo.jpg")
    events = list(tasks.ground(FakeModel(), img, tasks.ground_prompt("things", caption=False), tasks.Options()))
    answer = events[-1]
    assert isinstance(answer, tasks.GroundAnswer) and not any(isinstance(e, tasks.Answer) for e in events[:-1])
    assert [(b.label, b.xyxy, b.ref_index) for b in answer.boxes] == [("cup", (0, 0, 499, 500), 0),
                                                                      ("dog", (0, 0, 1000, 500), 1)]
    r = answer.record
    assert r["image_size"] == [1000, 500] and r["raw"] == raw and r["text"] == "cup and dog"
    assert r["boxes"][0] == {"label": "cup", "box_999": [0, 0, 499, 999], "xyxy": [0, 0, 499, 500],
                             "xywh": [0, 0, 499, 500]}
    assert any("not a whole number of boxes" in p for p in r["problems"])  # the [1, 2] was skipped
    assert answer.problems == tuple(r["problems"])
    assert r["input"] == "photo.jpg"


def test_ground_prompts():
    assert tasks.ground_prompt(" the red cup ", caption=False) == "<image>\n<|ref|>the red cup<|/ref|>."
    assert tasks.ground_prompt(None, caption=True) == "<image>\n<|grounding|>Describe the image in detail."


def test_ocr_targets_skip_existing_and_refuse_clashes(tmp_path):
    page = lambda: None  # noqa: E731
    sources = [Source("a/doc.pdf", p, page, 12) for p in (1, 2, 3)]
    (tmp_path / "doc-p002.txt").write_text("done")
    kept, targets, skipped = tasks.ocr_targets(sources, tmp_path, "txt", skip_existing=True)
    assert kept == [sources[0], sources[2]] and skipped == 1
    assert targets == [tmp_path / "doc-p001.txt", tmp_path / "doc-p003.txt"]
    assert tasks.ocr_targets(sources, None, "txt") == (sources, [None] * 3, 0)
    with pytest.raises(InputError, match="would both be written to"):
        tasks.ocr_targets([Source("a/x.png", None, page), Source("b/x.png", None, page)], tmp_path, "txt")
    assert tasks.ocr_extension("markdown", False) == "md" and tasks.ocr_extension("markdown", True) == "json"


def test_options_limits_per_task_and_sampling_note():
    opts = tasks.Options()
    assert [opts.generation(t).max_tokens for t in ("chat", "ocr", "ground")] == [1024, 2048, 1024]
    assert opts.generation("a-new-task").max_tokens == tasks.task_defaults("a-new-task").max_tokens == 1024
    assert tasks.task_defaults("ocr").prompts is tasks.OCR_PROMPTS
    assert tasks.Options(max_tokens=7).generation("ocr").max_tokens == 7
    assert opts.sampling_note() is None
    assert "above 0.7" in tasks.Options(temperature=0.9).sampling_note()
