"""The registry of quantization methods: one torch-free table (dsvl2_cli/quant_methods.py) for
names and help, one QuantMethod per method (engine/quant/registry.py), the two in agreement, and a
method not in them a one-line error naming the known ones from every entry point: never another
method's format."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from subprocess_env import subprocess_env
from test_cli import _isolated, assert_one_line_error, run  # noqa: F401 - fixture reused

import dsvl2_cli
from dsvl2_cli import quant_methods
from dsvl2_cli.engine.loading import facts, fit, hub, memory, memory_plan
from dsvl2_cli.engine import quant, runtime
from dsvl2_cli.engine.quant import registry
from dsvl2_cli.engine.quant.format import QuantizationError, QuantSpec
from dsvl2_cli.errors import Dsvl2Error
from dsvl2_cli.model.config import ModelConfig

KNOWN = "int8, int4 or nf4"


def fake_spec(method: str = "int3", group_size: int | None = 64) -> QuantSpec:
    """A spec of a method nobody implements, past QuantSpec's own check (as a caller's bug would)."""
    spec = object.__new__(QuantSpec)
    object.__setattr__(spec, "method", method)
    object.__setattr__(spec, "group_size", group_size)
    return spec


def one_line(err: BaseException, *needles: str) -> None:
    text = str(err)
    assert isinstance(err, Dsvl2Error) and "\n" not in text, repr(err)
    for needle in ("int3", *needles):
        assert needle in text, text


# ------------------------------------------------------------------------------ the table

def test_table_and_implementations_agree():
    assert tuple(registry.IMPLEMENTATIONS) == quant_methods.NAMES == ("int8", "int4", "nf4")
    assert quant.METHODS == ("none", *quant_methods.NAMES)
    assert quant_methods.AUTO_ORDER == ("none", "int8", "int4")
    for name, method in registry.IMPLEMENTATIONS.items():
        assert method.name == name and method.info is quant_methods.get(name)
        assert method.experts.quant is method and issubclass(method.experts, quant.QuantizedExperts)
        shapes = method.packed_shapes(2, 64, 128, method.info.default_group)
        assert tuple(shapes) == method.fields and method.fields[0] == "qweight"


def test_names_and_help_need_no_torch():
    code = ("import json, sys; from dsvl2_cli import quant_methods as q; "
            "print(json.dumps([q.QUANTIZE_METAVAR, q.QUANTIZE_HELP, sorted(m for m in sys.modules "
            "if m == 'torch' or m.startswith('dsvl2_cli.engine'))]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    metavar, help_text, heavy = json.loads(proc.stdout)
    assert heavy == []
    assert metavar == "auto|none|int8|int4|nf4"
    assert all(m.name in help_text for m in quant_methods.METHODS) and "fast on CPU" in help_text
    assert quant_methods.FOLDER_METAVAR == "int8|int4|nf4"
    assert quant_methods.GROUP_SIZE_HELP == "Values per scale (default: int4 128, nf4 64)."


def test_quantize_help_comes_from_the_table(monkeypatch):
    r = run(monkeypatch, "chat", "--help", env={"COLUMNS": "200"})
    assert r.code == 0 and quant_methods.QUANTIZE_METAVAR in r.stdout


def test_group_sizes_come_from_the_table():
    for m in quant_methods.METHODS:
        spec = QuantSpec.make(m.name)
        assert spec.group_size == m.default_group
        for size in m.group_sizes:
            assert QuantSpec.make(m.name, size).group_size == size


# ------------------------------------------------------------------ an unknown method

def test_unknown_method_is_refused_by_the_spec_itself():
    with pytest.raises(QuantizationError) as err:
        QuantSpec("int3", 64)
    one_line(err.value, KNOWN)
    with pytest.raises(QuantizationError) as err:
        QuantSpec.make("int3")
    one_line(err.value, KNOWN)
    with pytest.raises(QuantizationError) as err:
        quant.parse_method("int3")
    one_line(err.value, "none, int8, int4, nf4")
    with pytest.raises(QuantizationError) as err:
        quant.choose_spec("int3", None, "folder")
    one_line(err.value)


@pytest.fixture(scope="module")
def cfg(ckpt_tiny) -> ModelConfig:
    return ModelConfig.from_dir(ckpt_tiny)


def _entry_points(cfg, ckpt_tiny, tmp_path):
    spec, w = fake_spec(), torch.randn(2, 64, 64)
    resolved = hub.resolve(ckpt_tiny)
    return {
        "registry.method": lambda: registry.method("int3"),
        "registry.method(spec)": lambda: registry.method(spec),
        "group_for": lambda: quant.group_for(spec, 64),
        "packed_shapes": lambda: quant.packed_shapes(spec, 2, 64, 64),
        "expected_quantized": lambda: quant.expected_quantized(cfg, spec),
        "pack_part": lambda: registry.pack_part(w, spec, "gate_up"),
        "pack_experts": lambda: quant.pack_experts(w, w, spec),
        "dequantize_part": lambda: registry.dequantize_part("int3", w, w),
        "dequantize_packed": lambda: quant.dequantize_packed("int3", {}),
        "experts_from_packed": lambda: quant.experts_from_packed({}, spec),
        "quantize_experts": lambda: quant.quantize_experts(w, w, "int3"),
        "packed_layer_hook": lambda: quant.packed_layer_hook(spec, torch.device("cpu")),
        "kernel_layout": lambda: quant.kernel_layout(spec, cfg, torch.device("cpu")),
        "planned_weight_memory": lambda: memory.planned_weight_memory(cfg, torch.bfloat16, spec),
        "memory_plan.plan": lambda: memory_plan.plan(cfg, torch.bfloat16, spec),
        "plan_for_folder": lambda: memory_plan.plan_for_folder(ckpt_tiny, torch.bfloat16, "int3"),
        "plans_for_folder": lambda: memory_plan.plans_for_folder(ckpt_tiny, torch.bfloat16, methods=("int3",)),
        "fit.check_load": lambda: fit.check_load(ckpt_tiny, "tiny", torch.bfloat16, "cpu", "int3"),
        "runtime.plan_load": lambda: runtime.plan_load(ckpt_tiny, device="cpu", quantize="int3"),
        "dsvl2_cli.load": lambda: dsvl2_cli.load(ckpt_tiny, device="cpu", quantize="int3"),
        "facts.model_info": lambda: facts.model_info(resolved, "bfloat16", "cpu", "int3"),
        "quantize_folder": lambda: quant.quantize_folder(ckpt_tiny, tmp_path / "q", "int3"),
    }


ENTRY_POINTS = ["registry.method", "registry.method(spec)", "group_for", "packed_shapes", "expected_quantized",
                "pack_part", "pack_experts", "dequantize_part", "dequantize_packed", "experts_from_packed",
                "quantize_experts", "packed_layer_hook", "kernel_layout", "planned_weight_memory", "memory_plan.plan",
                "plan_for_folder", "plans_for_folder", "fit.check_load", "runtime.plan_load", "dsvl2_cli.load",
                "facts.model_info", "quantize_folder"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_unknown_method_is_an_error_in_every_entry_point(entry, cfg, ckpt_tiny, tmp_path):
    calls = _entry_points(cfg, ckpt_tiny, tmp_path)
    assert sorted(calls) == sorted(ENTRY_POINTS)
    with pytest.raises(QuantizationError) as err:
        calls[entry]()
    one_line(err.value)
    assert not (tmp_path / "q").exists()


@pytest.mark.usefixtures("_isolated")
@pytest.mark.parametrize("args", [
    ("chat", "--quantize", "int3", "x.png", "hi"),
    ("info", "--quantize", "int3"),
    ("quantize", "SRC", "DST", "--method", "int3"),
])
def test_unknown_method_on_the_command_line_is_one_line(monkeypatch, ckpt_tiny, tmp_path, args):
    args = [str(ckpt_tiny) if a == "SRC" else str(tmp_path / "q") if a == "DST" else a for a in args]
    if args[0] != "quantize":
        args += ["-m", str(ckpt_tiny)]
    if args[0] == "chat":
        from dsvl2_cli.dev.synthetic import write_image

        args[3] = str(write_image(tmp_path / "x.png", 16, 16, seed=0))
    assert_one_line_error(run(monkeypatch, *args), "int3")
