"""`dsvl2 bench`: speed and memory at the real model shapes, against the machine's own limits and
a peer, all measured in one run (machines are noisy: compare ratios from the same run).

Synthetic checkpoints with the exact shapes of the real models and random weights (speed and
memory do not depend on the values) are written once into a work folder. Measured:
- the ceilings: memory read bandwidth and the bf16 matmul rate of this machine;
- vision encoding per tile, prefill tokens/s, time to first token for a 640x480 photo with a short
  question and for a 3x3-tiled document page, decode tokens/s at ~10 and ~2000 tokens of context,
  peak RSS while generating, cache bytes per token;
- each as a fraction of its floor: decode floor = bytes read per token / bandwidth, prefill
  floor = counted FLOPs / matmul rate;
- the peer: transformers' DeepseekV2ForCausalLM on the same weights (the language model of an
  MLA configuration), decode and prefill.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from .. import settings
from ..engine import kernels
from ..engine.runtime import VLModel

DOC_IMAGE = (1152, 1152)  # a page that tiles 3x3: 210 + 1 + 42*43 = 2017 image tokens
PHOTO = (640, 480)  # tiles 2x2: 1023 image tokens


# ------------------------------------------------------------------ machine and accounting

def median(xs):
    return statistics.median(xs)


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median(times)


def machine_ceilings() -> dict:
    """Memory read bandwidth (sum over 1 GiB) and bf16 GEMM rate, medians of a few runs."""
    big = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    big.sum()
    read_s = timed(big.sum, 5)
    del big
    a = torch.randn(2048, 4096, dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, dtype=torch.bfloat16)
    a @ b
    mm_s = timed(lambda: a @ b, 5)
    return {"bandwidth_gb_s": 2**30 / read_s / 1e9, "matmul_bf16_gflop_s": 2 * 2048 * 4096 * 4096 / mm_s / 1e9}


def machine_description() -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "kernels": kernels.status()}


def lm_decode_bytes(cfg, context: int, dtype_bytes: int = 2) -> int:
    """Bytes one decode step reads: every dense weight, k routed experts per MoE layer, the
    router in float32, one embedding row, the lm_head, and the cache of `context` positions."""
    lm = cfg.language
    d = lm.hidden_size
    total = d + lm.vocab_size * d + d  # embedding row, lm_head, final norm
    for layer in range(lm.num_hidden_layers):
        total += 2 * d  # norms
        if lm.use_mla:
            h = lm.num_attention_heads
            total += d * h * lm.q_head_dim + d * (lm.kv_lora_rank + lm.qk_rope_head_dim) + lm.kv_lora_rank
            total += h * (lm.qk_nope_head_dim + lm.v_head_dim) * lm.kv_lora_rank + h * lm.v_head_dim * d
        else:
            total += 2 * d * lm.num_attention_heads * lm.head_dim + 2 * d * lm.num_key_value_heads * lm.head_dim
        if lm.is_moe_layer(layer):
            total += (lm.num_experts_per_tok + (lm.n_shared_experts or 0)) * 3 * d * lm.moe_intermediate_size
            total += lm.n_routed_experts * d * 2  # router kept in float32: twice the bf16 bytes
            if lm.topk_method == "noaux_tc":
                total += lm.n_routed_experts * 2  # float32 correction bias
        else:
            total += 3 * d * lm.intermediate_size
    return total * dtype_bytes + context * lm.num_hidden_layers * lm.cache_values_per_token() * dtype_bytes


def lm_prefill_flops(cfg, tokens: int, attention: bool = True) -> float:
    """FLOPs of a causal prefill of `tokens` positions (the lm_head on the last one only);
    attention=False leaves out the score and value products (what FlopCounterMode sees on CPU)."""
    lm = cfg.language
    d, macs = lm.hidden_size, 0.0
    ctx = (tokens + 1) / 2  # average attended length under the causal mask
    for layer in range(lm.num_hidden_layers):
        if lm.use_mla:
            h, c = lm.num_attention_heads, lm.kv_lora_rank
            macs += tokens * (d * h * lm.q_head_dim + d * (c + lm.qk_rope_head_dim)
                              + c * h * (lm.qk_nope_head_dim + lm.v_head_dim) + h * lm.v_head_dim * d)
            macs += tokens * ctx * h * (lm.q_head_dim + lm.v_head_dim) * attention
        else:
            hd, h, kv = lm.head_dim, lm.num_attention_heads, lm.num_key_value_heads
            macs += tokens * (2 * d * h * hd + 2 * d * kv * hd) + tokens * ctx * h * 2 * hd * attention
        if lm.is_moe_layer(layer):
            macs += tokens * (d * lm.n_routed_experts
                              + (lm.num_experts_per_tok + (lm.n_shared_experts or 0)) * 3 * d * lm.moe_intermediate_size)
        else:
            macs += tokens * 3 * d * lm.intermediate_size
    macs += d * lm.vocab_size
    return 2 * macs


def vision_flops_per_tile(cfg, attention: bool = True) -> float:
    v, p = cfg.vision, cfg.projector
    n, w = v.grid * v.grid, v.width
    per_block = n * (4 * w * w + 2 * w * v.mlp_hidden) + 2 * n * n * w * attention
    tokens = cfg.tokens_per_tile_side ** 2
    adaptor = tokens * (4 * w * p.n_embed + p.n_embed * p.n_embed)
    return 2 * (v.layers * per_block + n * 3 * v.patch_size ** 2 * w + adaptor)


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------ our runtime

def ensure_checkpoint(work: Path, family: str, layers: int | None) -> Path:
    from .synthetic import write_checkpoint

    name = family + (f"-{layers}l" if layers else "")
    path = work / name
    if not (path / "config.json").exists():
        print(f"writing synthetic {name} checkpoint to {path} ...", file=sys.stderr, flush=True)
        write_checkpoint(path, family, layers=layers, dtype=torch.bfloat16)
    return path


def synthetic_image(size):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    w, h = size
    data = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(data, "RGB")


def decode_rate(vlm: VLModel, context_ids: list[int], steps: int) -> tuple[float, int]:
    """Median seconds per decode step after prefilling `context_ids`; and the cache bytes."""
    cache = vlm.new_cache()
    with torch.inference_mode():
        embeds = vlm.embed_tokens(torch.tensor([context_ids]))
        for s in range(0, embeds.shape[1], 512):
            logits = vlm.forward(embeds[:, s:s + 512], cache, last_only=True)
        token = logits[:, -1:].argmax(-1)  # (1, 1)
        times = []
        for _ in range(steps + 3):
            t = time.perf_counter()
            logits = vlm.forward(vlm.embed_tokens(token), cache)
            token = logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
    return median(times[3:]), cache.nbytes // cache.length


def text_ids(vlm: VLModel, n: int) -> list[int]:
    """A plain-text prompt of exactly n tokens (bos + repeated prose)."""
    tok = vlm.tokenizer
    base = tok.encode("The quick brown fox jumps over the lazy dog while the model reads on. ")
    ids = [tok.bos_id] + base * (n // max(1, len(base)) + 1)
    return ids[:n]


def bench_ours(path: Path, quick: bool) -> dict:
    import dsvl2_cli

    from ..engine.generate import Done, GenerationConfig, Prefilled, stream_generate
    from ..engine.processor import user_message

    gc.collect()
    reset_peak_rss()
    t = time.perf_counter()
    vlm = dsvl2_cli.load(path, dtype="bfloat16", device="cpu")
    load_s = time.perf_counter() - t
    load_peak = peak_rss_bytes()
    weight_bytes = sum(p.numel() * p.element_size() for p in vlm.model.parameters())
    cfg = vlm.config
    out = {"load_s": load_s, "load_peak_rss": load_peak, "weight_bytes": weight_bytes}
    out["model"] = {"layers": cfg.language.num_hidden_layers, "hidden": cfg.language.hidden_size,
                    "attention": "MLA" if cfg.language.use_mla else "MHA", "experts": cfg.language.n_routed_experts}

    # vision tower: the 5 tiles of a 640x480 photo
    photo = vlm.prepare([user_message("What is in this picture?", [synthetic_image(PHOTO)])])
    tiles = photo.pixel_values()
    with torch.inference_mode():
        vlm.model.encode_tiles(tiles[:1])
        vision_s = timed(lambda: vlm.model.encode_tiles(tiles), 1 if quick else 3) / tiles.shape[0]
    out["vision_s_per_tile"] = vision_s
    out["vision_gflop_s"] = vision_flops_per_tile(cfg) / vision_s / 1e9

    def first_token(prepared):
        events = stream_generate(vlm, prepared, GenerationConfig(max_tokens=2))
        result = {}
        for e in events:
            if isinstance(e, Prefilled):
                result["prompt_tokens"] = e.prompt_tokens
            if isinstance(e, Done):
                result["ttft_s"] = e.stats.time_to_first_token
                result["prefill_tok_s"] = e.stats.prefill_tokens_per_second
        return result

    # prefill of the language model alone on text, to compare with the peer and its floor
    n_prefill = 128 if quick else 1024
    ids = torch.tensor([text_ids(vlm, n_prefill)])
    with torch.inference_mode():
        embeds = vlm.embed_tokens(ids)
        prefill_s = timed(lambda: vlm.forward(embeds, None, last_only=True), 1 if quick else 2)
    out["lm_prefill"] = {"tokens": n_prefill, "tok_s": n_prefill / prefill_s,
                         "gflop_s": lm_prefill_flops(cfg, n_prefill) / prefill_s / 1e9}
    # from here on, generation as a user runs it: its peak RSS is the one reported
    reset_peak_rss()
    out["photo"] = first_token(photo)
    doc = vlm.prepare([user_message("Convert the document to markdown.", [synthetic_image(DOC_IMAGE)])])
    out["document"] = first_token(doc)
    steps = 8 if quick else 32
    for label, n in (("decode_ctx_short", 10), ("decode_ctx_2000", 2000)):
        step_s, per_token = decode_rate(vlm, text_ids(vlm, n), steps)
        out[label] = {"context": n, "ms_per_token": step_s * 1e3, "tok_s": 1 / step_s,
                      "bytes_read": lm_decode_bytes(cfg, n)}
        out["cache_bytes_per_token"] = per_token
    out["generate_peak_rss"] = peak_rss_bytes()
    out["cache_bytes_at_2000"] = out["cache_bytes_per_token"] * 2000
    return out


# ------------------------------------------------------------------ the transformers peer

def build_peer(vlm: VLModel):
    """transformers' DeepseekV2ForCausalLM holding our language model's weights (shared storage)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    lm = vlm.config.language
    cfg = DeepseekV2Config(
        vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
        moe_intermediate_size=lm.moe_intermediate_size, num_hidden_layers=lm.num_hidden_layers,
        num_attention_heads=lm.num_attention_heads, num_key_value_heads=lm.num_key_value_heads,
        n_shared_experts=lm.n_shared_experts, n_routed_experts=lm.n_routed_experts,
        num_experts_per_tok=lm.num_experts_per_tok, first_k_dense_replace=lm.first_k_dense_replace,
        kv_lora_rank=lm.kv_lora_rank, q_lora_rank=None, qk_rope_head_dim=lm.qk_rope_head_dim,
        v_head_dim=lm.v_head_dim, qk_nope_head_dim=lm.qk_nope_head_dim, topk_method="greedy", n_group=1,
        topk_group=1, rms_norm_eps=lm.rms_norm_eps, max_position_embeddings=lm.max_position_embeddings,
        norm_topk_prob=lm.norm_topk_prob, routed_scaling_factor=lm.routed_scaling_factor,
        tie_word_embeddings=False, torch_dtype=torch.bfloat16,
    )
    with torch.device("meta"):
        peer = DeepseekV2ForCausalLM(cfg)
    ours = dict(vlm.model.language.named_parameters())
    state = {}
    for name, p in peer.named_parameters():
        if name.endswith("mlp.experts.gate_up_proj"):
            state[name] = ours[name.replace("gate_up_proj", "gate_up")]
        elif name.endswith("mlp.experts.down_proj"):
            state[name] = ours[name.replace("down_proj", "down")]
        elif "kv_b_proj" in name:
            prefix = name.rsplit("kv_b_proj", 1)[0]
            state[name] = torch.cat([ours[prefix + "w_kb"], ours[prefix + "w_vb"]], 1).reshape(p.shape)
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            fused = ours[name.rsplit(".", 2)[0] + ".gate_up"]
            half = fused.shape[0] // 2
            state[name] = fused[:half] if ".gate_proj." in name else fused[half:]
        elif name.endswith("mlp.gate.weight"):
            state[name] = ours[name].to(torch.bfloat16)
        else:
            state[name] = ours[name]
    peer.load_state_dict(state, assign=True, strict=True)
    peer.model.rotary_emb = type(peer.model.rotary_emb)(config=cfg)  # buffers were on meta
    return peer.eval()


def bench_peer(vlm: VLModel, quick: bool) -> dict:
    from transformers import DynamicCache

    peer = build_peer(vlm)
    n_prefill = 128 if quick else 1024
    ids = torch.tensor([text_ids(vlm, n_prefill)])
    with torch.inference_mode():
        peer(ids[:, :16], logits_to_keep=1)
        prefill_s = timed(lambda: peer(ids, logits_to_keep=1), 1 if quick else 2)
        steps = 8 if quick else 32
        cache = DynamicCache(config=peer.config)
        out = peer(ids[:, :10], past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps + 3):
            t = time.perf_counter()
            out = peer(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
    step = median(times[3:])
    return {"lm_prefill_tok_s": n_prefill / prefill_s, "decode_ctx_short_tok_s": 1 / step}


def bench_family(work: Path, family: str, layers: int | None, quick: bool, peer: bool) -> dict:
    path = ensure_checkpoint(work, family, layers)
    ours = bench_ours(path, quick)
    result = {"family": family, "layers": layers, "ours": ours}
    if peer:
        import dsvl2_cli

        vlm = dsvl2_cli.load(path, dtype="bfloat16", device="cpu")
        with torch.inference_mode():
            # ours again in the same process state as the peer, back to back
            ids = torch.tensor([text_ids(vlm, 128 if quick else 1024)])
            embeds = vlm.embed_tokens(ids)
            ours_prefill = timed(lambda: vlm.forward(embeds, None, last_only=True), 1 if quick else 2)
        ours_step, _ = decode_rate(vlm, text_ids(vlm, 10), 8 if quick else 32)
        theirs = bench_peer(vlm, quick)
        result["peer"] = {
            "name": "transformers DeepseekV2ForCausalLM (bf16, its default grouped_mm experts and SDPA, same weights)",
            **theirs,
            "ours_lm_prefill_tok_s": ids.shape[1] / ours_prefill,
            "ours_decode_ctx_short_tok_s": 1 / ours_step,
        }
        result["peer"]["prefill_speedup"] = result["peer"]["ours_lm_prefill_tok_s"] / theirs["lm_prefill_tok_s"]
        result["peer"]["decode_speedup"] = result["peer"]["ours_decode_ctx_short_tok_s"] / theirs["decode_ctx_short_tok_s"]
        del vlm
        gc.collect()
    return result


# ------------------------------------------------------------------ report

def add_floors(result: dict, ceilings: dict) -> None:
    ours = result["ours"]
    bw, mm = ceilings["bandwidth_gb_s"] * 1e9, ceilings["matmul_bf16_gflop_s"]
    for key in ("decode_ctx_short", "decode_ctx_2000"):
        d = ours[key]
        d["floor_tok_s"] = bw / d["bytes_read"]
        d["fraction_of_floor"] = d["tok_s"] / d["floor_tok_s"]
    ours["vision_fraction_of_matmul"] = ours["vision_gflop_s"] / mm
    ours["lm_prefill"]["fraction_of_matmul"] = ours["lm_prefill"]["gflop_s"] / mm
    ours["generate_rss_over_weights_plus_cache"] = (
        ours["generate_peak_rss"] / (ours["weight_bytes"] + ours["cache_bytes_at_2000"]))


def table(report: dict) -> str:
    c = report["ceilings"]
    lines = [f"machine: {report['machine']['cpu']}, {report['machine']['threads']} threads, "
             f"torch {report['machine']['torch']}, {report['machine']['kernels']}",
             f"ceilings: memory read {c['bandwidth_gb_s']:.1f} GB/s, bf16 matmul {c['matmul_bf16_gflop_s']:.0f} GFLOP/s",
             *([f"benchmark time: {report['seconds']} s"] if "seconds" in report else []),
             ""]
    for r in report["results"]:
        o = r["ours"]
        name = r["family"] + (f" ({r['layers']} layers)" if r["layers"] else "")
        rows = [
            ("weights in memory", f"{o['weight_bytes'] / 1e9:.2f} GB", ""),
            ("load", f"{o['load_s']:.1f} s, peak RSS {o['load_peak_rss'] / 1e9:.2f} GB", ""),
            ("vision per tile", f"{o['vision_s_per_tile'] * 1e3:.0f} ms",
             f"{o['vision_gflop_s']:.0f} GFLOP/s = {o['vision_fraction_of_matmul']:.0%} of matmul"),
            ("LM prefill", f"{o['lm_prefill']['tok_s']:.0f} tok/s ({o['lm_prefill']['tokens']} tok)",
             f"{o['lm_prefill']['gflop_s']:.0f} GFLOP/s = {o['lm_prefill']['fraction_of_matmul']:.0%} of matmul"),
            ("TTFT photo 640x480", f"{o['photo']['ttft_s']:.2f} s ({o['photo']['prompt_tokens']} tok)",
             f"prefill {o['photo']['prefill_tok_s']:.0f} tok/s"),
            ("TTFT 3x3 document", f"{o['document']['ttft_s']:.2f} s ({o['document']['prompt_tokens']} tok)",
             f"prefill {o['document']['prefill_tok_s']:.0f} tok/s"),
        ]
        for key in ("decode_ctx_short", "decode_ctx_2000"):
            d = o[key]
            rows.append((f"decode @ {d['context']} ctx", f"{d['tok_s']:.1f} tok/s ({d['ms_per_token']:.1f} ms)",
                         f"floor {d['floor_tok_s']:.1f} tok/s ({d['bytes_read'] / 1e9:.2f} GB/token): "
                         f"{d['fraction_of_floor']:.0%}"))
        rows.append(("peak RSS generating", f"{o['generate_peak_rss'] / 1e9:.2f} GB",
                     f"{o['generate_rss_over_weights_plus_cache']:.2f}x (weights + cache @ 2000)"))
        rows.append(("cache per token", f"{o['cache_bytes_per_token']:,} B", ""))
        if "peer" in r:
            p = r["peer"]
            rows.append(("peer prefill", f"{p['lm_prefill_tok_s']:.0f} tok/s", f"ours {p['prefill_speedup']:.1f}x"))
            rows.append(("peer decode", f"{p['decode_ctx_short_tok_s']:.1f} tok/s", f"ours {p['decode_speedup']:.1f}x"))
        lines.append(f"## {name}")
        lines += [f"  {a:<22} {b:<34} {c}" for a, b, c in rows]
        lines.append("")
    return "\n".join(lines)


def run(families: list[tuple[str, int | None]], work: Path, quick: bool, peer_families: set[str],
        threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    report = {"machine": machine_description(), "ceilings": machine_ceilings(), "results": []}
    for family, layers in families:
        result = bench_family(work, family, layers, quick, family in peer_families)
        add_floors(result, report["ceilings"])
        report["results"].append(result)
        print(f"done: {family}", file=sys.stderr, flush=True)
    report["seconds"] = round(time.perf_counter() - start)  # checkpoints already written are reused
    return report


def parse_families(spec: str) -> list[tuple[str, int | None]]:
    out = []
    for item in spec.split(","):
        name, _, layers = item.strip().partition(":")
        out.append((name, int(layers) if layers else None))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dsvl2 bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="tiny,small:4",
                    help="family[:layers] list; real shapes: tiny, small, vl2 (default: tiny,small:4)")
    ap.add_argument("--peer", default="small", help="families also run with the transformers peer (MLA only)")
    ap.add_argument("--work", type=Path, default=settings.bench_dir())
    ap.add_argument("--out", type=Path, help="write the JSON report here")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    args = ap.parse_args(argv)
    report = run(parse_families(args.families), args.work, args.quick,
                 {p for p in args.peer.split(",") if p}, args.threads)
    print(table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
