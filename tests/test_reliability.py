"""Reliability: every input problem of the hardening issue, through the CLI (images and PDFs are
in test_reliability_media.py; the helpers in reliability_support.py).

A tool people put in shell pipelines must never crash with a traceback, hang, or write half a
result. Each test below is named after one item of the issue's list and runs `dsvl2` in-process
(test_cli.run) on bad files generated here, asserting the exit code, the one-line `error: ...`
(naming the file and what is wrong), an empty stdout on failure, and for `--out` that no partial
or temporary file is left. Library-level tests of the same inputs live in test_images.py,
test_pdf.py, test_weights.py, test_config.py and test_grounding.py; CLI tests that already cover
an item are referenced in a comment instead of repeated.

Map (issue item -> tests):
  images ......... test_image_bad_file_* (missing, directory, empty, truncated PNG/JPEG, text .png,
                   30000x30000 header), test_image_bomb_*, test_image_odd_but_readable* (animated
                   GIF/WebP, CMYK, 16-bit, palette, LA/RGBA, EXIF, 1x1, 1x5000), and pipes:
                   test_image_from_a_pipe_path, test_image_device_*, test_image_endless_stdin_*
  PDFs ........... test_pdf_*
  model folders .. test_model_folder_*
  prompts ........ test_prompt_*
  output ......... test_output_*
  parsing ........ test_parsing_* (+ hypothesis: test_grounding.py::test_never_raises_on_*,
                   test_pdf.py::test_parse_pages_raises_only_input_error / _on_range_like_soup)
  security ....... test_security_*
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reliability_support import (
    REPO,
    answer_events,
    fake_model_answer,
    files_in,
    leftovers,
    make_pdf,
    three_pages,  # noqa: F401 - fixture
)
from safetensors.torch import load_file, save_file
from subprocess_env import subprocess_env
from test_cli import _isolated, assert_clean, assert_one_line_error, model_args, run  # noqa: F401 - fixture

from dsvl2_cli.app import backends
from dsvl2_cli.app.terminal import cli
from dsvl2_cli.dev.synthetic import write_image
from dsvl2_cli.engine.loading import hub
from dsvl2_cli.engine.generate import Prefilled, Token

pytestmark = pytest.mark.usefixtures("_isolated")


# =========================================================================== model folders

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _no_config(folder: Path) -> tuple[str, str]:
    (folder / "config.json").unlink()
    return "config.json", "not found"


def _bad_json(folder: Path) -> tuple[str, str]:
    (folder / "config.json").write_text('{"model_type": "deepseek_vl_v2", ')
    return "config.json", "not valid JSON"


def _unknown_model_type(folder: Path) -> tuple[str, str]:
    raw = json.loads((folder / "config.json").read_text())
    raw["model_type"] = "mystery_vlm"
    (folder / "config.json").write_text(json.dumps(raw))
    return "config.json", "model_type is 'mystery_vlm'"


def _missing_shard(folder: Path) -> tuple[str, str]:
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    return shard.name, "missing"


def _truncated_header(folder: Path) -> tuple[str, str]:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:40])  # cut inside the JSON header
    return "model.safetensors", "not a readable safetensors file"


def _corrupted_header(folder: Path) -> tuple[str, str]:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8:8 + n] = b"{" + b"\xff" * (n - 1)  # same length, not JSON
    path.write_bytes(bytes(data))
    return "model.safetensors", "not a readable safetensors file"


def _header_claims_exabytes(folder: Path) -> tuple[str, str]:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    return "model.safetensors", "not a readable safetensors file"


def _truncated_data(folder: Path) -> tuple[str, str]:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "model.safetensors", "not a readable safetensors file"


def _wrong_shape(folder: Path) -> tuple[str, str]:
    _rewrite(folder / "model.safetensors", lambda t: t.update(image_newline=torch.zeros(3)))
    return "model.safetensors", "tensor image_newline in model.safetensors has shape [3]"


def _wrong_dtype(folder: Path) -> tuple[str, str]:
    def edit(t):
        t["view_seperator"] = torch.zeros_like(t["view_seperator"], dtype=torch.int32)
    _rewrite(folder / "model.safetensors", edit)
    # (weights.check_tensors names the folder, not model.safetensors, for a wrong dtype)
    return str(folder), "view_seperator in model.safetensors has dtype I32"


def _missing_tensor(folder: Path) -> tuple[str, str]:
    _rewrite(folder / "model.safetensors", lambda t: t.pop("language.model.norm.weight"))
    return str(folder), "missing tensor(s) language.model.norm.weight"


def _no_tokenizer(folder: Path) -> tuple[str, str]:
    (folder / "tokenizer.json").unlink()
    return "tokenizer.json", "not found"


def _bad_tokenizer(folder: Path) -> tuple[str, str]:
    (folder / "tokenizer.json").write_text("[1, 2")
    return "tokenizer.json", "cannot read JSON"


def _llama_config(folder: Path) -> tuple[str, str]:
    """Some other model: a LLaMA config.json and LLaMA-named safetensors."""
    for p in folder.glob("*.safetensors"):
        p.unlink()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 512}))
    save_file({"model.embed_tokens.weight": torch.zeros(512, 64), "lm_head.weight": torch.zeros(512, 64),
               "model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)}, folder / "model.safetensors")
    return "config.json", "not a DeepSeek-VL2 checkpoint"


def _llama_weights_deepseek_config(folder: Path) -> tuple[str, str]:
    """A DeepSeek-VL2 config.json over another model's safetensors."""
    save_file({"model.embed_tokens.weight": torch.zeros(512, 64), "lm_head.weight": torch.zeros(512, 64)},
              folder / "model.safetensors")
    return str(folder), "missing tensor(s)"


MODEL_DEFECTS = {
    # name: (fixture, defect); every message names the file (or the folder, for tensors that are
    # missing/mis-typed across all shards) and what is wrong.
    "missing_config_json": ("ckpt_tiny", _no_config),
    "invalid_json": ("ckpt_tiny", _bad_json),
    "unknown_model_type": ("ckpt_tiny", _unknown_model_type),
    "missing_shard": ("ckpt_vl2", _missing_shard),
    "truncated_safetensors_header": ("ckpt_tiny", _truncated_header),
    "corrupted_safetensors_header": ("ckpt_tiny", _corrupted_header),
    "safetensors_header_length_absurd": ("ckpt_tiny", _header_claims_exabytes),
    "truncated_safetensors_data": ("ckpt_tiny", _truncated_data),
    "tensor_wrong_shape": ("ckpt_tiny", _wrong_shape),
    "tensor_wrong_dtype": ("ckpt_tiny", _wrong_dtype),
    "tensor_missing": ("ckpt_tiny", _missing_tensor),
    "missing_tokenizer_json": ("ckpt_tiny", _no_tokenizer),
    "invalid_tokenizer_json": ("ckpt_tiny", _bad_tokenizer),
    "other_model_llama": ("ckpt_tiny", _llama_config),
    "other_model_weights_under_deepseek_config": ("ckpt_tiny", _llama_weights_deepseek_config),
}


@pytest.mark.parametrize("defect", list(MODEL_DEFECTS))
def test_model_folder(monkeypatch, request, tmp_path, defect):
    fixture, breaker = MODEL_DEFECTS[defect]
    folder = _copy(request.getfixturevalue(fixture), tmp_path / "model")
    names, problem = breaker(folder)
    image = write_image(tmp_path / "a.png", 32, 32)
    r = run(monkeypatch, "chat", *model_args(folder), image, "hi")
    assert_one_line_error(r, names, problem)
    out = tmp_path / "out"
    r = run(monkeypatch, "ocr", *model_args(folder), "--out", out, image)
    assert_one_line_error(r, names, problem)
    assert not out.exists()


@pytest.mark.parametrize("defect", ["missing_config_json", "invalid_json", "unknown_model_type", "other_model_llama"])
def test_model_folder_info(monkeypatch, ckpt_tiny, tmp_path, defect):
    """`dsvl2 info` reads only config.json; its defects are reported the same way."""
    folder = _copy(ckpt_tiny, tmp_path / "model")
    names, problem = MODEL_DEFECTS[defect][1](folder)
    assert_one_line_error(run(monkeypatch, "info", "-m", folder), names, problem)


def test_model_folder_is_a_file(monkeypatch, tmp_path):
    # a missing folder is test_cli.py::test_model_not_found
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    assert_one_line_error(run(monkeypatch, "info", "-m", f), str(f), "is a file")


# ================================================================================= prompts

def test_prompt_longer_than_the_context(monkeypatch, ckpt_tiny, tmp_path):
    """5000 words and an image do not fit the fixture's 4096-token context: exit 1 naming the
    token counts. (Too many images: test_cli.py::test_context_too_long_is_one_line.)"""
    image = write_image(tmp_path / "a.png", 64, 48)
    words = " ".join(f"word{i % 97}" for i in range(5000))
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny), image, words)
    assert_one_line_error(r, "tokens (images 421, text", "but the context holds 4096")
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny), image, input=words)  # the same prompt on stdin
    assert_one_line_error(r, "but the context holds 4096")
    r = run(monkeypatch, "ask", *model_args(ckpt_tiny), image, words)
    assert_one_line_error(r, "but the context holds 4096")


def test_prompt_longer_than_the_context_ocr_out(monkeypatch, ckpt_tiny, tmp_path):
    image = write_image(tmp_path / "a.png", 64, 48)
    out = tmp_path / "out"
    words = " ".join(["lorem"] * 5000)
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny), "--out", out, "-P", words, image)
    assert_one_line_error(r, str(image), "but the context holds 4096")
    assert not out.exists() or (files_in(out) == [] and leftovers(out) == [])


@pytest.mark.parametrize("how", ["option", "argument", "blank_option", "stdin", "stdin_blank"])
def test_prompt_empty(monkeypatch, ckpt_tiny, tmp_path, how):
    image = write_image(tmp_path / "a.png", 32, 32)
    args, stdin = {
        "option": (["-P", "", image], b""),
        "argument": ([image, ""], b"text on stdin is not read when a prompt argument is given\n"),
        "blank_option": (["-P", "  \n ", image], b""),
        "stdin": ([image], b""),
        "stdin_blank": ([image], b"\n\n  \n"),
    }[how]
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny), *args, input=stdin)
    assert_one_line_error(r, "empty prompt")


def test_prompt_empty_without_images(monkeypatch, ckpt_tiny):
    assert_one_line_error(run(monkeypatch, "chat", *model_args(ckpt_tiny), "-P", ""), "empty prompt")
    assert_one_line_error(run(monkeypatch, "ask", *model_args(ckpt_tiny), "x.png", "  "), "empty question")
    r = run(monkeypatch, "ground", *model_args(ckpt_tiny), "x.png", " ")
    assert r.code == 2 and r.stdout == "" and "Traceback" not in r.stderr  # a usage error: say what to find


@pytest.mark.parametrize("prompt, n_images, needle", [
    ("<image> and <image>: compare", 1, "2 <image> placeholder(s) but 1 image(s)"),
    ("What is in <image>?", 0, "1 <image> placeholder(s) but 0 image(s)"),
    ("Only <image> here", 2, "1 <image> placeholder(s) but 2 image(s)"),
])
def test_prompt_image_placeholder_count_mismatch(monkeypatch, ckpt_tiny, tmp_path, prompt, n_images, needle):
    # (also test_cli_conversation.py::test_placeholders_in_plain_prompt and ::test_bad_conversation_exits_1_...)
    paths = [write_image(tmp_path / f"{i}.png", 32, 32, seed=i) for i in range(n_images)]
    assert_one_line_error(run(monkeypatch, "chat", *model_args(ckpt_tiny), "-P", prompt, *paths), needle)
    if n_images:
        assert_one_line_error(run(monkeypatch, "ask", *model_args(ckpt_tiny), *paths, prompt), needle)


# ================================================================================== output

def _interrupt_on_call(monkeypatch, n: int, partial: str = "") -> None:
    """backends.stream_generate: whole answers ("page text"), except the n-th call yields `partial`
    then Ctrl-C."""
    calls = {"n": 0}

    def gen(vlm, prepared, config=None, prompt_cache=None):
        calls["n"] += 1
        if calls["n"] == n:
            yield Prefilled(int(prepared.input_ids.numel()), 0, 421, 0.01)
            if partial:
                yield Token(5, partial)
            raise KeyboardInterrupt
        yield from answer_events(vlm, prepared, "page text")

    monkeypatch.setattr(backends, "stream_generate", gen)


def test_output_out_files_are_atomic_when_interrupted(monkeypatch, ckpt_tiny, three_pages, tmp_path):
    """Ctrl-C while page 2 is being read: exit 130, page 1's file complete, no page-2 file, no temp."""
    real = backends.stream_generate
    _interrupt_on_call(monkeypatch, 2, "half of page two")
    out = tmp_path / "out"
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 3), "--dpi", "36", "--batch", "1", "--out", out, three_pages)
    assert r.code == 130, r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr and "interrupted" in r.stderr
    assert files_in(out) == ["three-p001.txt"] and leftovers(out) == []
    assert (out / "three-p001.txt").read_text() == "page text\n"
    # the run resumes where it stopped (with the real model this time)
    monkeypatch.setattr(backends, "stream_generate", real)
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 3), "--dpi", "36", "--out", out, "--skip-existing", three_pages)
    assert r.code == 0, r.stderr
    assert files_in(out) == ["three-p001.txt", "three-p002.txt", "three-p003.txt"] and leftovers(out) == []


def test_output_interrupted_while_writing_the_file(monkeypatch, ckpt_tiny, three_pages, tmp_path):
    """Ctrl-C inside the write of page 2's file (after its temp file exists): exit 130, the temp
    file is removed and page 2's file does not exist."""
    real_fsync, calls = os.fsync, {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:
            assert any(p.name.endswith(".part") for p in (tmp_path / "out").iterdir())
            raise KeyboardInterrupt
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fake_model_answer(monkeypatch, "page text")
    out = tmp_path / "out"
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 2), "--dpi", "36", "--batch", "1", "--out", out, three_pages)
    assert r.code == 130 and "Traceback" not in r.stderr
    assert files_in(out) == ["three-p001.txt"] and leftovers(out) == []


def test_output_ctrl_c_while_streaming_ocr_flushes(monkeypatch, ckpt_tiny, three_pages):
    """Streaming OCR to stdout: page 1 whole, page 2's partial text on a finished line, exit 130.
    (chat: test_cli.py::test_ctrl_c_flushes_what_was_generated; a real SIGINT:
    test_cli_e2e.py::test_sigint_at_the_chat_prompt_exits_130.)"""
    _interrupt_on_call(monkeypatch, 2, "partial text")
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny, 3), "--dpi", "36", "--batch", "1", three_pages)
    assert r.code == 130 and "Traceback" not in r.stderr and "interrupted" in r.stderr
    assert r.stdout.startswith(f"==> {three_pages} page 1 <==\npage text\n")
    assert r.stdout.endswith(f"==> {three_pages} page 2 <==\npartial text\n")
    assert "page 3" not in r.stdout


def test_output_ctrl_c_while_streaming_ask_flushes(monkeypatch, ckpt_tiny, three_pages):
    _interrupt_on_call(monkeypatch, 1, "the answer so f")
    r = run(monkeypatch, "ask", *model_args(ckpt_tiny, 3), "--dpi", "36", "--pages", "1", three_pages, "what?")
    assert r.code == 130 and r.stdout == "the answer so f\n" and "Traceback" not in r.stderr


def test_output_ctrl_c_while_loading_the_model(monkeypatch, ckpt_tiny, tmp_path):
    def interrupted(path, *, device, dtype, quantize=None, on_progress=None, vision_int8=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_weights", interrupted)
    out = tmp_path / "out"
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny), "--out", out, write_image(tmp_path / "a.png", 20, 20))
    assert r.code == 130 and r.stdout == "" and "Traceback" not in r.stderr
    assert not out.exists()


def test_output_closed_stdout_pipe_ends_quietly(ckpt_tiny, tmp_path):
    """`dsvl2 ocr doc.pdf | head -c 1`: the reader takes one byte and goes; the next write gets
    EPIPE and dsvl2 exits 141 (128 + SIGPIPE, as `head` pipelines expect) with nothing on stderr
    but its usual status lines. (Closed before the first byte: test_cli_e2e.py.)"""
    pdf = make_pdf(tmp_path / "doc.pdf", pages=4)
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-m", "dsvl2_cli", "ocr", "-m", str(ckpt_tiny), "--dtype", "float32",
                             "--max-tokens", "4", "--dpi", "36", "--batch", "1", str(pdf)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.read(1)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert first == b"="  # the first page's header had started
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err
    assert "error:" not in err


# ================================================================================= parsing

ADVERSARIAL = [
    "<|ref|>../../etc/x<|/ref|><|det|>[[10, 20, 300, 400]]<|/det|>",
    "<|ref|>__import__('os').system('touch PWNED')<|/ref|><|det|>[[eval('1'), 2, 3, 4]]<|/det|>",
    "<|det|>[[" + "9" * 5000 + ", -1e999, nan, inf]]<|det|><|ref|><|/det|>]]]]]][[[[",
    "<|ref|>\x00\udcff\u202e<|/ref|><|det|>[[1,2,3,4],[5,6,7]]<|/det|>==> evil.pdf page 9 <==",
    "<|grounding|><|/ref|><|/det|>" * 50,
]


@pytest.mark.parametrize("answer", ADVERSARIAL, ids=[f"answer{i}" for i in range(len(ADVERSARIAL))])
def test_parsing_grounding_answer_never_evaluated_or_written(monkeypatch, ckpt_tiny, tmp_path, answer):
    """Whatever the model answers, `ground` parses it without evaluating anything, exits 0,
    writes only the --save file the user named, and reports what it could not read."""
    monkeypatch.chdir(tmp_path)
    answer = answer.encode("utf-8", "replace").decode("utf-8", "replace")
    fake_model_answer(monkeypatch, answer)
    image = write_image(tmp_path / "scene.png", 120, 90)
    saved = tmp_path / "boxes.png"
    r = run(monkeypatch, "ground", *model_args(ckpt_tiny), "--json", "--save", saved, image, "the cup")
    assert r.code == 0, r.stderr
    assert_clean(r)
    (rec,) = r.json_lines
    for b in rec["boxes"]:
        x1, y1, x2, y2 = b["box_999"]
        assert 0 <= x1 <= x2 <= 999 and 0 <= y1 <= y2 <= 999
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["boxes.png", "scene.png"]  # no PWNED, no x
    assert not (tmp_path / "../../etc/x").resolve().exists()
    r = run(monkeypatch, "ground", *model_args(ckpt_tiny), image, "the cup")  # plain text output too
    assert r.code == 0 and "Traceback" not in r.stderr


def test_parsing_ocr_output_with_paths_and_page_markers(monkeypatch, ckpt_tiny, three_pages, tmp_path):
    """OCR text that looks like paths or page markers is only text: file names come from the
    input's name and page number, never from model output."""
    monkeypatch.chdir(tmp_path)
    text = "==> ../../escape.txt page 1 <==\n/tmp/../../etc/passwd\n<|ref|>x<|/ref|>"
    fake_model_answer(monkeypatch, text)
    out = tmp_path / "out"
    r = run(monkeypatch, "ocr", *model_args(ckpt_tiny), "--dpi", "36", "--pages", "2", "--out", out, three_pages)
    assert r.code == 0, r.stderr
    assert files_in(out) == ["three-p002.txt"] and leftovers(out) == []
    assert (out / "three-p002.txt").read_text() == text + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ================================================================================ security

class _Marker:
    """Unpickling this creates the file `path` (open(path, "w")): proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_security_pickle_only_folder_is_refused_unopened(monkeypatch, ckpt_tiny, tmp_path):
    marker = tmp_path / "UNPICKLED"
    folder = _copy(ckpt_tiny, tmp_path / "model")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker(marker)))
    pickle.loads((folder / "pytorch_model.bin").read_bytes()).close()  # the trap works...
    marker.unlink()
    r = run(monkeypatch, "chat", *model_args(folder), "hi")
    assert_one_line_error(r, "pytorch_model.bin", "safetensors only", "never unpickles")
    assert not marker.exists()  # ...and was never sprung


def test_security_pickle_next_to_safetensors_is_ignored(monkeypatch, ckpt_tiny, tmp_path):
    marker = tmp_path / "UNPICKLED"
    folder = _copy(ckpt_tiny, tmp_path / "model")
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (folder / name).write_bytes(pickle.dumps(_Marker(marker)))
    r = run(monkeypatch, "chat", *model_args(folder, 2), "hi")
    assert r.code == 0, r.stderr
    assert not marker.exists()


def test_security_remote_code_is_never_imported(monkeypatch, ckpt_tiny, tmp_path):
    """modeling_*.py / configuration_*.py in the folder and auto_map in config.json: loaded,
    answered, and not one line of the folder's Python ran."""
    marker = tmp_path / "IMPORTED"
    folder = _copy(ckpt_tiny, tmp_path / "model")
    payload = f"open({str(marker)!r}, 'w').close()\n"
    for name in ("modeling_deepseek.py", "configuration_deepseek.py", "modeling_deepseek_vl_v2.py",
                 "processing_deepseek_vl_v2.py", "__init__.py"):
        (folder / name).write_text(payload)
    raw = json.loads((folder / "config.json").read_text())
    raw["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                       "AutoModelForCausalLM": "modeling_deepseek_vl_v2.DeepseekVLV2ForCausalLM"}
    raw["trust_remote_code"] = True
    (folder / "config.json").write_text(json.dumps(raw))
    image = write_image(tmp_path / "a.png", 32, 32)
    before = set(sys.modules)
    r = run(monkeypatch, "chat", *model_args(folder, 2), image, "hi")
    assert r.code == 0, r.stderr
    assert run(monkeypatch, "info", "-m", folder).code == 0
    assert not marker.exists()
    assert not [m for m in set(sys.modules) - before if "deepseek" in m or "processing_" in m]


def test_security_downloads_fetch_no_code_or_pickles():
    """`dsvl2 pull` / hub downloads take JSON, safetensors and tokenizer files only."""
    from huggingface_hub.utils import (
        filter_repo_objects,  # what snapshot_download filters with
    )

    def fetched(name):
        return list(filter_repo_objects([name], allow_patterns=hub.ALLOW_PATTERNS,
                                        ignore_patterns=getattr(hub, "IGNORE_PATTERNS", None))) == [name]

    for name in ("config.json", "model.safetensors", "model-00001-of-000002.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "processor_config.json", "model.safetensors.index.json"):
        assert fetched(name), name
    for name in ("pytorch_model.bin", "modeling_deepseek.py", "configuration_deepseek.py", "model.ckpt",
                 "training_args.bin", "optimizer.pt", "tokenizer_remote.py", "tokenizer.pkl", "tokenizer.bin"):
        assert not fetched(name), name


def test_security_no_unsafe_loaders_in_the_source():
    """No pickle, torch.load, eval/exec or remote-code switches anywhere in the package."""
    import re

    bad = re.compile(r"\bimport pickle\b|\bpickle\.|\btorch\.load\(|(?<![.\w])eval\(|(?<![.\w])exec\(|"
                     r"trust_remote_code\s*=\s*True|import_module\(|__import__\(|\brunpy\b|spec_from_file_location")
    hits = [f"{p.name}:{i}: {line.strip()}" for p in sorted((REPO / "dsvl2_cli").glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert hits == []


def test_security_save_path_comes_from_the_user_only(monkeypatch, ckpt_tiny, tmp_path):
    """--save writes exactly the path given; a label naming a path is drawn, not written to."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    fake_model_answer(monkeypatch, f"<|ref|>{target}<|/ref|><|det|>[[1, 2, 300, 400]]<|/det|>")
    image = write_image(tmp_path / "scene.png", 100, 80)
    r = run(monkeypatch, "ground", *model_args(ckpt_tiny), "--save", tmp_path / "drawn.png", image, "x")
    assert r.code == 0, r.stderr
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drawn.png", "scene.png", "victim.txt"]
    # --save into a folder that cannot be written: one line, nothing left behind
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    r = run(monkeypatch, "ground", *model_args(ckpt_tiny), "--save", blocker / "x.png", image, "x")
    assert_one_line_error(r, "blocker", "cannot write")
