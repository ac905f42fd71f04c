"""The tokenizer files of the synthetic checkpoints (synthetic.py): tokenizer.json with a small
trained byte-level BPE and the real special tokens at each family's real ids, and its
tokenizer_config.json / special_tokens_map.json, as the Hugging Face releases lay them out."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

from .synthetic_bpe import DECODER as _DECODER
from .synthetic_bpe import PRE_TOKENIZER as _PRE_TOKENIZER
from .synthetic_bpe import trained_bpe as _trained_bpe

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
# The VL2-specific tokens, in the order of their (consecutive) ids in the real tokenizer.
VL_TOKENS = ("<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>",
             "<|User|>", "<|Assistant|>")


def _placeholder(n: int) -> str:
    return f"<｜place▁holder▁no▁{n}｜>"



# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _TokLayout:
    bpe_base: int  # id of the first BPE token
    bpe_count: int  # number of BPE tokens (256 bytes + merges)
    specials: tuple[tuple[int, str], ...]  # (id, content), ascending ids
    in_model: str  # which specials also live in the BPE model vocab: "low" (id < bpe end), "all", "none"


def _layout_fixture() -> _TokLayout:
    # The parity-sample layout: 0/1/2 bos/eos/pad, BPE 3..999, placeholders 1000..1015,
    # <image> 1016 ... <|Assistant|> 1023; vocab 1024.
    sp = [(0, BOS), (1, EOS), (2, PAD)]
    sp += [(1000 + n, _placeholder(n)) for n in range(16)]
    sp += [(1016 + k, t) for k, t in enumerate(VL_TOKENS)]
    return _TokLayout(3, 997, tuple(sp), "low")


def _layout_fixture_small() -> _TokLayout:
    # Deliberately different: BPE 0..999, then added tokens 1000..1099 with placeholders around
    # bos 1050 / eos 1051 / pad 1052 and <image> 1060 ... <|Assistant|> 1067; vocab 1100.
    fixed = {1050: BOS, 1051: EOS, 1052: PAD}
    fixed.update({1060 + k: t for k, t in enumerate(VL_TOKENS)})
    sp, n = [], 0
    for i in range(1000, 1100):
        if i in fixed:
            sp.append((i, fixed[i]))
        else:
            sp.append((i, _placeholder(n)))
            n += 1
    return _TokLayout(0, 1000, tuple(sp), "none")


def _layout_real_129k() -> _TokLayout:
    # Real tiny / 27B ids: 0/1/2, placeholders from 128000, <image> 128815 ... <|Assistant|> 128822.
    sp = [(0, BOS), (1, EOS), (2, PAD)]
    sp += [(128000 + n, _placeholder(n)) for n in range(16)]
    sp += [(128815 + k, t) for k, t in enumerate(VL_TOKENS)]
    return _TokLayout(3, 997, tuple(sp), "all")


def _layout_real_100k() -> _TokLayout:
    # DeepSeek-LLM 100k vocabulary style: BPE below 100000, bos 100000, eos 100001, pad 100002,
    # <image> 100003 ... <|Assistant|> 100010, placeholders 100011..100026.
    sp = [(100000, BOS), (100001, EOS), (100002, PAD)]
    sp += [(100003 + k, t) for k, t in enumerate(VL_TOKENS)]
    sp += [(100011 + n, _placeholder(n)) for n in range(16)]
    return _TokLayout(0, 1000, tuple(sp), "all")


_TOKENIZER_LAYOUTS = {
    "fixture": _layout_fixture,
    "fixture-small": _layout_fixture_small,
    "real-129k": _layout_real_129k,
    "real-100k": _layout_real_100k,
}


def special_token_ids_of(layout_key: str) -> dict[str, int]:
    """Content -> id of every added (special) token of a tokenizer layout (_TOKENIZER_LAYOUTS)."""
    layout = _TOKENIZER_LAYOUTS[layout_key]()
    return {content: i for i, content in layout.specials}


def _added_token(i: int, content: str) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _tokenizer_json(layout: _TokLayout) -> dict:
    tokens, merges = _trained_bpe()
    n_merges = layout.bpe_count - 256
    if n_merges < 0 or n_merges > len(merges):
        raise ValueError("bad tokenizer layout")
    vocab: dict[str, int] = {}
    bpe_end = layout.bpe_base + layout.bpe_count
    for i, content in layout.specials:
        if layout.in_model == "all" or (layout.in_model == "low" and i < bpe_end):
            vocab[content] = i
    for k, t in enumerate(tokens[:layout.bpe_count]):
        vocab[t] = layout.bpe_base + k
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    bos_id = next(i for i, c in layout.specials if c == BOS)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, c) for i, c in layout.specials],
        "normalizer": None,
        "pre_tokenizer": _PRE_TOKENIZER,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": BOS, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}},
        },
        "decoder": _DECODER,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "vocab": vocab,
            "merges": [f"{a} {b}" for a, b in merges[:n_merges]],
        },
    }


def dump_json(path: pathlib.Path, obj, *, ascii_: bool, sort_keys: bool, newline: bool) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=ascii_, sort_keys=sort_keys)
    path.write_text(text + ("\n" if newline else ""), encoding="utf-8")


def _spec_token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def write_tokenizer_files(out_dir, layout_key: str, vocab_size: int, candidate_resolutions) -> pathlib.Path:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    processor_config.json for a tokenizer layout and a model vocabulary into ``out_dir``."""
    from tokenizers import Tokenizer

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = _TOKENIZER_LAYOUTS[layout_key]()
    max_id = max(i for i, _ in layout.specials)
    if max_id >= vocab_size or layout.bpe_base + layout.bpe_count > vocab_size:
        raise AssertionError("tokenizer ids exceed the configured vocabulary")
    tj = _tokenizer_json(layout)
    text = json.dumps(tj, indent=2, ensure_ascii=False)
    # Self-check: the tokenizers library must see every special token at its intended id.
    tok = Tokenizer.from_str(text)
    for i, content in layout.specials:
        got = tok.token_to_id(content)
        if got != i:
            raise AssertionError(f"{content!r} got id {got}, expected {i}")
    (out / "tokenizer.json").write_text(text, encoding="utf-8")

    tok_cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {**_spec_token_entry(c), "special": True} for i, c in layout.specials
        },
        "additional_special_tokens": ["<|User|>", "<|Assistant|>"],
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": PAD,
        "processor_class": "DeepseekVLV2Processor",
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": None,
        "use_default_system_prompt": False,
    }
    dump_json(out / "tokenizer_config.json", tok_cfg, ascii_=False, sort_keys=False, newline=True)

    stm = {
        "additional_special_tokens": [_spec_token_entry("<|User|>"),
                                      _spec_token_entry("<|Assistant|>")],
        "bos_token": _spec_token_entry(BOS),
        "eos_token": _spec_token_entry(EOS),
        "pad_token": _spec_token_entry(PAD),
    }
    dump_json(out / "special_tokens_map.json", stm, ascii_=False, sort_keys=False, newline=True)

    proc = {
        "add_special_token": False,
        "candidate_resolutions": [list(r) for r in candidate_resolutions],
        "downsample_ratio": 2,
        "ignore_id": -100,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_token": "<image>",
        "mask_prompt": False,
        "normalize": True,
        "pad_token": PAD,
        "patch_size": 14,
        "processor_class": "DeepseekVLV2Processor",
        "sft_format": "deepseek",
    }
    dump_json(out / "processor_config.json", proc, ascii_=True, sort_keys=True, newline=True)
    return out


