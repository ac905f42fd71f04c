"""`dsvl2 bench`: speed and memory at the real model shapes, against the machine's own limits and
a peer, all measured in one run (machines are noisy: compare ratios from the same run).

Synthetic checkpoints with the exact shapes of the real models and random weights (speed and
memory do not depend on the values) are written once into a work folder. Measured:
- the ceilings: memory read bandwidth (a native streaming read, probed right before and after
  each decode measurement) and the bf16 matmul rate (probed around vision and prefill);
- vision encoding per tile, prefill tokens/s, time to first token for a 640x480 photo with a short
  question and for a 3x3-tiled document page, decode tokens/s at ~10 and ~2000 tokens of context,
  peak RSS while generating, cache bytes per token;
- each as a fraction of its floor: decode floor = bytes read per token / bandwidth, prefill
  floor = counted FLOPs / matmul rate;
- the peer: transformers' DeepseekV2ForCausalLM on the same weights (the language model of an
  MLA configuration), decode and prefill;
- what a user feels, in fresh processes: `--help` startup, load with the file cached, process
  start to first token (cold, and with the prompt cache where the CLI has one).
Modules: bench_probes (ceilings, process rows), bench_report (floors, goals, table).
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
from ..engine.native import kernels
from ..engine.runtime import VLModel
from . import bench_probes
from .bench_probes import BandwidthProbe, matmul_rate
from .bench_report import add_floors, table

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


def decode_rate(vlm: VLModel, context_ids: list[int], steps: int,
                probe: BandwidthProbe | None = None) -> tuple[float, int, dict]:
    """Median seconds per decode step after prefilling `context_ids`, the cache bytes per
    position, and the bandwidth probes taken right before and after the decode steps (after the
    prefill: they bracket only what they are the floor of; empty without a probe)."""
    cache = vlm.new_cache()
    with torch.inference_mode():
        embeds = vlm.embed_tokens(torch.tensor([context_ids]))
        for s in range(0, embeds.shape[1], 512):
            logits = vlm.forward(embeds[:, s:s + 512], cache, last_only=True)
        token = logits[:, -1:].argmax(-1)  # (1, 1)
        probes = {"before": probe.gb_s()} if probe else {}
        times = []
        for _ in range(steps + 3):
            t = time.perf_counter()
            logits = vlm.forward(vlm.embed_tokens(token), cache)
            token = logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
        if probe:
            probes["after"] = probe.gb_s()
    return median(times[3:]), cache.nbytes // cache.length, probes


def text_ids(vlm: VLModel, n: int) -> list[int]:
    """A plain-text prompt of exactly n tokens (bos + repeated prose)."""
    tok = vlm.tokenizer
    base = tok.encode("The quick brown fox jumps over the lazy dog while the model reads on. ")
    ids = [tok.bos_id] + base * (n // max(1, len(base)) + 1)
    return ids[:n]


def bench_ours(path: Path, quick: bool, probe: BandwidthProbe) -> dict:
    import dsvl2_cli

    from ..engine.generate import Done, GenerationConfig, Prefilled, stream_generate
    from ..engine.prompt.processor import user_message

    gc.collect()
    reset_peak_rss()
    t = time.perf_counter()
    vlm = dsvl2_cli.load(path, dtype="bfloat16", device="cpu")
    load_s = time.perf_counter() - t
    load_peak = peak_rss_bytes() - probe.nbytes  # the probe's buffer is resident all along
    # the mapped layout the load uses (written by the first load), read once into the page
    # cache: every row below is about compute and bandwidth, not the disk
    bench_probes.warm_page_cache(path)
    weight_bytes = sum(p.numel() * p.element_size() for p in vlm.model.parameters())
    cfg = vlm.config
    out = {"load_s": load_s, "load_peak_rss": load_peak, "weight_bytes": weight_bytes}
    out["model"] = {"layers": cfg.language.num_hidden_layers, "hidden": cfg.language.hidden_size,
                    "attention": "MLA" if cfg.language.use_mla else "MHA", "experts": cfg.language.n_routed_experts}

    # vision tower: the 5 tiles of a 640x480 photo
    photo = vlm.prepare([user_message("What is in this picture?", [synthetic_image(PHOTO)])])
    tiles = photo.pixel_values()
    mm_before = matmul_rate(quick)  # vision and prefill are matmuls: their ceiling brackets them
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
        vlm.forward(embeds[:, :64], None, last_only=True)  # warm-up: first touch of every mapped layer
        prefill_s = timed(lambda: vlm.forward(embeds, None, last_only=True), 1 if quick else 2)
    out["lm_prefill"] = {"tokens": n_prefill, "tok_s": n_prefill / prefill_s,
                         "gflop_s": lm_prefill_flops(cfg, n_prefill) / prefill_s / 1e9}
    out["matmul_probe_gflop_s"] = {"before": mm_before, "after": matmul_rate(quick)}
    # from here on, generation as a user runs it: its peak RSS is the one reported
    reset_peak_rss()
    out["photo"] = first_token(photo)
    doc = vlm.prepare([user_message("Convert the document to markdown.", [synthetic_image(DOC_IMAGE)])])
    out["document"] = first_token(doc)
    steps = 8 if quick else 32
    for label, n in (("decode_ctx_short", 10), ("decode_ctx_2000", 2000)):
        step_s, per_token, probes = decode_rate(vlm, text_ids(vlm, n), steps, probe)
        out[label] = {"context": n, "ms_per_token": step_s * 1e3, "tok_s": 1 / step_s,
                      "bytes_read": lm_decode_bytes(cfg, n), "bandwidth_probe_gb_s": probes}
        out["cache_bytes_per_token"] = per_token
    out["generate_peak_rss"] = peak_rss_bytes() - probe.nbytes
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


def bench_family(work: Path, family: str, layers: int | None, quick: bool, peer: bool,
                 probe: BandwidthProbe) -> dict:
    path = ensure_checkpoint(work, family, layers)
    ours = bench_ours(path, quick, probe)
    result = {"family": family, "layers": layers, "ours": ours}
    image = work / "photo-640x480.png"
    if not image.exists():
        synthetic_image(PHOTO).save(image)
    result["process"] = {"load_cached": bench_probes.load_cached(path),
                         "first_token": bench_probes.process_first_token(path, image, 1 if quick else 3)}
    if peer:
        import dsvl2_cli

        vlm = dsvl2_cli.load(path, dtype="bfloat16", device="cpu")
        with torch.inference_mode():
            # ours again in the same process state as the peer, back to back
            ids = torch.tensor([text_ids(vlm, 128 if quick else 1024)])
            embeds = vlm.embed_tokens(ids)
            vlm.forward(embeds[:, :64], None, last_only=True)  # warm-up, as the peer's below
            ours_prefill = timed(lambda: vlm.forward(embeds, None, last_only=True), 1 if quick else 2)
        ours_step, _, _ = decode_rate(vlm, text_ids(vlm, 10), 8 if quick else 32)
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


def run(families: list[tuple[str, int | None]], work: Path, quick: bool, peer_families: set[str],
        threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    # tiny sizes in the quick run: the same code paths, none of the cost
    probe = BandwidthProbe(bench_probes.QUICK_BANDWIDTH_BYTES if quick else bench_probes.BANDWIDTH_BYTES,
                           repeat=3 if quick else 5)
    ceilings = {"bandwidth_gb_s": probe.gb_s(), "bandwidth_method": probe.method,
                "bandwidth_buffer_bytes": probe.nbytes, "torch_sum_gb_s": probe.torch_sum_gb_s(),
                "matmul_bf16_gflop_s": matmul_rate(quick), "matmul_dtype": bench_probes.matmul_dtype()}
    report = {"machine": machine_description(), "ceilings": ceilings,
              "help": bench_probes.help_startup(2 if quick else 5), "results": []}
    for family, layers in families:
        result = bench_family(work, family, layers, quick, family in peer_families, probe)
        add_floors(result)
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
