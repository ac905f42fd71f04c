"""The byte-level BPE of the synthetic checkpoints' tokenizer: a small embedded corpus and the
merges a trainer learns from it (cached). synthetic.py lays these tokens out at the ids of the
real DeepSeek-VL2 tokenizers, around the real special tokens."""

from __future__ import annotations

import json
import random
from functools import lru_cache

_CORPUS_TEXT = r'''
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Describe this image in detail. What is written on the sign? Where is the red cup?
The image shows a small wooden table with a red cup, a blue plate and two green apples.
There is a cat sitting on the window sill, looking at the birds outside in the garden.
Please read the text in the document and summarise the main points in three sentences.
The chart compares the sales of the first and second quarter; revenue grew by 12 percent.
Question: how many people are in the photo? Answer: there are four people in the photo.
In the bottom left corner there is a logo, and the title is printed in large white letters.
She said, "I'll meet you at the station at 7:45 tomorrow morning," and then she left.
It's a sunny day; the sky is clear, the water is calm, and the boats are moored at the pier.
Grounding: locate the person wearing a yellow jacket and return the bounding box.
The model answers with coordinates between 0 and 999 for each box: [[120, 45, 380, 610]].
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 512 1024 2048 4096 65536 3.14159 2.71828
Dates and times: 2024-12-13, 13/12/2024, 09:30, 23:59:59, 1st, 2nd, 3rd, 4th, 100%.
Prices: $4.99, EUR 12,50, 1,000,000 units, 0.5 kg, 3 x 4 = 12, 7 + 8 = 15, 2^10 = 1024.
def tokenize(text: str) -> list[int]:
    """Split the text into tokens and return their ids."""
    ids = []
    for piece in text.split():
        if piece in vocab:
            ids.append(vocab[piece])
        else:
            ids.extend(byte_fallback(piece.encode("utf-8")))
    return ids

class Image:
    def __init__(self, width, height):
        self.width = width
        self.height = height

    def resize(self, size):
        return Image(*size)

for (int i = 0; i < n; ++i) { sum += values[i] * weights[i]; }
if (x != null && x.length > 0) { return x[0]; } else { return undefined; }
const result = await fetch("https://example.com/api/v1/items?page=2&limit=50");
import torch
import numpy as np
x = torch.zeros(3, 384, 384, dtype=torch.float32)
print(f"shape={x.shape} mean={x.mean():.4f}")
{"name": "example", "version": "1.0.0", "tags": ["vision", "language"], "size": 27}
SELECT id, name FROM users WHERE age >= 18 ORDER BY name ASC LIMIT 10;
<div class="caption">A photo of a mountain lake at sunset.</div>
# Heading
- item one
- item two
* bold **text** and _italic_ text, `inline code`, [link](http://example.org)
héllo wörld, café, naïve, résumé, façade, jalapeño, Ångström, smørrebrød, Straße
Привет, мир! Как дела? Γειά σου κόσμε. مرحبا بالعالم. שלום עולם. नमस्ते दुनिया
你好，世界！这是一张图片。图片中有一只猫和一只狗。请描述这张图片。
今日は良い天気ですね。これは猫です。カタカナとひらがな。
안녕하세요 세계. 이것은 테스트입니다.
Emoji: 🙂 😀 🎉 🚀 🐱 🐶 ❤️ 👍 🌍 ✨ 🔥 📷
Symbols: © ® ™ ° ± × ÷ ≤ ≥ ≠ ∞ → ← ↑ ↓ • … – — « » ¿ ¡ § ¶ € £ ¥
'''

_WORDS = (
    "the of and to in is that for it as with was on be at by this had not are but from or have "
    "an they which one you were her all she there would their we him been has when who will more "
    "no if out so said what up its about into than them can only other new some could time these "
    "two may then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three image picture photo text document table chart "
    "person dog cat car tree house window street sign red green blue yellow black white left right "
    "top bottom center corner box region object describe caption answer question model vision "
    "language token layer expert router attention tensor shape value number function return "
    "import class print self width height size page line column row cell header footer title"
).split()


@lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    rng = random.Random(20241213)
    lines = [line for line in _CORPUS_TEXT.splitlines() if line.strip()]
    for _ in range(600):
        n = rng.randint(4, 14)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, n), str(rng.randint(0, 99999)))
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "?", "!", ",", ":"])
        lines.append(sentence)
    for i in range(200):
        lines.append(f"item_{i} = compute(x{i % 7}, y[{i}], scale={i / 8:.3f})  # step {i}")
    # Multi-line documents, so that newline runs ("\n\n" in the chat template) become tokens.
    docs = []
    for _ in range(150):
        k = rng.randint(2, 5)
        sep = rng.choice(["\n", "\n\n", "\n\n", "\n    "])
        docs.append(sep.join(rng.choice(lines) for _ in range(k)))
    for _ in range(60):
        docs.append(f": {rng.choice(lines).strip()}\n\n: {rng.choice(lines).strip()}")
    return tuple(lines) + tuple(docs)


PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated",
         "invert": False},
        {"type": "Split", "pattern": {"Regex": "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"},
         "behavior": "Isolated", "invert": False},
        {"type": "Split",
         "pattern": {"Regex": (
             "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
             "|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
             "| ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}
DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}

_N_BPE_TRAINED = 1000  # 256 byte symbols + 744 merges


@lru_cache(maxsize=1)
def trained_bpe() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(tokens in id order, merges in order) of a byte-level BPE trained on the embedded corpus.

    Token ``i >= 256`` is the result of merge ``i - 256``, so a prefix of the tokens with the
    matching prefix of the merges is itself a valid BPE model.
    """
    from tokenizers import Tokenizer, pre_tokenizers, trainers

    tok = Tokenizer.from_str(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": PRE_TOKENIZER, "post_processor": None,
        "decoder": DECODER,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "vocab": {}, "merges": []},
    }))
    trainer = trainers.BpeTrainer(
        vocab_size=_N_BPE_TRAINED, min_frequency=1, show_progress=False, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(_corpus()), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    if len(tokens) != _N_BPE_TRAINED or len(merges) != _N_BPE_TRAINED - 256:
        raise RuntimeError(f"BPE training produced {len(tokens)} tokens / {len(merges)} merges")
    for k, (a, b) in enumerate(merges):  # check the prefix property relied upon above
        if tokens[256 + k] != a + b:
            raise RuntimeError("unexpected BPE trainer token order")
    return tuple(tokens), tuple(merges)
