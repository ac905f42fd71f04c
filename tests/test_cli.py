"""The `dsvl2` command line, run in-process through `cli.main` (its exit-code policy included)
against the tiny random fixture checkpoints. Loaded models are cached per path so each fixture
loads once. Outputs are random tokens: these tests check behaviour, not answers."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pymupdf
import pytest
import typer
from helpers import write_pdf
from PIL import Image

from dsvl2_cli.app import backends
from dsvl2_cli.app.terminal import cli, cli_options
from dsvl2_cli.app.terminal.pictures import colour
from dsvl2_cli.dev.synthetic import write_image
from dsvl2_cli.engine.generate import Done, Prefilled, Stats, Token

_MODELS: dict = {}
_real_load_weights = cli.load_weights

ANSWER_KEYS = {"model", "input", "page", "images", "text", "finish_reason", "usage", "timings", "token_ids"}


def _cached_load_weights(path, *, device, dtype, quantize=None, on_progress=None, vision_int8=False):
    key = (str(path), device, dtype, quantize, vision_int8)
    if key not in _MODELS:
        _MODELS[key] = _real_load_weights(path, device=device, dtype=dtype, quantize=quantize,
                                          on_progress=on_progress, vision_int8=vision_int8)
    return _MODELS[key]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    monkeypatch.setattr(cli, "load_weights", _cached_load_weights)
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("DSVL2_MODEL", "DSVL2_DEBUG", "DSVL2_SERVER", "DSVL2_API_KEY", "DSVL2_MEMORY_LIMIT",
                "DSVL2_PROMPT_CACHE_BYTES", "NO_COLOR", "FORCE_COLOR"):  # a user's settings must not steer the tests
        monkeypatch.delenv(var, raising=False)


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.splitlines()]


def run(monkeypatch, *args, input: bytes | str = b"", env: dict | None = None) -> Run:
    """cli.main(args) with stdin/stdout/stderr replaced by pipes-like (non-terminal) streams."""
    data = input.encode() if isinstance(input, str) else input
    out_b, err_b = io.BytesIO(), io.BytesIO()
    stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    stdout = io.TextIOWrapper(out_b, encoding="utf-8", write_through=True)
    stderr = io.TextIOWrapper(err_b, encoding="utf-8", write_through=True)
    with monkeypatch.context() as m:
        m.setattr(sys, "stdin", stdin)
        m.setattr(sys, "stdout", stdout)
        m.setattr(sys, "stderr", stderr)
        for key, value in (env or {}).items():
            m.setenv(key, value)
        code = cli.main([str(a) for a in args])
        stdout.flush()
        stderr.flush()
        result = Run(code, out_b.getvalue().decode(), err_b.getvalue().decode())
    return result


def model_args(path: Path, max_tokens: int = 4) -> list[str]:
    return ["-m", str(path), "--dtype", "float32", "--max-tokens", str(max_tokens)]


def assert_clean(r: Run) -> None:
    """Not a terminal: no escape codes anywhere, no traceback."""
    assert "\x1b[" not in r.stdout and "\x1b[" not in r.stderr
    assert "Traceback" not in r.stderr


def assert_one_line_error(r: Run, *needles: str) -> None:
    assert r.code == 1, r.stderr
    assert r.stdout == ""
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_images")
    return {"a": write_image(root / "a.png", 64, 48, seed=1), "b": write_image(root / "b.png", 40, 60, seed=2),
            "c": write_image(root / "c.png", 50, 50, seed=3)}


@pytest.fixture(scope="module")
def doc_pdf(tmp_path_factory, images) -> Path:
    """Four pages, each with a line of text and an image."""
    return write_pdf(tmp_path_factory.mktemp("cli_pdf") / "report.pdf",
                     [(f"Page {i + 1}: quarterly numbers", images["a"]) for i in range(4)], (300, 400), fontsize=14,
                     image_rect=(30, 80, 200, 200))


# ------------------------------------------------------------------------------------- chat

def test_chat_one_shot(monkeypatch, ckpt_tiny, images):
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny), images["a"], "What is this?")
    assert r.code == 0, r.stderr
    assert r.stdout.strip() and r.stdout.endswith("\n")
    assert "prompt tokens" in r.stderr and "tok/s" in r.stderr  # timings on stderr
    assert "prompt tokens" not in r.stdout
    assert_clean(r)


def test_chat_quiet_has_no_status(monkeypatch, ckpt_tiny, images):
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny, 2), "-q", images["a"], "hi")
    assert r.code == 0 and r.stdout.strip()
    assert "prompt tokens" not in r.stderr and "loaded" not in r.stderr


@pytest.mark.parametrize("family", ["tiny-like", "small-like", "vl2-like"])
def test_chat_json_for_every_family(monkeypatch, request, family, images):
    path = request.getfixturevalue({"tiny-like": "ckpt_tiny", "small-like": "ckpt_small",
                                    "vl2-like": "ckpt_vl2"}[family])
    r = run(monkeypatch, "chat", *model_args(path, 3), "--json", images["a"], "Describe.")
    assert r.code == 0, r.stderr
    (rec,) = r.json_lines
    assert set(rec) >= ANSWER_KEYS
    assert rec["input"] == str(images["a"]) and rec["page"] is None
    # a 64x48 image tiles 1x1 (421 tokens)
    assert rec["images"] == [{"input": str(images["a"]), "page": None, "size": [64, 48], "grid": [1, 1],
                              "tokens": 421}]
    assert rec["finish_reason"] in ("eos", "length") and len(rec["token_ids"]) == rec["usage"]["generated_tokens"]
    assert len(rec["usage"]["image_tokens"]) == 1 and rec["usage"]["prompt_tokens"] > rec["usage"]["image_tokens"][0]
    assert set(rec["timings"]) == {"time_to_first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s"}


def test_chat_prompt_from_stdin(monkeypatch, ckpt_tiny, images):
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny, 2), "--json", images["a"], input="Describe the picture.\n")
    assert r.code == 0, r.stderr
    assert len(r.json_lines) == 1


def test_chat_image_from_stdin(monkeypatch, ckpt_tiny, images):
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny, 2), "--json", "-", "What is it?",
            input=images["b"].read_bytes())
    assert r.code == 0, r.stderr
    (rec,) = r.json_lines
    assert rec["input"] == "-" and rec["images"][0]["size"] == [40, 60]


def test_chat_stdin_image_needs_a_prompt_argument(monkeypatch, ckpt_tiny, images):
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny), "-", input=images["b"].read_bytes())
    assert r.code == 2 and "prompt" in r.stderr


def test_chat_text_only(monkeypatch, ckpt_tiny):
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny, 2), "--json", "Hello there")
    assert r.code == 0, r.stderr
    (rec,) = r.json_lines
    assert rec["images"] == [] and rec["input"] is None and rec["usage"]["image_tokens"] == []


def test_chat_no_stream_prints_the_same_answer(monkeypatch, ckpt_tiny, images):
    a = run(monkeypatch, "chat", *model_args(ckpt_tiny, 5), images["a"], "hi")
    b = run(monkeypatch, "chat", *model_args(ckpt_tiny, 5), "--no-stream", images["a"], "hi")
    assert a.code == b.code == 0 and a.stdout == b.stdout  # greedy by default: reproducible


def test_chat_scripted_interactive(monkeypatch, ckpt_tiny, images):
    script = "\n".join([
        "What is in the image?",
        "And the colours?",                 # follow-up: reuses the cached prompt
        "/help",
        f"/image {images['b']}",
        "Compare them.",
        "/reset",
        "Once more.",
        "/bogus",
        "/quit",
        "never asked",
    ]) + "\n"
    # --no-cache: after /reset the saved image prompt would be reused from disk
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny, 3), "--no-cache", "-i", "--json", images["a"], input=script)
    recs = r.json_lines
    assert len(recs) == 4, r.stderr
    assert [len(rec["images"]) for rec in recs] == [1, 1, 2, 1]
    assert recs[0]["usage"]["cached_tokens"] == 0
    assert recs[1]["usage"]["cached_tokens"] > recs[0]["usage"]["image_tokens"][0]  # image not re-encoded
    assert recs[2]["images"][1]["input"] == str(images["b"])
    assert recs[3]["usage"]["cached_tokens"] == 0                                  # /reset cleared the cache
    assert "/image PATH" in r.stderr                                               # /help
    assert "unknown command /bogus" in r.stderr
    assert r.code == 1  # the unknown command makes a scripted run fail
    assert_clean(r)


def test_chat_scripted_ends_at_eof_and_streams_text(monkeypatch, ckpt_tiny, images):
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny, 3), "-i", images["a"], input="first\n\nsecond\n")
    assert r.code == 0, r.stderr
    assert len([ln for ln in r.stdout.splitlines() if ln.strip()]) >= 2
    assert r.stderr.count("prompt tokens") == 2


def test_chat_interactive_bad_image_command_keeps_going(monkeypatch, ckpt_tiny, images, tmp_path):
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny, 2), "-i", "--json",
            input=f"/image {tmp_path / 'nope.png'}\nhello\n")
    assert "nope.png: no such file" in r.stderr
    assert len(r.json_lines) == 1 and r.code == 1


def test_three_images_warn_about_tiling(monkeypatch, ckpt_tiny, images):
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny, 2), "--json", images["a"], images["b"], images["c"], "hi")
    assert r.code == 0, r.stderr
    assert "without tiling" in r.stderr
    assert r.json_lines[0]["usage"]["image_tokens"] == [421, 421, 421]


def test_bad_bf16_products_setting_is_one_line_before_loading(monkeypatch, ckpt_tiny, images):
    """A DSVL2_BF16_PRODUCTS typo: one line naming the variable and its choices, exit 1, before
    any weight is read (the memory plan asks for it first)."""
    def never(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(cli, "load_weights", never)
    r = run(monkeypatch, "chat", "-m", ckpt_tiny, "--dtype", "bfloat16", images["a"], "hi",
            env={"DSVL2_BF16_PRODUCTS": "fp32"})
    assert r.code == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1] == "error: DSVL2_BF16_PRODUCTS=fp32: expected one of auto, native, float32"
    assert_clean(r)


def test_ctrl_c_flushes_what_was_generated(monkeypatch, ckpt_tiny, images):
    def interrupted(vlm, prepared, config=None, prompt_cache=None):
        yield Prefilled(10, 0, 0, 0.01)
        yield Token(5, "partial answer")
        raise KeyboardInterrupt

    monkeypatch.setattr("dsvl2_cli.app.backends.stream_generate", interrupted)
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny), images["a"], "hi")
    assert r.code == 130
    assert r.stdout == "partial answer\n"
    assert "Traceback" not in r.stderr


# -------------------------------------------------------------------------------------- ocr

def test_ocr_pages_to_stdout_with_separators(monkeypatch, ckpt_tiny, doc_pdf):
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 3), "--dpi", "36", "--pages", "1,3-4", doc_pdf)
    assert r.code == 0, r.stderr
    headers = [ln for ln in r.stdout.splitlines() if ln.startswith("==> ")]
    assert headers == [f"==> {doc_pdf} page {p} <==" for p in (1, 3, 4)]
    assert "3 of 3 pages read" in r.stderr
    assert_clean(r)


def test_ocr_json_lines(monkeypatch, ckpt_tiny, doc_pdf, images):
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 2), "--dpi", "36", "--json", "-p", "2-", doc_pdf, images["a"])
    assert r.code == 0, r.stderr
    recs = r.json_lines
    assert [(rec["input"], rec["page"]) for rec in recs] == [(str(doc_pdf), 2), (str(doc_pdf), 3),
                                                             (str(doc_pdf), 4), (str(images["a"]), None)]
    assert all(set(rec) >= ANSWER_KEYS for rec in recs)
    assert recs[0]["images"][0]["size"] == [150, 200]  # 300x400 pt at 36 dpi


def test_ocr_out_dir(monkeypatch, ckpt_tiny, doc_pdf, tmp_path):
    out = tmp_path / "pages"
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 3), "--dpi", "36", "-f", "markdown", "--out", out, doc_pdf)
    assert r.code == 0, r.stderr
    assert r.stdout == ""
    names = sorted(p.name for p in out.iterdir())
    assert names == ["report-p001.md", "report-p002.md", "report-p003.md", "report-p004.md"]  # no temp files
    assert all((out / n).read_text().endswith("\n") for n in names)
    # resume: existing pages are skipped, a missing one is written again
    (out / "report-p002.md").unlink()
    before = (out / "report-p001.md").stat().st_mtime_ns
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 3), "--dpi", "36", "-f", "markdown", "--out", out,
            "--skip-existing", doc_pdf)
    assert r.code == 0 and "skipping 3 page(s)" in r.stderr
    assert (out / "report-p002.md").exists() and (out / "report-p001.md").stat().st_mtime_ns == before


def test_ocr_out_json_files(monkeypatch, ckpt_tiny, images, tmp_path):
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 2), "--json", "-o", tmp_path, images["a"])
    assert r.code == 0, r.stderr
    rec = json.loads((tmp_path / "a.json").read_text())
    assert set(rec) >= ANSWER_KEYS


def test_ocr_custom_prompt_changes_the_prompt(monkeypatch, ckpt_tiny, images):
    a = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 2), "--json", images["a"]).json_lines[0]
    b = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 2), "--json", "-P", "Hi.", images["a"]).json_lines[0]
    assert b["usage"]["prompt_tokens"] < a["usage"]["prompt_tokens"]


def test_ocr_pdf_from_stdin(monkeypatch, ckpt_tiny, doc_pdf):
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 2), "--dpi", "36", "--json", "-p", "4", "-",
            input=doc_pdf.read_bytes())
    assert r.code == 0, r.stderr
    assert [(rec["input"], rec["page"]) for rec in r.json_lines] == [("-", 4)]


def test_ocr_bad_pages_and_encrypted_pdf(monkeypatch, ckpt_tiny, doc_pdf, tmp_path):
    assert_one_line_error(run(monkeypatch, "ocr", *model_args(ckpt_tiny), "--pages", "5-2", doc_pdf), "4 pages")
    assert_one_line_error(run(monkeypatch, "ocr", *model_args(ckpt_tiny), "--pages", "9", doc_pdf), "4 pages")
    secret = tmp_path / "secret.pdf"
    doc = pymupdf.open(str(doc_pdf))
    doc.save(str(secret), encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="pw", owner_pw="owner")
    doc.close()
    assert_one_line_error(run(monkeypatch, "ocr", *model_args(ckpt_tiny), secret), "--password", "secret.pdf")
    assert_one_line_error(run(monkeypatch, "ocr", *model_args(ckpt_tiny), "--password", "x", secret),
                          "wrong password")
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 2), "--password", "pw", "--dpi", "36", "-p", "1", secret)
    assert r.code == 0, r.stderr


def test_ocr_corrupt_pdf(monkeypatch, ckpt_tiny, doc_pdf, tmp_path):
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(doc_pdf.read_bytes()[:150])
    assert_one_line_error(run(monkeypatch, "ocr", *model_args(ckpt_tiny), bad), "broken.pdf", "corrupt")


# -------------------------------------------------------------------------------------- ask

def test_ask_two_pages(monkeypatch, ckpt_tiny, doc_pdf):
    r = run(monkeypatch, "ask", *model_args(ckpt_tiny, 3), "--dpi", "36", "--json", doc_pdf,
            "What is the total?", "--pages", "2-3")
    assert r.code == 0, r.stderr
    (rec,) = r.json_lines
    assert rec["input"] == str(doc_pdf) and rec["page"] is None
    assert [img["page"] for img in rec["images"]] == [2, 3]
    assert "without tiling" not in r.stderr


def test_ask_three_pages_warns(monkeypatch, ckpt_tiny, doc_pdf):
    r = run(monkeypatch, "ask", *model_args(ckpt_tiny, 2), "--dpi", "36", doc_pdf, "Summarise.", "--pages", "1-3")
    assert r.code == 0, r.stderr
    assert "without tiling" in r.stderr and "--pages" in r.stderr
    assert r.stdout.strip()


def test_ask_image_of_a_page(monkeypatch, ckpt_tiny, images):
    r = run(monkeypatch, "ask", *model_args(ckpt_tiny, 2), "--json", images["a"], "What does it say?")
    assert r.code == 0, r.stderr
    assert r.json_lines[0]["page"] is None


# ----------------------------------------------------------------------------------- ground

GROUNDED = ("<|ref|>the red cup<|/ref|><|det|>[[100, 200, 500, 600], [600, 100, 900, 300]]<|/det|>"
            "<|ref|>a dog<|/ref|><|det|>[[10, 700, 200, 950]")  # no <|/det|>: real outputs do that


@pytest.fixture
def fake_answer(monkeypatch):
    """Make the model answer GROUNDED (as token ids of the real tokenizer)."""
    def fake(vlm, prepared, config=None, prompt_cache=None):
        ids = tuple(vlm.tokenizer.encode(GROUNDED))
        yield Prefilled(int(prepared.input_ids.numel()), 0, 421, 0.01)
        yield Token(ids[0], "")
        yield Done("eos", GROUNDED, ids, Stats(int(prepared.input_ids.numel()), 0, 421, len(ids), 0.1, 1e3, 50.0, 0))

    monkeypatch.setattr(backends, "stream_generate", fake)


def test_ground_json_and_save(monkeypatch, ckpt_tiny, tmp_path, fake_answer):
    img_path = write_image(tmp_path / "scene.png", 400, 300, seed=5)
    saved = tmp_path / "boxes.png"
    r = run(monkeypatch, "ground", *model_args(ckpt_tiny), "--json", "--save", saved, img_path, "the red cup")
    assert r.code == 0, r.stderr
    (rec,) = r.json_lines
    assert set(rec) >= ANSWER_KEYS | {"boxes", "image_size", "problems", "raw"}
    assert rec["image_size"] == [400, 300]
    assert "<|ref|>the red cup<|/ref|>" in rec["raw"] and "<|det|>" in rec["raw"]
    assert [b["label"] for b in rec["boxes"]] == ["the red cup", "the red cup", "a dog"]
    first = rec["boxes"][0]
    assert first["box_999"] == [100, 200, 500, 600]
    assert first["xyxy"] == [round(100 / 999 * 400), round(200 / 999 * 300), round(500 / 999 * 400),
                             round(600 / 999 * 300)]
    x1, y1, x2, y2 = first["xyxy"]
    assert first["xywh"] == [x1, y1, x2 - x1, y2 - y1]
    assert any("<|/det|>" in p for p in rec["problems"])  # reported, yet the dog's box is kept
    # the saved picture has the first label's colour on the box edges, the second label's on the dog
    out = Image.open(saved).convert("RGB")
    assert out.size == (400, 300)
    mid_y = (y1 + y2) // 2
    assert out.getpixel((x1, mid_y)) == colour(0) and out.getpixel((x2, mid_y)) == colour(0)
    assert out.getpixel(((x1 + x2) // 2, y2)) == colour(0)
    dx1, dy1, dx2, dy2 = rec["boxes"][2]["xyxy"]
    assert out.getpixel((dx1, (dy1 + dy2) // 2)) == colour(1)
    assert out.getpixel(((x1 + x2) // 2, mid_y)) == Image.open(img_path).convert("RGB").getpixel(
        ((x1 + x2) // 2, mid_y))  # inside the box: untouched


def test_ground_plain_text_lists_boxes(monkeypatch, ckpt_tiny, images, fake_answer):
    r = run(monkeypatch, "ground", *model_args(ckpt_tiny), images["a"], "the red cup")
    assert r.code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("the red cup: [") and lines[2].startswith("a dog: [")
    assert "grounding:" in r.stderr  # the malformed det is reported
    assert_clean(r)


def test_ground_caption_prompt(monkeypatch, ckpt_tiny, images):
    seen = {}
    real = backends.stream_generate

    def spy(vlm, prepared, config=None, prompt_cache=None):
        seen["text"] = vlm.tokenizer.decode(prepared.input_ids[~prepared.image_mask].tolist())
        return real(vlm, prepared, config, prompt_cache)

    monkeypatch.setattr(backends, "stream_generate", spy)
    r = run(monkeypatch, "ground", *model_args(ckpt_tiny, 4), "--caption", images["a"])
    assert r.code == 0, r.stderr
    assert "<|grounding|>Describe the image in detail." in seen["text"]
    r = run(monkeypatch, "ground", *model_args(ckpt_tiny, 4), images["a"], "the cat")
    assert "<|ref|>the cat<|/ref|>." in seen["text"]


def test_ground_real_model_without_boxes(monkeypatch, ckpt_tiny, images, tmp_path):
    r = run(monkeypatch, "ground", *model_args(ckpt_tiny, 4), "--save", tmp_path / "g.png", images["a"], "a cup")
    assert r.code == 0, r.stderr
    assert "no boxes" in r.stderr and (tmp_path / "g.png").exists()


def test_ground_usage_errors(monkeypatch, ckpt_tiny, images, tmp_path):
    r = run(monkeypatch, "ground", *model_args(ckpt_tiny), images["a"])
    assert r.code == 2 and "--caption" in r.stderr
    assert_one_line_error(run(monkeypatch, "ground", *model_args(ckpt_tiny), "--save", tmp_path / "x.nope",
                              images["a"], "cup"), "x.nope")


# ------------------------------------------------------------------------------ info, pull

def test_info(monkeypatch, ckpt_tiny, ckpt_vl2):
    r = run(monkeypatch, "info", "-m", ckpt_tiny, "--dtype", "float32")
    assert r.code == 0, r.stderr
    assert "multi-head, 4 heads" in r.stdout and "local folder" in r.stdout and "float32" in r.stdout
    assert "8 routed + 2 shared" in r.stdout
    r = run(monkeypatch, "info", "-m", ckpt_vl2, "--json")
    facts = r.json_lines[0]
    assert facts["architecture"]["attention"]["kind"] == "mla" and facts["dtype"] == "bfloat16"
    assert facts["architecture"]["experts"]["routed"] == 8
    # the counts equal the loaded model's tensors
    vlm = _cached_load_weights(ckpt_vl2, device="auto", dtype="float32")
    total = sum(p.numel() for p in vlm.model.parameters())
    assert facts["parameters"]["total"] == total
    assert 0 < facts["parameters"]["active"] < total
    lm = vlm.config.language
    assert facts["cache_bytes_per_token"] == (lm.kv_lora_rank + lm.qk_rope_head_dim) * lm.num_hidden_layers * 2
    assert facts["image_tokens_384"] == 421


def test_pull_offline_is_a_clear_error(monkeypatch):
    assert_one_line_error(run(monkeypatch, "pull", "deepseek-ai/deepseek-vl2-tiny"), "HF_HUB_OFFLINE")
    assert_one_line_error(run(monkeypatch, "pull", "not an id"), "not a Hugging Face id")


def test_pull_local_folder(monkeypatch, ckpt_tiny):
    r = run(monkeypatch, "pull", ckpt_tiny)
    assert r.code == 0 and r.stdout.strip() == str(Path(ckpt_tiny).resolve())


# ------------------------------------------------------------------------- errors and exit codes

def test_model_not_found(monkeypatch, images, tmp_path):
    assert_one_line_error(run(monkeypatch, "chat", "-m", tmp_path / "nowhere", images["a"], "hi"), "nowhere")
    r = run(monkeypatch, "chat", "-m", "someone/some-model", images["a"], "hi")
    assert_one_line_error(r, "someone/some-model", "dsvl2 pull")
    r = run(monkeypatch, "info", env={"DSVL2_MODEL": "someone/other-model"})  # the env var is honoured
    assert_one_line_error(r, "someone/other-model")
    r = run(monkeypatch, "info")
    assert_one_line_error(r, "deepseek-ai/deepseek-vl2-tiny")


def test_missing_and_unreadable_images(monkeypatch, ckpt_tiny, tmp_path):
    missing = tmp_path / "missing.png"
    assert_one_line_error(run(monkeypatch, "chat", *model_args(ckpt_tiny), missing, "hi"), str(missing))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not really a png")
    assert_one_line_error(run(monkeypatch, "chat", *model_args(ckpt_tiny), junk, "hi"), str(junk))
    assert_one_line_error(run(monkeypatch, "ocr", *model_args(ckpt_tiny), missing), str(missing))
    assert_one_line_error(run(monkeypatch, "ground", *model_args(ckpt_tiny), missing, "x"), str(missing))


@pytest.mark.parametrize("args", [
    ["chat", "--no-such-option"],
    ["chat", "--temperature", "5", "hi"],
    ["chat", "--dtype", "int3", "hi"],
    ["chat", "--max-tokens", "0", "hi"],
    ["ocr"],
    ["ask", "only-one-argument"],
    ["nonsense-command"],
    [],
])
def test_usage_errors_exit_2(monkeypatch, args):
    r = run(monkeypatch, *args)
    assert r.code == 2, (r.stdout, r.stderr)
    assert r.stdout == "" and "Traceback" not in r.stderr


def test_help_exits_0(monkeypatch):
    r = run(monkeypatch, "--help")
    assert r.code == 0 and "chat" in r.stdout and "ground" in r.stdout


def _declaration(param) -> tuple:
    """What a user sees of an option: its flags, default, help, panel, type and range, visibility."""
    kind = param.type
    return (param.opts, param.secondary_opts, param.default, param.help, getattr(param, "rich_help_panel", None),
            type(kind).__name__, getattr(kind, "choices", None), getattr(kind, "min", None), getattr(kind, "max", None),
            param.is_flag, param.hidden, param.metavar)


def test_model_commands_take_the_shared_options_declared_once():
    """The model commands (chat, ocr, ask, ground: those that generate) take every shared option
    (ground: no --no-stream; it shows whole answers), declared alike; serve and info take some of
    them, declared the same way."""
    shared = [name for name, _, _ in cli_options.SHARED]
    commands = typer.main.get_command(cli.app).commands
    model_commands = {name for name, c in commands.items() if any(p.name == "temperature" for p in c.params)}
    assert model_commands >= {"chat", "ocr", "ask", "ground"}  # a new one is checked as these are
    reference = {p.name: _declaration(p) for p in commands["chat"].params if p.name in shared}
    assert list(reference) == shared
    for name, command in commands.items():
        options = [p for p in command.params if p.param_type_name == "option"]
        taken = {p.name: _declaration(p) for p in options if p.name in shared}
        assert taken == {k: reference[k] for k in taken}, name
        if name in model_commands:
            assert list(taken) == [k for k in shared if not (name == "ground" and k == "no_stream")], name
    assert {p.name for p in commands["serve"].params} & set(shared) == {"model", "device", "dtype", "quantize",
                                                                         "vision_int8", "quiet", "api_key"}
    assert {p.name for p in commands["info"].params} & set(shared) == {"model", "device", "dtype", "quantize",
                                                                       "json_", "quiet"}


def test_serve_defaults_are_the_servers():
    """One set of defaults: `dsvl2 serve` (and `python -m dsvl2_cli.app.http.serve`) as ServeSettings."""
    from dsvl2_cli.app.inputs.images import MAX_PIXELS
    from dsvl2_cli.app.http.protocol import ServeSettings

    serve = typer.main.get_command(cli.app).commands["serve"]
    defaults = {p.name: p.default for p in serve.params}
    plain = ServeSettings()
    for name in ("host", "port", "allow_remote_images", "cache_bytes", "max_batch", "log_level", "max_images",
                 "max_image_pixels", "max_body_bytes"):
        assert defaults[name] == getattr(plain, name), name
    assert plain.max_image_pixels == MAX_PIXELS
    hidden = {p.name for p in serve.params if p.hidden}
    assert hidden == {"max_images", "max_image_pixels", "max_body_bytes", "exit_with_parent"}


def test_debug_shows_the_traceback(monkeypatch, ckpt_tiny, tmp_path):
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny), tmp_path / "missing.png", "hi", env={"DSVL2_DEBUG": "1"})
    assert r.code == 1
    assert "Traceback" in r.stderr and "error: " in r.stderr


def test_context_too_long_is_one_line(monkeypatch, ckpt_tiny, images, tmp_path):
    many = [write_image(tmp_path / f"{i}.png", 30, 30, seed=i) for i in range(10)]  # 10 x 421 > 4096
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny), *many, "hi")
    assert_one_line_error(r, "context")


def test_high_temperature_warns(monkeypatch, ckpt_tiny, images):
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny, 2), "-t", "0.9", "--seed", "1", images["a"], "hi")
    assert r.code == 0 and "model card" in r.stderr


def test_prompt_that_looks_like_a_file(monkeypatch, ckpt_tiny, images):
    # a last argument with spaces is a prompt even if it ends like a file name
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny, 2), "--json", images["a"], "what is in photo.png")
    assert r.code == 0, r.stderr
    # -P makes every argument an image
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny, 2), "--json", "-P", "hi", images["a"], images["b"])
    assert r.code == 0 and len(r.json_lines[0]["images"]) == 2
