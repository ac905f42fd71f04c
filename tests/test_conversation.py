"""Conversation files produce exactly the reference token layout, built here by hand from the
rules of SPEC.md: <bos>; each user turn "<|User|>: {content}\\n\\n<|Assistant|>:" with every text
piece between <image> markers encoded on its own; each image as 210 + 1 + (h*14)(w*14 + 1) image
tokens (tiles chosen by the tiling rule, none with 3+ images); a past answer as its text + <eos>.
"""

import io
import json

import pytest

from dsvl2_cli.app.inputs.conversation import read_conversation
from dsvl2_cli.dev.synthetic import write_image
from dsvl2_cli.engine.prompt.processor import Processor
from dsvl2_cli.errors import ImageError, InputError, PromptError


@pytest.fixture(scope="module")
def processor(ckpt_small):
    # small-like: special token ids differ from tiny's, so nothing hard-coded can pass
    return Processor.from_dir(ckpt_small)


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    write_image(tmp_path / "imgs" / "wide.png", 640, 480, seed=1)     # tiles 2x2 -> 1023 tokens
    write_image(tmp_path / "imgs" / "tall.png", 300, 900, seed=2)     # tiles 1x3
    write_image(tmp_path / "imgs" / "small.png", 200, 200, seed=3)    # 1x1 -> 421
    return tmp_path


def tokens_for(w, h):
    return 14 * 15 + 1 + (h * 14) * (w * 14 + 1)


def expected(tok, turns):
    """turns: list of ("user", text, [image token counts]) / ("assistant", text)."""
    ids = [tok.bos_id]
    for turn in turns:
        if turn[0] == "assistant":
            ids += tok.encode(turn[1].strip()) + [tok.eos_id]
            continue
        _, text, counts = turn
        pieces = f"<|User|>: {text.strip()}\n\n<|Assistant|>:".split("<image>")
        for i, piece in enumerate(pieces):
            ids += tok.encode(piece) if piece else []
            if i < len(pieces) - 1:
                ids += [tok.image_id] * counts[i]
    return ids


def write(folder, messages, name="conv.json"):
    path = folder / name
    path.write_text(json.dumps(messages))
    return path


def prepare(processor, path):
    messages, _ = read_conversation(path)
    return processor.prepare(messages)


def test_single_image(processor, folder):
    path = write(folder, [{"role": "<|User|>", "content": "<image>\nDescribe this image.", "images": ["imgs/wide.png"]},
                          {"role": "<|Assistant|>", "content": ""}])
    p = prepare(processor, path)
    assert p.input_ids.tolist() == expected(processor.tokenizer, [("user", "<image>\nDescribe this image.", [1023])])
    assert [im.grid for im in p.images] == [(2, 2)]


def test_grounding_prompt(processor, folder):
    content = "<image>\n<|ref|>the red cup<|/ref|>."
    p = prepare(processor, write(folder, [{"role": "user", "content": content, "images": ["imgs/small.png"]}]))
    tok = processor.tokenizer
    assert p.input_ids.tolist() == expected(tok, [("user", content, [421])])
    ref = tok.specials["<|ref|>"]
    assert ref in p.input_ids.tolist()  # a single special token, not spelled out


def test_two_images_are_tiled(processor, folder):
    content = "This is image_1: <image>\nThis is image_2: <image>\nCompare them."
    p = prepare(processor, write(folder, [{"role": "<|User|>", "content": content,
                                           "images": ["imgs/wide.png", "imgs/tall.png"]}]))
    assert [im.grid for im in p.images] == [(2, 2), (1, 3)]
    assert p.input_ids.tolist() == expected(processor.tokenizer, [("user", content, [1023, tokens_for(1, 3)])])


def test_three_images_are_not_tiled(processor, folder):
    content = "<image><image><image>Which differs?"
    p = prepare(processor, write(folder, [{"role": "user", "content": content,
                                           "images": ["imgs/wide.png", "imgs/tall.png", "imgs/small.png"]}]))
    assert [im.grid for im in p.images] == [(1, 1)] * 3
    assert p.input_ids.tolist() == expected(processor.tokenizer, [("user", content, [421, 421, 421])])


def test_text_only(processor, folder):
    p = prepare(processor, write(folder, [{"role": "user", "content": "  Hello there.  "}]))
    assert p.input_ids.tolist() == expected(processor.tokenizer, [("user", "Hello there.", [])])
    assert p.images == []


def test_multi_turn_history_and_in_context_examples(processor, folder):
    conv = [
        {"role": "system", "content": "You are precise."},
        {"role": "<|User|>", "content": "<image>\n<|ref|>the cat<|/ref|>.", "images": ["imgs/wide.png"]},
        {"role": "<|Assistant|>", "content": " <|ref|>the cat<|/ref|><|det|>[[10, 20, 300, 400]]<|/det|> "},
        {"role": "<|User|>", "content": "<image>\n<|ref|>the cat<|/ref|>.", "images": ["imgs/tall.png"]},
        {"role": "<|Assistant|>", "content": ""},
    ]
    p = prepare(processor, write(folder, conv))
    tok = processor.tokenizer
    ids = expected(tok, [("user", "<image>\n<|ref|>the cat<|/ref|>.", [1023]),
                         ("assistant", "<|ref|>the cat<|/ref|><|det|>[[10, 20, 300, 400]]<|/det|>"),
                         ("user", "<image>\n<|ref|>the cat<|/ref|>.", [tokens_for(1, 3)])])
    ids[1:1] = tok.encode("You are precise.\n\n")  # system text after bos (our documented form)
    assert p.input_ids.tolist() == ids
    # the past answer ends in eos, and the next turn follows directly
    eos_at = p.input_ids.tolist().index(tok.eos_id)
    assert p.input_ids[eos_at + 1] == tok.specials["<|User|>"]


def test_relative_paths_resolve_against_the_file(processor, folder, monkeypatch, tmp_path_factory):
    sub = folder / "convs"
    sub.mkdir()
    path = write(sub, [{"role": "user", "content": "<image>", "images": ["../imgs/small.png"]}])
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert prepare(processor, path).images[0].grid == (1, 1)


def test_stdin_conversation_resolves_against_cwd(processor, folder, monkeypatch):
    monkeypatch.chdir(folder)
    text = json.dumps({"messages": [{"role": "user", "content": "<image>What?", "images": ["imgs/small.png"]}]})
    messages, _ = read_conversation("-", stdin=io.StringIO(text))
    assert processor.prepare(messages).num_image_tokens == [421]


@pytest.mark.parametrize("conv, error, needle", [
    ([{"role": "user", "content": "<image><image>x", "images": ["imgs/small.png"]}], PromptError,
     r"message 1 \(user\): 2 <image> placeholder\(s\) but 1 image\(s\)"),
    ([{"role": "user", "content": "no placeholder", "images": ["imgs/small.png"]}], PromptError, "0 <image>"),
    ([{"role": "bot", "content": "hi"}], InputError, "role 'bot' is not one of"),
    ([{"role": "user", "content": 3}], InputError, "content must be a string"),
    ([{"role": "user", "content": "<image>", "images": ["imgs/missing.png"]}], ImageError, "missing.png"),
    ([], InputError, "non-empty list of messages"),
    ({"nothing": 1}, InputError, "non-empty list of messages"),
])
def test_bad_conversations(processor, folder, conv, error, needle):
    path = write(folder, conv)
    with pytest.raises(error, match=needle) as err:
        prepare(processor, path)
    assert "\n" not in str(err.value)


def test_unreadable_files(folder):
    with pytest.raises(InputError, match="not found"):
        read_conversation(folder / "nope.json")
    (folder / "bad.json").write_text("[{")
    with pytest.raises(InputError, match="not valid JSON"):
        read_conversation(folder / "bad.json")
