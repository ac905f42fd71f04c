"""Building, caching and loading the native kernels: every SIMD path this compiler and CPU can
run passes the equivalence checks of test_kernels.py (and test_quant.py's native ones), the bf16
roundings inside the expert kernel, and the fallbacks: a failing or odd $CC, an unwritable cache,
a damaged cached library."""

from __future__ import annotations

import itertools
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import test_kernels as tk  # module import: its tests are not collected twice
import test_quant as tq
import torch
import torch.nn.functional as F
from _pytest.mark.structures import ParameterSet

from dsvl2_cli.engine.native import kernel_build, kernels
from dsvl2_cli.model.moe import Experts

REPO = Path(__file__).resolve().parents[1]
needs_kernels = tk.needs_kernels

# -------------------------------------------------------------------------- every ISA variant

# what each variant needs from the CPU (/proc/cpuinfo flags) to run the path it is built for
CPU_NEEDS = {"native": (), "avx512": ("avx512f",), "avx2": ("avx2", "fma"), "portable": ()}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler_can_target(variant: str) -> str | None:
    """None when the compiler takes the variant's flags, else why not."""
    try:
        cc = kernel_build._compiler()
    except kernel_build.KernelBuildError as err:
        return str(err)
    cmd = [*cc, "-O3", "-march=native", *kernel_build.VARIANTS[variant][0], "-x", "c", "-fsyntax-only", "-"]
    done = subprocess.run(cmd, input="int main(void) { return 0; }\n", capture_output=True, text=True,
                          check=False)
    return None if done.returncode == 0 else f"{' '.join(cc)} cannot target {variant}: {done.stderr.strip()[:200]}"


def _variant_library(variant: str):
    """The loaded library of `variant`, or a skip where the compiler or the CPU cannot run it.
    A build failure the compiler should not have (the C code of that path) fails the test."""
    if not tk.EXPECTED_HERE:
        pytest.skip("no native kernels on this platform")
    why = _compiler_can_target(variant)
    if why:
        pytest.skip(why)
    missing = [f for f in CPU_NEEDS[variant] if f not in _cpu_flags()]
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(missing)} for the {variant} path")
    lib, why = kernel_build.probe(variant)
    assert lib is not None, why
    return lib


def _cases(check):
    """The keyword sets a test's @pytest.mark.parametrize marks give it (their product)."""
    axes = []
    for mark in getattr(check, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        rows = []
        for v in values:
            v = v.values if isinstance(v, ParameterSet) else v
            rows.append(dict(zip(names, v if len(names) > 1 else (v,))))
        axes.append(rows)
    for combo in itertools.product(*axes):
        yield {k: v for part in combo for k, v in part.items()}


CHECKS = [tk.test_linear_matches_torch, tk.test_moe_kernel_matches_grouped_torch,
          tk.test_prefill_attention_matches_float_reference, tk.test_prefill_attention_merged_heads_layout,
          tk.test_decode_attention_matches_float_reference, tk.test_head_matmul_matches_einsum,
          tk.test_bias_gelu_matches_float_reference, tk.test_layer_norm_matches_float_reference,
          tq.test_native_quantized_experts_equal_torch_kernels]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("test_"))
@pytest.mark.parametrize("variant", ["avx512", "avx2", "portable"])
def test_every_isa_variant_matches_torch(variant, check):
    lib = _variant_library(variant)
    assert lib.dsvl2_kernel_isa() == kernel_build.VARIANTS[variant][1]
    ran = 0
    with kernels.using(variant) as active:
        assert active is not None and kernels.status().startswith("native CPU kernels")
        assert kernels._load().dsvl2_kernel_isa() == kernel_build.VARIANTS[variant][1]  # the variant is what runs
        for kwargs in _cases(check):
            try:
                check(**kwargs)
            except pytest.skip.Exception:
                continue  # e.g. torch packs int4 its own way here
            except AssertionError as err:
                raise AssertionError(f"{variant}: {check.__name__}({kwargs}): {err}") from None
            ran += 1
    assert ran > 0


@pytest.mark.parametrize("variant", ["avx512", "avx2", "portable"])
def test_every_isa_variant_decodes_like_torch(variant, ckpt_vl2, ckpt_tiny):
    _variant_library(variant)
    with kernels.using(variant):
        tk.test_bf16_model_decode_same_with_and_without_kernels(ckpt_vl2, ckpt_tiny)


def test_variant_is_restored_after_using():
    if not tk.EXPECTED_HERE:
        pytest.skip("no native kernels on this platform")
    before = kernels.status()
    with kernels.using("portable"):
        pass
    assert kernels.status() == before


def test_default_build_uses_the_best_path_the_compiler_offers():
    if not tk.EXPECTED_HERE:
        pytest.skip("no native kernels on this platform")
    cc = kernel_build._compiler()
    macros = subprocess.run([*cc, "-march=native", "-dM", "-E", "-x", "c", "-"], input="", capture_output=True,
                            text=True, check=True).stdout
    has = {m for m in ("__AVX512BF16__", "__AVX512F__", "__AVX2__", "__FMA__") if f"#define {m} " in macros}
    best = (3 if "__AVX512BF16__" in has else 2 if "__AVX512F__" in has
            else 1 if {"__AVX2__", "__FMA__"} <= has else 0)
    assert kernels._load().dsvl2_kernel_isa() == best
    assert kernels.status() == f"native CPU kernels ({kernel_build.ISA_NAMES[best]})"


# ------------------------------------------------------------- bf16 roundings in the expert kernel

@needs_kernels
def test_moe_kernel_rounds_silu_to_bf16_like_torch():
    """h = bf16(bf16(silu(g)) * u), as eager bf16 torch computes it. One-hot weights make every
    projection exact, so the kernel's output is h itself and must equal torch's bit for bit;
    without the rounding of silu(g) about a third of the values differ."""
    tokens, m = 8, 256
    d = 2 * m
    eye = torch.eye(m)
    gate_up = torch.zeros(2, 2 * m, d)
    gate_up[0, :m, :m] = eye  # gate = x[:m]
    gate_up[0, m:, m:] = eye  # up = x[m:]
    down = torch.zeros(2, d, m)
    down[0, :m] = eye  # out[:m] = h
    gate_up, down = gate_up.bfloat16(), down.bfloat16()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(tokens, d, generator=g) * 3).bfloat16()
    ids = torch.zeros(tokens, 1, dtype=torch.int64)
    weights = torch.ones(tokens, 1)
    got = kernels.moe_experts(x, ids, weights, gate_up, down)
    assert got is not None
    gate, up = x[:, :m], x[:, m:]
    want = F.silu(gate) * up  # bf16 torch: silu rounded to bf16, then the product rounded
    assert torch.equal(got[:, m:], torch.zeros_like(got[:, m:]))
    differ = int((got[:, :m] != want).sum())
    assert differ <= 2, f"{differ} of {want.numel()} values differ from torch's bf16 roundings"
    experts = Experts(2, d, m).bfloat16()  # and the model's torch path computes the same
    with torch.no_grad():
        experts.gate_up.copy_(gate_up)
        experts.down.copy_(down)
    with torch.inference_mode(), kernels.disabled():
        assert torch.equal(experts(x, ids, weights)[:, :m], want)


# --------------------------------------------------------------------------- fallbacks and CC

@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh, empty kernel cache for this test."""
    monkeypatch.setenv("DSVL2_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DSVL2_KERNELS", raising=False)
    return tmp_path / "cache" / "dsvl2" / "kernels"


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _native_gcc() -> str:
    if not tk.EXPECTED_HERE:
        pytest.skip("no native kernels on this platform")
    cc = kernel_build._compiler()
    return cc[0]


def test_compile_failure_falls_back_to_torch(cache, tmp_path, monkeypatch):
    if sys.platform != "linux":
        pytest.skip("shell-script compiler")
    fake = _script(tmp_path / "fakecc", 'echo "fakecc: error: no such thing" >&2\nexit 1\n')
    monkeypatch.setenv("CC", str(fake))
    with kernels.using("native") as lib:
        assert lib is None
        status = kernels.status()
        assert status.startswith("torch (compiling the CPU kernels failed"), status
        assert "status 1" in status and "fakecc: error: no such thing" in status and "\n" not in status
        w, x = torch.randn(16, 32).bfloat16(), torch.randn(2, 32).bfloat16()
        assert torch.equal(kernels.linear(x, w), F.linear(x, w))  # torch runs
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-built left behind


@pytest.mark.parametrize("cc, why", [("/nonexistent/cc", "not found"), ('gcc "-O2', "cannot parse CC")])
def test_unusable_cc_falls_back_to_torch(cache, monkeypatch, cc, why):
    monkeypatch.setenv("CC", cc)
    with kernels.using("native") as lib:
        assert lib is None and why in kernels.status(), kernels.status()


def test_cc_with_arguments_works(cache, tmp_path, monkeypatch):
    gcc = _native_gcc()
    marker = tmp_path / "wrapper-ran"
    wrap = _script(tmp_path / "wrap", f'touch "{marker}"\nexec "$@"\n')  # like ccache: a command, then the compiler
    for cc in (f"{gcc} -O2", f"{wrap} {gcc}"):
        monkeypatch.setenv("CC", cc)
        with kernels.using("native") as lib:
            assert lib is not None, kernels.status()
            assert kernels.status().startswith("native CPU kernels")
    assert marker.exists()
    assert len(list(cache.glob("*.so"))) == 2  # the compiler's arguments are part of the cache key


def test_unwritable_cache_still_builds_for_the_run(tmp_path, monkeypatch):
    _native_gcc()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DSVL2_CACHE", str(blocker))  # cache_dir() = file/dsvl2: cannot be made (even as root)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    with kernels.using("native") as lib:
        assert lib is not None, kernels.status()
        assert kernels.status().startswith("native CPU kernels")
        w, x = torch.randn(64, 96).bfloat16(), torch.randn(2, 96).bfloat16()
        tk.bf16_close(kernels.linear(x, w), F.linear(x, w))
    assert list(temp.iterdir()) == []  # the run's copy is gone once loaded
    monkeypatch.setattr("tempfile.tempdir", str(blocker))  # and no temporary folder either: torch
    with kernels.using("native") as lib:
        assert lib is None
        assert kernels.status().startswith("torch (cannot write the kernel cache"), kernels.status()


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv("DSVL2_KERNELS", "0")
    with kernels.using("native") as lib:
        assert lib is None and kernels.status() == "torch (disabled by DSVL2_KERNELS=0)"


# ------------------------------------------------------------------- a damaged cached library

def _fresh_run(cache_base: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSVL2_CACHE": str(cache_base)}
    env.pop("DSVL2_KERNELS", None)
    code = "from dsvl2_cli.engine.native import kernels; print(kernels.status())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          check=False)


def _record(so: Path) -> tuple[int, str]:
    size, digest = Path(str(so) + ".sha256").read_text().split()
    return int(size), digest


def test_damaged_cache_is_rebuilt_not_loaded(tmp_path):
    """Fresh processes, as a user's next run: a truncated library (a full disk, an interrupted
    copy; mapping it is a bus error) and one damaged at the same size are both rebuilt, with one
    line on stderr, and the run goes on with the native kernels."""
    _native_gcc()
    first = _fresh_run(tmp_path)
    assert first.returncode == 0 and first.stdout.startswith("native CPU kernels"), first.stderr
    (so,) = (tmp_path / "dsvl2" / "kernels").glob("*.so")
    good = so.read_bytes()
    assert _record(so) == kernel_build._sha256(so)
    middle = len(good) // 2
    for damaged in (good[: len(good) // 3],
                    good[:middle] + bytes(b ^ 0xFF for b in good[middle:middle + 4096]) + good[middle + 4096:]):
        so.write_bytes(damaged)
        again = _fresh_run(tmp_path)
        assert again.returncode == 0, (again.returncode, again.stderr)
        assert again.stdout == first.stdout
        rebuilt = so.read_bytes()
        assert rebuilt != damaged and _record(so) == kernel_build._sha256(so) == (len(rebuilt), _record(so)[1])
        lines = again.stderr.strip().splitlines()
        assert len(lines) == 1 and "damaged" in lines[0] and "rebuilding" in lines[0], again.stderr
    third = _fresh_run(tmp_path)  # from then on it loads quietly, without a rebuild
    assert third.returncode == 0 and third.stderr == "" and so.read_bytes() == rebuilt


def test_library_without_its_record_is_rebuilt_quietly(cache, capfd):
    """An older dsvl2's library, or a copy that lost the record: rebuilt, without a warning."""
    _native_gcc()
    so = kernel_build.build("native")
    Path(str(so) + ".sha256").unlink()
    so.write_bytes(so.read_bytes()[:1000])
    capfd.readouterr()
    assert kernel_build.build("native") == so
    assert _record(so) == kernel_build._sha256(so) and so.stat().st_size > 1000
    assert capfd.readouterr().err == ""


def test_cache_files_follow_the_umask(cache):
    _native_gcc()
    old = os.umask(0o027)
    try:
        lib, why = kernel_build.probe("native")
    finally:
        os.umask(old)
    assert lib is not None, why
    (so,) = cache.glob("*.so")
    assert stat.S_IMODE(so.stat().st_mode) == 0o750  # a shared library: executable, as the compiler makes it
    assert stat.S_IMODE(Path(str(so) + ".sha256").stat().st_mode) == 0o640
    assert stat.S_IMODE(cache.stat().st_mode) == 0o750
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no build folders left
