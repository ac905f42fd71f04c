"""The plain-text lines of `dsvl2 info` (a model's facts and memory plans), `dsvl2 cache` (its
listing, what clear and prune removed) and the status line after a model loads."""

from __future__ import annotations


_NOUNS = {"prompts": "saved prompt(s)", "pages": "page text(s)", "mapped": "mapped layout(s)"}


def cache_lines(record: dict) -> list[str]:
    """`dsvl2 cache` (record: caches.listing): the saved prompts, most recently used first, and
    their total; the page texts' total; the mapped layouts, each with the model folder, dtype and
    quantization it was built from, and their total."""
    lines = [f"{e['last_used'].replace('T', ' ')}  {_bytes(e['bytes']):>10}  {e['name']}"
             for e in reversed(record["entries"])]
    lines.append(f"{len(record['entries'])} {_NOUNS['prompts']}, {_bytes(record['total_bytes'])} of "
                 f"{_bytes(record['cap_bytes'])} in {record['folder']}")
    pages = record["pages"]
    lines.append(f"{len(pages['entries'])} {_NOUNS['pages']}, {_bytes(pages['total_bytes'])} in {pages['folder']}")
    mapped = record["mapped"]
    for e in reversed(mapped["entries"]):
        built = (e["dtype"] or "?") + (f" {e['quant']}" if e["quant"] else "")
        state = "" if e["state"] == "ready" else f"  ({e['state']})"
        lines.append(f"{e['last_used'].replace('T', ' ')}  {_bytes(e['bytes']):>10}  {built}  "
                     f"{e['source'] or e['name']}{state}")
    stale = sum(1 for e in mapped["entries"] if e["stale"])
    note = f"; {stale} stale ({_bytes(mapped['stale_bytes'])}): `dsvl2 cache prune` removes them" if stale else ""
    lines.append(f"{len(mapped['entries'])} {_NOUNS['mapped']}, {_bytes(mapped['total_bytes'])} in "
                 f"{mapped['folder']}{note}")
    return lines


def removed_lines(removed: list[dict]) -> list[str]:
    """`dsvl2 cache clear` / `prune`: one line per kind, "removed N ..., B bytes, from FOLDER"."""
    return [f"removed {r['entries']} {_NOUNS[r['kind']]}, {r['bytes']:,} bytes, from {r['folder']}" for r in removed]


def info_lines(facts: dict) -> list[str]:
    """`dsvl2 info` as aligned "key  value" lines (facts as `dsvl2 info --json` gives them)."""
    a, p = facts["architecture"], facts["parameters"]
    att, ex, vis = a["attention"], a["experts"], a["vision"]
    if att["kind"] == "mla":
        attention = (f"multi-head latent (MLA), {att['heads']} heads, kv_lora_rank {att['kv_lora_rank']}, "
                     f"rope {att['qk_rope_head_dim']}, nope {att['qk_nope_head_dim']}, v {att['v_head_dim']}")
    else:
        attention = f"multi-head, {att['heads']} heads x {att['head_dim']}, RoPE"
    experts = "none (dense)"
    if ex:
        router = f"{ex['scoring']} router, {ex['topk_method']}" + (", renormalised" if ex["renormalised"] else "")
        router += f", x{ex['scaling']:g}" if ex["scaling"] != 1.0 else ""
        experts = (f"{ex['routed']} routed + {ex['shared']} shared, {ex['per_token']} routed per token ({router}); "
                   f"{a['layers'] - ex['moe_layers']} dense layer(s)")
    cache = facts["cache_bytes_per_token"]
    rows = [
        ("model", f"{facts['model']} ({facts['source']})"),
        ("path", facts["path"]),
        ("language", f"DeepSeekMoE, {a['layers']} layers, hidden {a['hidden_size']}, vocab {a['vocab_size']}, "
                     f"context {a['context_tokens']} tokens"),
        ("attention", attention),
        ("experts", experts),
        ("vision", f"SigLIP, {vis['layers']} blocks, width {vis['width']}, {vis['heads']} heads, "
                   f"{vis['image_size']}x{vis['image_size']} tiles, patch {vis['patch_size']}, "
                   f"{vis['tokens_per_tile']} tokens per tile"),
        ("parameters", f"{_count(p['total'])} total, {_count(p['active'])} active per token (vision "
                       f"{_count(p['vision'])}, adaptor {_count(p['adaptor'])}, language {_count(p['language'])})"),
        ("kv cache", f"{_bytes(cache)} per token in {facts['dtype']} "
                     f"({cache * a['context_tokens'] / 2**20:.0f} MiB for the whole context)"),
        ("image", f"{facts['image_tokens_384']} tokens for a 384x384 image, up to {a['max_image_tokens']} "
                  "for one tiled image"),
        ("dtype", facts["dtype"]),
        ("device", facts["device"]),
    ]
    if "weight_memory" in facts:
        mem = facts["weight_memory"]
        parts = ", ".join(f"{k.replace('_', ' ')} {_bytes(v)}" for k, v in mem.items() if k != "total" and v)
        rows.append(("quantized", facts["quantization"]))
        rows.append(("weights", f"{_bytes(mem['total'])} in memory: {parts}"))
    if "memory" in facts:
        rows += _memory_rows(facts["memory"])
    return [f"{key:<11} {value}" for key, value in rows]


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"  # GB as in engine/loading/host_memory.gb (the memory messages), so the numbers match


def _memory_rows(memory: dict) -> list[tuple[str, str]]:
    """info's plan of each method: what it needs and whether it fits in what is available."""
    avail = memory["available"]
    head = f"{_gb(avail['bytes'])} available ({avail['source']}); needs at batch 1, the cache at the full context:"
    rows = [("memory", head)]
    for method, p in memory["plans"].items():
        verdict = "fits" if p["fits"] else "does not fit"
        used = " (these options)" if method == memory["method"] and len(memory["plans"]) > 1 else ""
        need = (f"{_gb(p['total'])}: weights {_gb(p['weights'])}, cache {_gb(p['cache'])}, "
                f"activations {_gb(p['activations'])}: {verdict}{used}")
        rows.append((f"  {method}", need))
    return rows


def loaded_status(vlm, seconds: float) -> str:
    """The line after loading: the model, its dtype and quantization, the device, the time."""
    dtype = str(vlm.dtype).removeprefix("torch.")
    spec = getattr(vlm, "quantization", None)
    parts = [dtype] + ([f"{spec.method} routed experts"] if spec else [])
    parts += ["int8 vision"] if getattr(vlm, "vision_int8", False) else []
    how = f"{', '.join(parts)}, on {vlm.device}" if len(parts) > 1 else f"{dtype} on {vlm.device}"
    return f"{vlm.name} ({vlm.source}) · {how} · loaded in {seconds:.1f} s"


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} bytes"
