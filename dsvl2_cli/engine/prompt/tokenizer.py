"""Tokenizer: tokenizer.json through the `tokenizers` library, plus a streaming detokenizer.

tokenizer.json is authoritative (byte-level BPE). tokenizer_config.json names LlamaTokenizer, but
we never let transformers reinterpret the file: the fast tokenizer is loaded as it is. Special
token *names* come from tokenizer_config.json / special_tokens_map.json and their *ids* from
tokenizer.json, never from constants: tiny and 27B use bos/eos 0/1 and `<image>` 128815, small
differs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from ...errors import TokenizerError

# Names used when neither tokenizer_config.json nor special_tokens_map.json gives one.
DEFAULT_BOS = "<｜begin▁of▁sentence｜>"
DEFAULT_EOS = "<｜end▁of▁sentence｜>"
DEFAULT_PAD = "<｜▁pad▁｜>"

IMAGE_TOKEN = "<image>"
USER_TOKEN = "<|User|>"
ASSISTANT_TOKEN = "<|Assistant|>"
GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")

# Characters an answer never carries: C0 controls other than tab and newline, DEL and the C1
# controls. A model can emit them (byte-level tokens reach every byte), and on a terminal they
# are commands (ESC sequences, NUL, SUB, GS), not text.
_CONTROLS = dict.fromkeys([*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)])


def clean_text(text: str) -> str:
    """`text` without control characters (tab and newline kept)."""
    return text.translate(_CONTROLS)


# Looked up in tokenizer.json; a model folder without these cannot be prompted correctly.
_REQUIRED_NAMED = (IMAGE_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)


def _read_json(path: Path) -> tuple[Any, str]:
    """(parsed, raw text) of a JSON file, or a TokenizerError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text), text
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read JSON ({exc}); re-download the model files") from exc


def _token_content(value: Any) -> str | None:
    """A special-token entry is either a plain string or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """A DeepSeek-VL2 tokenizer read from a model folder.

    `encode` never adds bos/eos (the processor places them) but does recognise special tokens
    written in the text (`<image>`, `<|ref|>`, ...). `specials` maps each named special token's
    text to its id (bos/eos/pad and the ones in `GROUNDING_TOKENS` etc. that the file has).
    """

    def __init__(self, hf: _HFTokenizer, *, bos: str, eos: str, pad: str, source: str = "tokenizer.json"):
        self._hf = hf
        self._hf.no_padding()
        self._hf.no_truncation()
        self.source = source

        def need(name: str, role: str) -> int:
            tid = hf.token_to_id(name)
            if tid is None:
                raise TokenizerError(f"{source}: the {role} token {name!r} is not in the vocabulary; "
                                     "the tokenizer files do not belong to a DeepSeek-VL2 model")
            return tid

        self.bos_id = need(bos, "bos")
        self.eos_id = need(eos, "eos")
        pad_id = hf.token_to_id(pad)
        self.pad_id = self.eos_id if pad_id is None else pad_id  # pad only matters for batching
        self.specials: dict[str, int] = {bos: self.bos_id, eos: self.eos_id, pad: self.pad_id}
        for name in _REQUIRED_NAMED:
            self.specials[name] = need(name, "special")
        for name in GROUNDING_TOKENS:
            tid = hf.token_to_id(name)
            if tid is not None:
                self.specials[name] = tid
        self.image_id = self.specials[IMAGE_TOKEN]
        self.user_id = self.specials[USER_TOKEN]
        self.assistant_id = self.specials[ASSISTANT_TOKEN]
        # Every added token counts as special, whether or not its file flags it: the DeepSeek
        # files add placeholders, pad and role tokens, none of them answer text.
        added = set(hf.get_added_tokens_decoder())
        self.special_ids: frozenset[int] = frozenset(added | set(self.specials.values()))
        # Never shown in streamed text: they delimit sequences, they are not content.
        self.control_ids: frozenset[int] = frozenset({self.bos_id, self.eos_id, self.pad_id})
        self.grounding_ids: frozenset[int] = frozenset(
            self.specials[n] for n in GROUNDING_TOKENS if n in self.specials)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        """Load tokenizer.json; special names from tokenizer_config.json, then special_tokens_map.json."""
        model_dir = Path(model_dir)
        tok_path = model_dir / "tokenizer.json"
        if not tok_path.is_file():
            raise TokenizerError(f"{tok_path}: file not found; the model folder needs its tokenizer.json")
        data, raw = _read_json(tok_path)  # a clear message for truncated/invalid JSON
        if not isinstance(data, dict) or "model" not in data:
            raise TokenizerError(f"{tok_path}: not a tokenizers JSON file (no \"model\" section)")
        try:
            hf = _HFTokenizer.from_str(raw)
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(f"{tok_path}: the tokenizers library cannot load it ({exc})") from exc

        # The library silently renumbers added tokens whose ids do not fit the vocabulary; the
        # model's embedding rows would then not match, so refuse such a file.
        for entry in data.get("added_tokens") or []:
            content, file_id = entry.get("content"), entry.get("id")
            if isinstance(content, str) and hf.token_to_id(content) != file_id:
                raise TokenizerError(f"{tok_path}: added token {content!r} has id {file_id} in the file "
                                     f"but {hf.token_to_id(content)} when loaded; the file is inconsistent")

        names = {"bos_token": DEFAULT_BOS, "eos_token": DEFAULT_EOS, "pad_token": DEFAULT_PAD}
        # Later files only fill names the earlier ones did not give.
        found: dict[str, str] = {}
        for fname in ("tokenizer_config.json", "special_tokens_map.json"):
            path = model_dir / fname
            if not path.is_file():
                continue
            cfg, _ = _read_json(path)
            if not isinstance(cfg, dict):
                raise TokenizerError(f"{path}: expected a JSON object")
            for key in names:
                content = _token_content(cfg.get(key))
                if content and key not in found:
                    found[key] = content
        names.update(found)
        return cls(hf, bos=names["bos_token"], eos=names["eos_token"], pad=names["pad_token"],
                   source=str(tok_path))

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self._hf.token_to_id(text)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no bos/eos; special tokens written in the text are recognised."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_answer(self, ids: Iterable[int]) -> str:
        """An answer as text a user sees: ordinary tokens and the grounding tags (`<|ref|>`,
        `<|det|>`, ...), without other special tokens or control characters; what the
        streamed text joins up to."""
        decoder = self.stream(skip_special=True)
        return "".join(decoder.push(i) for i in ids) + decoder.flush()

    def stream(self, skip_special: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special)


class StreamDecoder:
    """Turns generated token ids into text deltas, one token at a time.

    - UTF-8 safe: a character split over several byte-level tokens is held back until complete
      (never emitted as U+FFFD mid-stream); `flush()` gives whatever is held at the end.
    - Spaces kept: each step decodes a short window starting one emitted chunk earlier and emits
      the difference, so decoders that drop a leading space of the first token lose nothing.
    - Special tokens: bos/eos/pad are never emitted; grounding tokens (`<|ref|>`, `<|det|>`, ...)
      are always emitted as their text so boxes can be parsed; other special tokens (`<image>`,
      `<|User|>`, placeholders, ...) are emitted as text only when `skip_special` is False.
    - Control characters (`clean_text`) never reach the text; the token ids keep everything.
    Each step costs O(window), not O(sequence).
    """

    # Longest run of tokens held back while the text still ends in U+FFFD. A real partial
    # character spans at most 3 bytes, so a longer run means the model produced invalid UTF-8.
    MAX_HOLD = 8

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tok = tokenizer
        self.skip_special = skip_special
        self._ids: list[int] = []   # ordinary tokens since the last special token
        self._prefix = 0            # window start: the chunk emitted just before the pending one
        self._read = 0              # everything before this index has been emitted
        self._prefix_text = ""      # decode(ids[_prefix:_read])

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id in self._tok.special_ids:
            return self._special(token_id)
        self._ids.append(token_id)
        text = self._tok.decode(self._ids[self._prefix:])
        if text.endswith("\ufffd") and len(self._ids) - self._read < self.MAX_HOLD:
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character becomes U+FFFD) and reset."""
        out = ""
        if len(self._ids) > self._read:
            out = self._emit(self._tok.decode(self._ids[self._prefix:]))
        self._ids, self._prefix, self._read, self._prefix_text = [], 0, 0, ""
        return out

    def _emit(self, text: str) -> str:
        delta = text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        return clean_text(delta)

    def _special(self, token_id: int) -> str:
        # A special token ends the ordinary text run: bytes before it can no longer combine.
        out = self.flush()
        if token_id in self._tok.control_ids:
            return out
        if token_id in self._tok.grounding_ids or not self.skip_special:
            out += self._tok.id_to_token(token_id) or ""
        return out
