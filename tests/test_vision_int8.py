"""The opt-in int8 vision tower (engine/native/vision_int8.py, csrc "int8 vision linears"):

- the VNNI GEMM equals the dequantized integer math (the int32 accumulation is exact, so only
  the float32 epilogue and the bf16 store round), with tails in M, N and K, bias, fused GELU;
- activation and weight quantization are exactly torch's round-half-even of x * 127 / amax;
- every ISA build either runs it or says it cannot (and the module then runs bf16);
- the int8 tower stays close to the bf16 one (a stated bound), and is the bf16 tower exactly
  with the kernels off; the switch off changes nothing; the prompt cache keeps them apart;
- the CLI option: one warning line where it cannot run, named as ignored with --server.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import test_kernel_build as tkb  # module import: its tests are not collected twice
import test_kernels as tk
import torch
import torch.nn.functional as F

import dsvl2_cli
from dsvl2_cli.engine.native import int8_kernels, kernels, vision_int8
from dsvl2_cli.engine.native.fast import install_vision
from dsvl2_cli.engine.prompt_store import PromptStore
from dsvl2_cli.model.config import VisionConfig
from dsvl2_cli.model.vision import VisionTower

needs_vnni = pytest.mark.skipif(not (tk.EXPECTED_HERE and int8_kernels.int8_gemm_available()),
                                reason="no AVX512-VNNI int8 kernel on this machine")


def _quantize_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of a bf16 (R, K) matrix, as the kernels define it: codes
    round_half_even(x * (127 / amax)) in float32, clamped to +-127, and scales amax / 127."""
    xf = x.float()
    amax = xf.abs().amax(dim=1)  # (R,)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    codes = torch.round(xf * inv[:, None]).clamp(-127, 127).to(torch.int32)
    return codes, amax / 127


def _gemm_reference(x, w, bias, gelu):
    """float64 of the kernel's math: (sa sw) (qa . qw) + bias, from torch's own quantization."""
    qa, sa = _quantize_reference(x)  # (M, K), (M,)
    qw, sw = _quantize_reference(w)  # (N, K), (N,)
    acc = qa.double() @ qw.double().T  # exact: integers far below 2^53
    y = acc * (sa.double()[:, None] * sw.double()[None, :])
    if bias is not None:
        y = y + bias.double()
    return F.gelu(y, approximate="tanh") if gelu else y


# (M, N, K): M tails of the 6-row tile and the 96-row work item, N not a multiple of 64 or 16,
# K not a multiple of 16 (4304 % 16 = 0 is false too) or of 4 (padded).
SHAPES = [(1, 16, 4), (7, 70, 36), (13, 200, 100), (101, 130, 52), (6, 64, 1152), (2, 33, 7)]


@needs_vnni
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bias,gelu", [(True, False), (False, False), (True, True)])
def test_int8_gemm_equals_the_dequantized_integer_math(m, n, k, bias, gelu):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = (torch.randn(m, k, generator=g) * 3).bfloat16()
    x[0, : min(k, 3)] *= 20  # an outlier: its row's scale is 20x the others'
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    b = torch.randn(n, generator=g) if bias else None
    packed = int8_kernels.pack_int8(w)
    assert packed is not None
    y = int8_kernels.int8_linear(x, packed, b, gelu)
    assert y is not None and y.shape == (m, n) and y.dtype == torch.bfloat16
    ref = _gemm_reference(x, w, b, gelu)
    # bf16 store: half an ulp (2^-8 relative); float32 epilogue and GELU: ~1e-6 of the terms' size
    terms = ref.abs() + (b.double().abs() if b is not None else 0) + 1e-30
    bound = ref.abs() * 2.0**-8 + terms * 1e-5
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"
    # and the batched layout: (B, T, K) in, (B, T, N) out, the same rows
    y3 = int8_kernels.int8_linear(x.view(1, m, k), packed, b, gelu)
    assert y3.shape == (1, m, n) and torch.equal(y3[0], y)


@needs_vnni
def test_quantization_is_torch_round_half_even():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(9, 37, generator=g) * 4).bfloat16()
    x[3] = 0  # a zero row: scale 0, codes at the offset
    x[4, :5] = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.25]) * 127 / 127  # exact halves after scaling
    codes, scales = int8_kernels.quantize_rows(x)
    want, want_s = _quantize_reference(x)
    assert codes.shape == (9, 40) and codes.dtype == torch.uint8
    assert torch.equal(codes[:, :37].to(torch.int32) - 128, want) and (codes[:, 37:] == 128).all()
    assert torch.equal(scales, want_s) and scales[3] == 0
    w = (torch.randn(70, 37, generator=g) * 0.1).bfloat16()
    w[5] = 0
    packed = int8_kernels.pack_int8(w)
    qw, sw = _quantize_reference(w)
    assert packed.packed.shape == (2, 10, 64, 4)  # N 70 -> 128, K 37 -> 40
    assert torch.equal(packed.codes().to(torch.int32), qw)
    full = packed.packed.permute(0, 2, 1, 3).reshape(128, 40)
    assert (full[70:] == 0).all() and (full[:, 37:] == 0).all()  # padding contributes nothing
    assert torch.equal(packed.scales[:70], sw) and (packed.scales[70:] == 0).all()
    assert torch.equal(packed.corr[:70], 128 * qw.sum(dim=1)) and (packed.corr[70:] == 0).all()


def test_int8_linear_declines_what_it_cannot_run():
    w = torch.randn(20, 8).bfloat16()
    packed = int8_kernels.pack_int8(w)
    if packed is None:
        assert not int8_kernels.int8_gemm_available()
        return
    x = torch.randn(3, 8)
    assert int8_kernels.int8_linear(x, packed) is None  # float32 input
    assert int8_kernels.int8_linear(x.bfloat16()[:, :7], packed) is None  # wrong K
    assert int8_kernels.int8_linear(x.bfloat16(), packed, torch.randn(20).bfloat16()) is None  # bias not float32
    assert int8_kernels.pack_int8(w.float()) is None  # not bf16
    assert int8_kernels.pack_int8(w.T) is None  # not contiguous
    with kernels.disabled():
        assert not int8_kernels.int8_gemm_available() and int8_kernels.int8_linear(x.bfloat16(), packed) is None


@pytest.mark.parametrize("variant", ["avx512", "avx2", "portable"])
def test_every_isa_variant_runs_it_or_says_it_cannot(variant):
    lib = tkb._variant_library(variant)
    has_vnni = "avx512_vnni" in tkb._cpu_flags() and variant == "avx512"  # -mno-avx512f takes VNNI away too
    assert bool(lib.dsvl2_int8_vnni()) == has_vnni
    with kernels.using(variant):
        assert int8_kernels.int8_gemm_available() == has_vnni
        if has_vnni:
            test_int8_gemm_equals_the_dequantized_integer_math(13, 200, 100, True, True)
            return
        layer = vision_int8._int8_linear(torch.nn.Linear(12, 20).bfloat16())
        x = torch.randn(5, 12).bfloat16()
        # packing is plain C in every build, the GEMM is not: it declines, the module runs bf16
        assert isinstance(layer, vision_int8.Int8Linear) and layer.int8 is not None
        assert int8_kernels.int8_linear(x, layer.int8, layer.bias_f32) is None
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert vision_int8.install(_towers()[1]) == 0  # and the tower is left as it is


# ----------------------------------------------------------------------------- the tower

def _towers():
    cfg = VisionConfig("siglip_so400m_patch14_384", 56, 14, 64, 3, 4, 3.7362)  # 16 patches, MLP 239 wide
    torch.manual_seed(0)
    plain = VisionTower(cfg).eval()
    with torch.no_grad():
        for name, p in plain.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.1 if name.endswith("weight") and p.dim() == 2 else 0.3))
    plain = plain.bfloat16()
    fast = VisionTower(cfg).bfloat16().eval()
    fast.load_state_dict(plain.state_dict())
    install_vision(fast, native=True)
    return plain, fast


# Random weights, SigLIP's layout scaled down (3 blocks, width 64): per feature row cosine >=
# 0.9995 and relative L2 error <= 1.5% over the whole output (measured: 0.99998 and 0.44%, a
# third of the bound). Real checkpoints' outliers are another matter (README, and
# benchmarks/bench_vision_int8.py for the real-shape synthetic model).
COSINE_MIN, REL_ERR_MAX = 0.9995, 0.015


@needs_vnni
def test_int8_tower_is_close_to_bf16_and_exactly_bf16_with_the_kernels_off():
    plain, fast = _towers()
    held = fast.blocks[0].attn.qkv.weight.data_ptr()
    made = vision_int8.install(fast)
    qkv, mlp = fast.blocks[0].attn.qkv, fast.blocks[1].mlp
    assert type(qkv) is vision_int8.Int8Linear and type(mlp) is vision_int8.Int8VisionMLP
    assert qkv.weight.data_ptr() == held and qkv.weight.dtype == torch.bfloat16  # bf16 kept as it was
    assert made == sum(m.int8.nbytes for m in fast.modules() if isinstance(m, vision_int8.Int8Linear)) > 0
    assert vision_int8.enabled(fast) and not vision_int8.enabled(plain)
    pixels = torch.rand(3, 3, 56, 56).bfloat16() * 2 - 1
    with torch.inference_mode():
        want = plain(pixels).float()  # (3, 16, 64)
        got = fast(pixels).float()
        cos = F.cosine_similarity(got, want, dim=-1)
        rel = ((got - want).norm() / want.norm()).item()
        assert cos.min().item() >= COSINE_MIN and rel <= REL_ERR_MAX, (cos.min().item(), rel)
        assert not torch.equal(got, want)  # it did run in int8
        with kernels.disabled():
            assert torch.equal(fast(pixels), plain(pixels))


def _vision_features(vlm, pixels):
    with torch.inference_mode():
        return vlm.model.vision(pixels)


@needs_vnni
def test_load_switch_off_changes_nothing_and_on_changes_the_features(ckpt_tiny, monkeypatch):
    monkeypatch.delenv("DSVL2_VISION_INT8", raising=False)
    default = dsvl2_cli.load(ckpt_tiny, dtype="bfloat16", device="cpu")
    off = dsvl2_cli.load(ckpt_tiny, dtype="bfloat16", device="cpu", vision_int8=False)
    monkeypatch.setenv("DSVL2_VISION_INT8", "1")
    on = dsvl2_cli.load(ckpt_tiny, dtype="bfloat16", device="cpu")  # from the environment
    assert not default.vision_int8 and not off.vision_int8 and on.vision_int8
    assert not any(isinstance(m, vision_int8.Int8Linear) for m in off.model.modules())
    size = default.config.vision.image_size
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).bfloat16() * 2 - 1
    base = _vision_features(default, pixels)
    assert torch.equal(_vision_features(off, pixels), base)
    int8 = _vision_features(on, pixels)
    assert not torch.equal(int8, base)
    assert F.cosine_similarity(int8.float(), base.float(), dim=-1).min() > 0.95
    # the prompt cache: same folder, dtype, device, positions; another entry for int8 vision
    store = PromptStore(ckpt_tiny.parent / "unused")
    keys = [1, 2, 3]
    a, b, c = store.key_for(off, keys), store.key_for(on, keys), store.key_for(default, keys)
    assert a == c and a.name != b.name and b.model == a.model + "+vision-int8"


@needs_vnni
def test_packed_weights_are_cached_mapped_and_checked(ckpt_tiny, monkeypatch, tmp_path):
    """The first int8 load packs and writes a mapped-folder entry; the next one maps it (packing
    nothing: file pages, not private memory) with the same features; a damaged entry is caught,
    named in a warning, and rebuilt; `dsvl2 cache` lists it; without mapping nothing is written."""
    from dsvl2_cli.engine.loading import mapped_store

    monkeypatch.setenv("DSVL2_MMAP_DIR", str(tmp_path / "mapped"))
    size = 384
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)).bfloat16() * 2 - 1
    first = dsvl2_cli.load(ckpt_tiny, dtype="bfloat16", device="cpu", vision_int8=True)
    entry = [e for e in mapped_store.entries() if e.quant == vision_int8.QUANT_KEY]
    assert len(entry) == 1 and entry[0].state == mapped_store.READY and entry[0].source == str(ckpt_tiny.resolve())
    base = _vision_features(first, pixels)

    real_pack = int8_kernels.pack_int8
    monkeypatch.setattr(int8_kernels, "pack_int8", lambda w: pytest.fail("packed again although the cache is sound"))
    second = dsvl2_cli.load(ckpt_tiny, dtype="bfloat16", device="cpu", vision_int8=True)
    assert second.vision_int8 and torch.equal(_vision_features(second, pixels), base)
    maps = Path("/proc/self/maps")
    assert not maps.exists() or str(entry[0].files[1]) in maps.read_text()  # the file is mapped, not copied
    monkeypatch.setattr(int8_kernels, "pack_int8", real_pack)

    data = entry[0].files[1]
    with open(data, "r+b") as f:  # one byte of the header: a foreign or rewritten file
        f.seek(20)
        byte = f.read(1)
        f.seek(20)
        f.write(bytes([byte[0] ^ 0x20]))
    with pytest.warns(UserWarning, match="int8 vision cache not used"):
        third = dsvl2_cli.load(ckpt_tiny, dtype="bfloat16", device="cpu", vision_int8=True)
    assert torch.equal(_vision_features(third, pixels), base)

    monkeypatch.setenv("DSVL2_MMAP_DIR", str(tmp_path / "unused"))
    copied = dsvl2_cli.load(ckpt_tiny, dtype="bfloat16", device="cpu", vision_int8=True, mmap=False)
    assert torch.equal(_vision_features(copied, pixels), base) and not (tmp_path / "unused").exists()


@needs_vnni
def test_memory_plan_counts_the_int8_tower_it_will_make(ckpt_tiny):
    """The memory check before a load with --vision-int8 counts the packed weights the load then
    makes (their own weights component), and only where the int8 tower will run."""
    from dsvl2_cli.engine.loading import fit, memory_plan

    vlm = dsvl2_cli.load(ckpt_tiny, dtype="bfloat16", device="cpu", vision_int8=True)
    made = sum(m.int8.nbytes for m in vlm.model.vision.modules() if isinstance(m, vision_int8.Int8Linear))
    assert made > 0 and memory_plan.vision_int8_bytes(vlm.config) == made
    plain = fit.check_load(ckpt_tiny, "tiny-like", torch.bfloat16, "cpu")
    asked = fit.check_load(ckpt_tiny, "tiny-like", torch.bfloat16, "cpu", vision_int8=True)
    assert asked.plan.weights["vision_int8"] == made and "vision_int8" not in plain.plan.weights
    assert asked.plan.total == plain.plan.total + made
    in_f32 = fit.check_load(ckpt_tiny, "tiny-like", torch.float32, "cpu", vision_int8=True)  # will not run
    assert "vision_int8" not in in_f32.plan.weights


def test_vision_int8_where_it_cannot_run_warns_once_and_loads_the_usual_path(ckpt_tiny):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vlm = dsvl2_cli.load(ckpt_tiny, dtype="float32", device="cpu", vision_int8=True)
    lines = [str(w.message) for w in caught if "int8 vision" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0] and "bfloat16" in lines[0] and "float32" in lines[0]
    assert not vlm.vision_int8 and not vision_int8.enabled(vlm.model.vision)


# ------------------------------------------------------------------------------- the CLI

def test_cli_vision_int8_where_it_cannot_run_is_one_warning_line(monkeypatch, ckpt_tiny, tmp_path):
    from test_cli import model_args, run

    from dsvl2_cli.dev.synthetic import write_image

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local folder: nothing to download, nothing tried
    photo = write_image(tmp_path / "photo.png", 96, 64, seed=5)
    r = run(monkeypatch, "chat", *model_args(ckpt_tiny), "--vision-int8", "--no-cache", str(photo), "hi")
    assert r.code == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "int8 vision" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "float32" in lines[0], r.stderr
