"""Logit-level checks of the bfloat16 paths (the default: bf16 on CPU, native decode kernels)
against a float32 twin of the same weights.

Why a float32 reference and not greedy tokens: on untrained weights the top-2 logit margins are
near zero, so tokens cannot tell a 5% error in one product from bf16 rounding. Logits can.

The metric: per decode position, ||logits - ref|| / ||ref|| against the float32 model's full
recompute (decompressed MLA, torch), the median over 3 prompts x 6 positions. The median, because
a near-tied router choice (the fixtures' routers are untrained) flips an expert now and then
under bf16 rounding and moves one position's logits by ~0.1 whatever the path; a wrong product
moves every position.

The noise: the bf16 model's own full recompute (decompressed, torch, kernels off) against float32,
measured in each test: ~0.011 on these fixtures (3 layers, hidden 512; each bf16 rounding costs
up to 2^-8 relative, amplified through the untrained layers). Every other bf16 path (decode steps
or full recompute; kernels on or off; absorbed or decompressed MLA) does the same roundings in
another order, and must be within 1.25 x noise + 2^-8 (measured 0.0108-0.0112: ratio ~1.0).
Measured with the audit's mutations (issue 16), which the bound must catch (0.0174 here):
- absorbed query 10% off (`q_nope * 1.1` in LatentAttention._absorbed): 0.041;
- absorbed value output 5% off: 0.035;
- dense MLP decode weights 1.05 instead of 1.0 (FastMLP, kernels on): 0.036.
`test_bound_has_teeth` checks that the fixture keeps that sensitivity.

The fixtures are the small families widened (hidden 512, 8 heads, MLA rank 128): written with
dsvl2_cli.dev.synthetic into a temporary folder (~0.2 s) and loaded through the real loader, so
the fast modules are swapped in exactly as `dsvl2_cli.load` does.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from helpers import load_vlm, picture

import dsvl2_cli
from dsvl2_cli.dev import synthetic
from dsvl2_cli.engine.native import f32_products, kernels
from dsvl2_cli.engine import quant
from dsvl2_cli.engine.native.fast import FastLayerNorm, FastMLP, FastVisionMLP, NativeExperts
from dsvl2_cli.engine.quant import nf4 as quant_nf4
from dsvl2_cli.model.attention import LatentAttention

try:
    quant_nf4.bitsandbytes()
    HAVE_BNB = True
except quant.QuantizationError:
    HAVE_BNB = False

U = 2.0**-8  # bf16 unit roundoff (8 significant bits)
RATIO = 1.25  # a path's error may exceed the reference path's by this factor, plus U
PROMPTS, STEPS, LENGTH = 3, 6, 40

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="native kernels not available here")


def _wide(base: str, name: str) -> synthetic.FamilySpec:
    spec = synthetic.family_spec(base)
    lm = replace(spec.lm, hidden=512, intermediate=1024, moe_intermediate=128, heads=8)
    if lm.use_mla:
        lm = replace(lm, kv_lora_rank=128, qk_nope=32, qk_rope=16, v_head=32)
    return replace(spec, name=name, lm=lm)


WIDE = {"wide-mla": _wide("small-like", "wide-mla"), "wide-mha": _wide("tiny-like", "wide-mha")}


@pytest.fixture(scope="module")
def wide_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    with pytest.MonkeyPatch.context() as mp:
        for name, spec in WIDE.items():
            mp.setitem(synthetic._SPECS, name, spec)
        return {name: synthetic.write_checkpoint(root / name, name) for name in WIDE}


@pytest.fixture(scope="module")
def wide_models(wide_ckpts):
    """family -> (float32 model, bfloat16 model, float32 reference logits, bf16 noise)."""
    out = {}
    for name, p in wide_ckpts.items():
        f32, b16 = load_vlm(p), load_vlm(p, "bfloat16")
        reference = reference_logits(f32)
        out[name] = f32, b16, reference, bf16_noise(b16, reference)
    return out


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(200, 1000, (LENGTH,), generator=g) for _ in range(PROMPTS)]


def set_path(vlm, path):
    for layer in vlm.model.language.model.layers:
        if isinstance(layer.self_attn, LatentAttention):
            layer.self_attn.path = path


@torch.inference_mode()
def full(vlm, ids, path="decompressed"):
    """Logits (STEPS, V) of the last STEPS positions, from one uncached forward pass."""
    set_path(vlm, path)
    try:
        return vlm.forward(vlm.embed_tokens(ids[None]))[0, -STEPS:].float()
    finally:
        set_path(vlm, None)


@torch.inference_mode()
def steps(vlm, ids, path=None):
    """The same positions' logits, one decode step each after a prefill of the rest."""
    set_path(vlm, path)
    try:
        cache = vlm.new_cache()
        vlm.forward(vlm.embed_tokens(ids[None, :-STEPS]), cache)
        return torch.cat([vlm.forward(vlm.embed_tokens(ids[None, i:i + 1]), cache)[0]
                          for i in range(len(ids) - STEPS, len(ids))]).float()
    finally:
        set_path(vlm, None)


def median_rel(run, reference) -> float:
    """Median over prompts and positions of ||run - ref|| / ||ref|| per position."""
    errs = []
    for ids, ref in zip(prompts(), reference):
        got = run(ids)
        errs.append((got - ref).norm(dim=-1) / ref.norm(dim=-1))
    return torch.cat(errs).median().item()


def reference_logits(f32):
    return [full(f32, ids) for ids in prompts()]


def bf16_noise(b16, reference) -> float:
    """The reference bf16 path's error: full recompute, decompressed, plain torch."""
    with kernels.disabled():
        noise = median_rel(lambda ids: full(b16, ids), reference)
    layers = b16.config.language.num_hidden_layers
    assert noise < 4 * U * math.sqrt(layers)  # bf16 rounding, not a broken model (measured 0.011)
    return noise


def run_mode(vlm, mode, path, native):
    def run(ids):
        fn = steps if mode == "step" else full
        if native:
            return fn(vlm, ids, path)
        with kernels.disabled():
            return fn(vlm, ids, path)
    return run


# ---------------------------------------------------------------------- float32: exact paths

@pytest.mark.parametrize("family", list(WIDE))
def test_float32_paths_agree(wide_models, family):
    """In float32 the absorbed and decompressed MLA and the decode steps are the same math: they
    agree to float32 summation order (measured ~1e-6), far below any of the mutations."""
    f32, _, reference, _ = wide_models[family]
    runs = [lambda ids: steps(f32, ids)]
    if family == "wide-mla":
        runs += [lambda ids: steps(f32, ids, "absorbed"), lambda ids: steps(f32, ids, "decompressed"),
                 lambda ids: full(f32, ids, "absorbed")]
    for run in runs:
        assert median_rel(run, reference) < 1e-5


# ---------------------------------------------------------------------- bfloat16 paths

BF16_CASES = [(m, p, n) for m in ("step", "full") for p in (None, "absorbed", "decompressed") for n in (True, False)]


@pytest.mark.parametrize("family", list(WIDE))
@pytest.mark.parametrize("mode, path, native", BF16_CASES,
                         ids=[f"{m}-{p or 'auto'}-{'kernels' if n else 'torch'}" for m, p, n in BF16_CASES])
def test_bf16_path_within_rounding_noise(wide_models, family, mode, path, native):
    if family == "wide-mha" and path is not None:
        pytest.skip("plain multi-head attention has one path")
    if native and not kernels.available():
        pytest.skip("native kernels not available here")
    _, b16, reference, noise = wide_models[family]
    err = median_rel(run_mode(b16, mode, path, native), reference)
    assert err <= RATIO * noise + U, (err, noise)


@needs_kernels
def test_fast_modules_are_in_place(wide_models):
    """The bf16 tests above exercise the native modules (so the kernels-on cases mean something)."""
    for family in WIDE:
        layers = wide_models[family][1].model.language.model.layers
        assert type(layers[0].mlp) is FastMLP
        assert type(layers[1].mlp.experts) is NativeExperts
        vision = wide_models[family][1].model.vision
        assert type(vision.blocks[0].mlp) is FastVisionMLP and type(vision.norm) is FastLayerNorm
        assert type(vision.blocks[-1].norm1) is FastLayerNorm and type(vision.blocks[-1].norm2) is FastLayerNorm


def test_bound_has_teeth(wide_models):
    """A 5% error in one layer's attention output, in the bf16 model only, breaks the bound (so
    the fixture is sensitive enough for the mutations listed in the module docstring)."""
    _, b16, reference, noise = wide_models["wide-mla"]
    w = b16.model.language.model.layers[1].self_attn.o_proj.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(1.05)
        err = median_rel(run_mode(b16, "step", None, kernels.available()), reference)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert err > RATIO * noise + U, (err, noise)


# ---------------------------------------------------------------------- quantized experts

def dequantized_twins(path, qvlm):
    """float32 and bf16 models whose routed experts hold `qvlm`'s dequantized weights as floats."""
    f32 = dsvl2_cli.load(path, dtype="float32", device="cpu")
    b16 = dsvl2_cli.load(path, dtype="bfloat16", device="cpu")
    count = 0
    for q_layer, f_layer, b_layer in zip(*(m.model.language.model.layers for m in (qvlm, f32, b16))):
        experts = getattr(q_layer.mlp, "experts", None)
        if isinstance(experts, quant.QuantizedExperts):
            gate_up, down = experts.dequantize()
            with torch.no_grad():
                for m in (f_layer.mlp.experts, b_layer.mlp.experts):
                    m.gate_up.copy_(gate_up)
                    m.down.copy_(down)
            count += 1
    assert count == qvlm.config.language.num_hidden_layers - 1
    return f32, b16


QUANT_METHODS = ["int8", "int4", pytest.param("nf4", marks=pytest.mark.skipif(not HAVE_BNB, reason="no bitsandbytes"))]


@pytest.mark.parametrize("method", QUANT_METHODS)
def test_quantized_paths_match_their_dequantized_weights(wide_ckpts, method):
    """The quantized experts against the very weights they hold: only bf16 rounding apart (the
    quantization error is in both sides). Decode steps (the native quantized kernel where it
    applies, torch's with kernels off) and the full recompute (the grouped path)."""
    path = wide_ckpts["wide-mla"]
    qvlm = dsvl2_cli.load(path, dtype="bfloat16", device="cpu", quantize=method)
    f32, b16 = dequantized_twins(path, qvlm)
    reference = reference_logits(f32)
    noise = bf16_noise(b16, reference)
    for mode, native in (("step", True), ("step", False), ("full", True), ("full", False)):
        err = median_rel(run_mode(qvlm, mode, None, native), reference)
        assert err <= RATIO * noise + U, (mode, native, err, noise)


# ---------------------------------------------------------------------- prefill attention kernel

@torch.inference_mode()
def chunked(vlm, ids, split=LENGTH // 2):
    """The last STEPS positions' logits from a prefill in two chunks: the second chunk's queries
    sit after a cache (causal with an offset: the native kernel's `causal_offset` case). MLA
    decompressed: these chunks are short enough for the absorbed path otherwise."""
    set_path(vlm, "decompressed")
    try:
        cache = vlm.new_cache()
        vlm.forward(vlm.embed_tokens(ids[None, :split]), cache)
        return vlm.forward(vlm.embed_tokens(ids[None, split:]), cache)[0, -STEPS:].float()
    finally:
        set_path(vlm, None)


@needs_kernels
@pytest.mark.parametrize("family", list(WIDE))
def test_prefill_kernel_logits_within_rounding_noise(wide_models, family, monkeypatch):
    """Prefill through the native attention kernel (whole and chunked after a cache) against the
    float32 reference, within the bound of every other bf16 path; and the kernel did run. On a
    CPU below AVX512-BF16 the model keeps torch's SDPA: the kernel's AVX2 or portable build is
    forced here (min_isa=0), so that it is checked at logit level on every machine."""
    _, b16, reference, noise = wide_models[family]
    calls = []
    real = kernels.prefill_attention

    def counted(*args, **kwargs):
        out = real(*args, **{**kwargs, "min_isa": 0})
        calls.append(out is not None)
        return out

    monkeypatch.setattr(kernels, "prefill_attention", counted)
    for run in (lambda ids: full(b16, ids), lambda ids: chunked(b16, ids)):
        calls.clear()
        err = median_rel(run, reference)
        assert err <= RATIO * noise + U, (err, noise)
        assert calls and all(calls), calls  # every prefill attention call took the kernel


def _image_prompt(vlm):
    from dsvl2_cli.engine.prompt.processor import user_message
    return vlm.prepare([user_message("Describe.", [picture(400, 300, seed=3)])])


@needs_kernels
def test_vision_tower_kernel_logits_within_rounding_noise(wide_ckpts, wide_models, monkeypatch):
    """An image prompt: the vision tower's attention, LayerNorms and bias + GELU and the prefill
    through the native kernels, against the float32 model, within the bound the torch bf16 path
    sets on the same prompt; and the vision kernels did run."""
    f32, b16, _, _ = wide_models["wide-mla"]
    prepared = _image_prompt(b16)
    ran = {"gelu": 0, "norm": 0}
    real_gelu, real_norm = kernels.bias_gelu_, kernels.layer_norm

    def gelu(*args):
        out = real_gelu(*args)
        ran["gelu"] += out is not None
        return out

    def norm(*args):
        out = real_norm(*args)
        ran["norm"] += out is not None
        return out

    monkeypatch.setattr(kernels, "bias_gelu_", gelu)
    monkeypatch.setattr(kernels, "layer_norm", norm)
    with torch.inference_mode():
        ref = f32.logits(prepared).float()
        native = b16.logits(prepared).float()
        with kernels.disabled():
            plain = b16.logits(prepared).float()

    def rel(x):
        return ((x - ref).norm(dim=-1) / ref.norm(dim=-1)).median().item()

    assert rel(native) <= RATIO * rel(plain) + U, (rel(native), rel(plain))
    assert not torch.equal(native, plain)  # the kernels did run: another rounding order
    layers = len(b16.model.vision.blocks)
    assert ran["gelu"] >= layers and ran["norm"] >= 2 * layers + 1, ran  # every block, once per tile batch


# ------------------------------------------------------- float32 products (CPUs without bf16 dots)

def _count_conversions(monkeypatch) -> list:
    """A list that grows by one for each bf16 tensor the mode hands its product as float32."""
    converted = []
    real_up = f32_products._up

    def up(x):
        out = real_up(x)
        if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 and out.dtype == torch.float32:
            converted.append(1)
        return out

    monkeypatch.setattr(f32_products, "_up", up)
    return converted


@pytest.mark.parametrize("family", list(WIDE))
def test_float32_products_within_rounding_noise(wide_ckpts, wide_models, family, monkeypatch):
    """DSVL2_BF16_PRODUCTS=float32 (the default where the CPU lacks bf16 dot products) and
    =native, on every machine: prefill, decode steps after it, and an image prompt (the vision
    tower and the adaptor) against the float32 model, within the bound of every bf16 path; the
    float32 products did run (another rounding order than native's) and only where asked."""
    f32, _, reference, noise = wide_models[family]
    converted = _count_conversions(monkeypatch)
    models = {}
    for choice in ("native", "float32"):
        monkeypatch.setenv("DSVL2_BF16_PRODUCTS", choice)
        models[choice] = vlm = dsvl2_cli.load(wide_ckpts[family], dtype="bfloat16", device="cpu")
        assert f32_products.installed(vlm.model.vision) == (choice == "float32")
        for run in (lambda ids: full(vlm, ids), lambda ids: steps(vlm, ids)):
            converted.clear()
            err = median_rel(run, reference)
            assert err <= RATIO * noise + U, (choice, err, noise)
            assert bool(converted) == (choice == "float32"), choice
    prepared = _image_prompt(f32)
    with torch.inference_mode():
        ref = f32.logits(prepared).float()
        got = {choice: vlm.logits(prepared).float() for choice, vlm in models.items()}
    rel = {c: ((x - ref).norm(dim=-1) / ref.norm(dim=-1)).median().item() for c, x in got.items()}
    assert rel["float32"] <= RATIO * rel["native"] + U, rel
    assert not torch.equal(got["float32"], got["native"])
    # the prompt cache keeps the two apart (another rounding order of the same prefix)
    from dsvl2_cli.engine.prompt_store import PromptStore
    store = PromptStore(wide_ckpts[family].parent / "unused")
    native_key, f32_key = (store.key_for(models[c], [1, 2]) for c in ("native", "float32"))
    assert models["float32"].f32_products and not models["native"].f32_products
    assert f32_key.model == native_key.model + "+f32-products"


def test_float32_products_mode_converts_only_bf16_products_with_rows(monkeypatch):
    """Inside the mode: bf16 products with enough rows are converted and give bf16 computed in
    float32 (equal to the float32 product rounded once); float32 products, few-row products and
    other ops are not converted and are bit for bit what they give outside."""
    converted = _count_conversions(monkeypatch)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(32, 64, generator=g).bfloat16(), torch.randn(48, 64, generator=g).bfloat16()
    b = torch.randn(48, generator=g).bfloat16()
    img, kernel = torch.randn(1, 3, 28, 28, generator=g).bfloat16(), torch.randn(8, 3, 14, 14, generator=g).bfloat16()
    cases = {
        "linear": (lambda: torch.nn.functional.linear(x, w, b),
                   lambda: torch.nn.functional.linear(x.float(), w.float(), b.float())),
        "matmul": (lambda: x @ w.T, lambda: x.float() @ w.float().T),
        "einsum": (lambda: torch.einsum("td,nd->tn", x, w), lambda: torch.einsum("td,nd->tn", x.float(), w.float())),
        "conv2d": (lambda: torch.nn.functional.conv2d(img, kernel, stride=14),
                   lambda: torch.nn.functional.conv2d(img.float(), kernel.float(), stride=14)),
    }
    for name, (op, wide) in cases.items():
        converted.clear()
        with f32_products.Float32Products():
            out = op()
        assert converted, name  # the mode saw the product (bf16 may round to the same values)
        assert out.dtype == torch.bfloat16, name
        assert torch.equal(out, wide().bfloat16()), name
    few = x[:f32_products.OP_MIN_ROWS - 1]
    untouched = [lambda: few @ w.T, lambda: x.float() @ w.float().T, lambda: (x * 3).softmax(-1)]
    for op in untouched:
        converted.clear()
        with f32_products.Float32Products():
            inside = op()
        assert not converted
        assert torch.equal(inside, op()) and inside.dtype == op().dtype


def test_float32_products_choice(monkeypatch):
    """auto: float32 exactly where the CPU flags lack bf16 dot products; bf16 models on CPU only;
    a bad DSVL2_BF16_PRODUCTS is a one-line InputError."""
    from dsvl2_cli.errors import InputError
    cpu = torch.device("cpu")
    for flags, native in ((frozenset({"avx2", "fma"}), False), (frozenset({"avx512f", "avx512_bf16"}), True),
                          (frozenset({"amx_bf16"}), True), (frozenset({"asimd", "bf16"}), True), (None, True)):
        monkeypatch.setattr(f32_products, "_cpu_flags", lambda flags=flags: flags)
        assert f32_products.native_bf16_dot() == native, flags
        monkeypatch.delenv("DSVL2_BF16_PRODUCTS", raising=False)
        assert f32_products.wanted(torch.bfloat16, cpu) == (not native)
        assert not f32_products.wanted(torch.float32, cpu)
        assert not f32_products.wanted(torch.bfloat16, torch.device("meta"))
        monkeypatch.setenv("DSVL2_BF16_PRODUCTS", "float32")
        assert f32_products.wanted(torch.bfloat16, cpu)
        monkeypatch.setenv("DSVL2_BF16_PRODUCTS", "Native")
        assert not f32_products.wanted(torch.bfloat16, cpu)
    monkeypatch.setenv("DSVL2_BF16_PRODUCTS", "fp32")
    with pytest.raises(InputError, match="DSVL2_BF16_PRODUCTS=fp32: expected one of auto, native, float32"):
        f32_products.wanted(torch.bfloat16, cpu)
