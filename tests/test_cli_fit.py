"""Fit before loading, through the CLI and the library: DSVL2_MEMORY_LIMIT set between two
methods' plans of the tiny fixture, so that one fits and the other does not. The fixture's plans
differ by tens of KB (the runtime overhead is most of them), hence limits in K."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_cli import _cached_load_weights, _isolated, assert_one_line_error, run  # noqa: F401 - fixture reused

from dsvl2_cli.app.terminal import cli
from dsvl2_cli.dev.synthetic import write_image
from dsvl2_cli.engine.loading import host_memory, memory_plan
from dsvl2_cli.engine import runtime
from dsvl2_cli.errors import MemoryFitError

pytestmark = pytest.mark.usefixtures("_isolated")


@pytest.fixture(scope="module")
def plans(ckpt_tiny) -> dict[str, memory_plan.MemoryPlan]:
    return memory_plan.plans_for_folder(ckpt_tiny, torch.float32, "cpu")


def between(low: memory_plan.MemoryPlan, high: memory_plan.MemoryPlan) -> str:
    """A DSVL2_MEMORY_LIMIT that `low` fits in and `high` does not."""
    assert low.total < high.total - 2048
    return f"{(low.total + high.total) // 2 // 1024}K"


@pytest.fixture
def loads(monkeypatch) -> list[dict]:
    """Every call of the CLI's weight loader (the cached real one), with its arguments."""
    calls: list[dict] = []

    def spy(path, **kw):
        calls.append(kw)
        return _cached_load_weights(path, **kw)

    monkeypatch.setattr(cli, "load_weights", spy)
    return calls


@pytest.fixture(scope="module")
def img(tmp_path_factory):
    return write_image(tmp_path_factory.mktemp("fit") / "a.png", 32, 32, seed=0)


def chat(monkeypatch, ckpt, img, *extra, limit: str):
    return run(monkeypatch, "chat", "-m", ckpt, "--device", "cpu", "--dtype", "float32", "--max-tokens", "2",
               *extra, img, "What is it?", env={"DSVL2_MEMORY_LIMIT": limit})


def test_refused_before_loading(monkeypatch, ckpt_tiny, plans, img, loads):
    limit = between(plans["int8"], plans["none"])
    r = chat(monkeypatch, ckpt_tiny, img, limit=limit)
    assert_one_line_error(r, f"needs {plans['none'].total / 1e9:.1f} GB in float32", "is available (DSVL2_MEMORY_LIMIT)",
                          "--quantize int8 needs", "--quantize int4 needs", "(fits)")
    assert loads == []  # no weight was read
    ok = chat(monkeypatch, ckpt_tiny, img, "--quantize", "int8", limit=limit)  # the advice works
    assert ok.code == 0, ok.stderr
    assert [c["quantize"] for c in loads] == ["int8"]


@pytest.mark.parametrize("low, high", [("int8", "none"), ("int4", "int8")])
def test_quantize_auto_picks_what_fits(monkeypatch, ckpt_tiny, plans, img, loads, low, high):
    r = chat(monkeypatch, ckpt_tiny, img, "--quantize", "auto", limit=between(plans[low], plans[high]))
    assert r.code == 0, r.stderr
    assert [c["quantize"] for c in loads] == [low]
    assert f"--quantize auto: {low} (" in r.stderr
    assert f"float32, {low} routed experts, on cpu" in r.stderr  # the status line names it


def test_quantize_auto_takes_none_when_it_fits(monkeypatch, ckpt_tiny, plans, img, loads):
    r = chat(monkeypatch, ckpt_tiny, img, "--quantize", "auto", limit=f"{plans['none'].total // 1024 + 64}K")
    assert r.code == 0, r.stderr
    assert [c["quantize"] for c in loads] == ["none"]
    assert "--quantize auto: none (" in r.stderr and "float32 on cpu · loaded" in r.stderr


def test_allow_paging_loads_with_a_warning(monkeypatch, ckpt_tiny, plans, img, loads):
    limit = f"{plans['int4'].total // 1024 - 64}K"  # nothing fits
    refused = chat(monkeypatch, ckpt_tiny, img, "--quantize", "auto", limit=limit)
    assert_one_line_error(refused, "no quantization fits")
    assert loads == []
    r = chat(monkeypatch, ckpt_tiny, img, "--allow-paging", limit=limit)
    assert r.code == 0, r.stderr
    warned = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ") and "paged from disk" in ln]
    assert len(warned) == 1 and "needs" in warned[0] and "DSVL2_MEMORY_LIMIT" in warned[0]
    assert len(loads) == 1


def test_info_shows_the_plans_and_what_fits(monkeypatch, ckpt_tiny, plans, loads):
    limit = between(plans["int8"], plans["none"])
    facts = run(monkeypatch, "info", "-m", ckpt_tiny, "--device", "cpu", "--dtype", "float32", "--json",
                env={"DSVL2_MEMORY_LIMIT": limit}).json_lines[0]
    mem = facts["memory"]
    assert mem["available"] == {"bytes": host_memory.parse_memory_size(limit), "source": "DSVL2_MEMORY_LIMIT"}
    assert {m: p["fits"] for m, p in mem["plans"].items()} == {"none": False, "int8": True, "int4": True}
    assert mem["method"] == "none"
    for m, p in mem["plans"].items():
        assert p["total"] == plans[m].total and p["weights"] == plans[m].weight_bytes
        assert p["cache"] == plans[m].cache and p["activations"] == max(plans[m].vision, plans[m].prefill)
    text = run(monkeypatch, "info", "-m", ckpt_tiny, "--device", "cpu", "--dtype", "float32",
               env={"DSVL2_MEMORY_LIMIT": limit}).stdout.splitlines()
    rows = {ln.split()[0]: ln for ln in text}
    assert "available (DSVL2_MEMORY_LIMIT)" in rows["memory"]
    assert rows["none"].endswith("does not fit (these options)") and rows["int8"].endswith(": fits")
    auto = run(monkeypatch, "info", "-m", ckpt_tiny, "--device", "cpu", "--dtype", "float32", "--json",
               "--quantize", "auto", env={"DSVL2_MEMORY_LIMIT": limit}).json_lines[0]
    assert auto["memory"]["method"] == "int8" and auto["quantization"].startswith("int8")
    assert loads == []  # info reads no weights


def test_info_prequantized_folder_plans_its_own_method(monkeypatch, ckpt_tiny, tmp_path):
    dst = tmp_path / "q"
    assert run(monkeypatch, "quantize", ckpt_tiny, dst, "--method", "int4", "-q").code == 0
    facts = run(monkeypatch, "info", "-m", dst, "--json", "--quantize", "auto").json_lines[0]
    assert list(facts["memory"]["plans"]) == ["int4"] and facts["memory"]["method"] == "int4"


def test_out_of_memory_is_one_line(monkeypatch, ckpt_tiny, img):
    def no_room(path, **kw):
        raise RuntimeError("unable to mmap 1999174696 bytes from file <x>: Cannot allocate memory (12)")

    monkeypatch.setattr(cli, "load_weights", no_room)
    r = run(monkeypatch, "chat", "-m", ckpt_tiny, "--device", "cpu", img, "hi")
    assert_one_line_error(r, "out of memory (RAM)", "--quantize int4")
    assert "a bug" not in r.stderr and "unexpected" not in r.stderr
    debug = run(monkeypatch, "chat", "-m", ckpt_tiny, "--device", "cpu", img, "hi", env={"DSVL2_DEBUG": "1"})
    assert debug.code == 1 and "Traceback" in debug.stderr and "out of memory (RAM)" in debug.stderr


def test_quantize_command_refuses_auto(monkeypatch, ckpt_tiny, tmp_path):
    r = run(monkeypatch, "quantize", ckpt_tiny, tmp_path / "q", "--method", "auto")
    assert_one_line_error(r, "must say its method")
    assert not (tmp_path / "q").exists()


# ------------------------------------------------------------------------------------ library

def test_library_load_checks_and_opts_out(monkeypatch, ckpt_tiny, plans):
    monkeypatch.setenv("DSVL2_MEMORY_LIMIT", between(plans["int8"], plans["none"]))
    read = []
    real = runtime.load_model
    monkeypatch.setattr(runtime, "load_model", lambda *a, **kw: read.append(a) or real(*a, **kw))
    with pytest.raises(MemoryFitError, match="--quantize int8 needs"):
        runtime.load(ckpt_tiny, device="cpu", dtype="float32")
    assert read == []
    verdicts = []
    vlm = runtime.load(ckpt_tiny, device="cpu", dtype="float32", quantize="auto", on_fit=verdicts.append)
    assert vlm.quantization.method == "int8" and verdicts[0].method == "int8" and verdicts[0].note
    assert runtime.load(ckpt_tiny, device="cpu", dtype="float32", memory_check=False).quantization is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime.load(ckpt_tiny, device="cpu", dtype="float32", allow_paging=True)
    assert any("paged from disk" in str(w.message) for w in caught)
    # auto still plans without the check, and takes the smallest when nothing fits, never refusing
    monkeypatch.setenv("DSVL2_MEMORY_LIMIT", f"{plans['int4'].total // 1024 - 64}K")
    vlm = runtime.load(ckpt_tiny, device="cpu", dtype="float32", quantize="auto", memory_check=False,
                       on_fit=verdicts.append)
    assert vlm.quantization.method == "int4" and "paged from disk" in verdicts[-1].warning
    assert len(read) == 4


# ------------------------------------------------------------------- one loading path

@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """Calls of hub.resolve and fit.check_load (the real ones, counted)."""
    from dsvl2_cli.engine.loading import fit, hub

    calls = {"resolve": 0, "check_load": 0}
    for module, name in ((hub, "resolve"), (fit, "check_load")):
        def spy(*a, _real=getattr(module, name), _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(module, name, spy)
    return calls


def test_library_load_resolves_and_checks_once(ckpt_tiny, counted):
    runtime.load(ckpt_tiny, device="cpu", dtype="float32")
    assert counted == {"resolve": 1, "check_load": 1}
    plan = runtime.plan_load(ckpt_tiny, device="cpu", dtype="float32", quantize="auto")
    assert counted == {"resolve": 2, "check_load": 2} and plan.quantize in ("none", "int8", "int4")
    plan.load()  # reads the weights only
    assert counted == {"resolve": 2, "check_load": 2}
    runtime.plan_load(plan.model, device="cpu", memory_check=False)  # a resolved model is not resolved again
    assert counted == {"resolve": 2, "check_load": 2}


@pytest.mark.parametrize("command", ["chat", "ocr"])
def test_cli_resolves_and_checks_once(monkeypatch, ckpt_tiny, img, loads, counted, command):
    args = [img, "What is it?"] if command == "chat" else [img]
    r = run(monkeypatch, command, "-m", ckpt_tiny, "--device", "cpu", "--dtype", "float32", "--max-tokens", "2",
            "--quantize", "auto", *args)
    assert r.code == 0, r.stderr
    assert counted == {"resolve": 1, "check_load": 1}  # ocr's preflight and the load share one resolve
    assert len(loads) == 1 and loads[0]["quantize"] in ("none", "int8", "int4")
