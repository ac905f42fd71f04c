"""The grounding parser: well-formed answers, grounded captions, and the malformed outputs real
DeepSeek-VL2 checkpoints produce (DeepSeek-VL2 issue #96); it must never raise."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dsvl2_cli.app.grounding import Box, caption_prompt, parse_grounding, referring_prompt, to_pixels, to_xywh


def boxes(text: str) -> list[tuple[str, tuple[int, int, int, int]]]:
    return [(b.label, b.box_999) for b in parse_grounding(text).boxes]


def test_prompts():
    assert referring_prompt(" the red cup ") == "<image>\n<|ref|>the red cup<|/ref|>."
    assert caption_prompt() == "<image>\n<|grounding|>Describe the image in detail."
    assert caption_prompt("What is on the table?") == "<image>\n<|grounding|>What is on the table?"


def test_well_formed_single_box():
    r = parse_grounding("<|ref|>the red cup<|/ref|><|det|>[[100, 200, 300, 400]]<|/det|>")
    assert [(b.label, b.box_999, b.ref_index) for b in r.boxes] == [("the red cup", (100, 200, 300, 400), 0)]
    assert r.problems == []
    assert r.text == "the red cup"


def test_several_boxes_for_one_ref():
    assert boxes("<|ref|>cup<|/ref|><|det|>[[1, 2, 3, 4], [5, 6, 7, 8], [9,10,11,12]]<|/det|>") == [
        ("cup", (1, 2, 3, 4)), ("cup", (5, 6, 7, 8)), ("cup", (9, 10, 11, 12))]


def test_several_refs_get_distinct_indices():
    r = parse_grounding("<|ref|>cup<|/ref|><|det|>[[1,2,3,4]]<|/det|><|ref|>dog<|/ref|><|det|>[[5,6,7,8]]<|/det|>"
                        "<|ref|>cup<|/ref|><|det|>[[9,10,11,12]]<|/det|>")
    assert [(b.label, b.ref_index) for b in r.boxes] == [("cup", 0), ("dog", 1), ("cup", 0)]
    assert r.labels == ["cup", "dog"]
    assert r.text == "cup dog cup"
    assert r.problems == []


def test_grounded_caption_interleaves_text_and_boxes():
    text = ("<|grounding|>The image shows <|ref|>a giraffe<|/ref|><|det|>[[10, 20, 300, 900]]<|/det|> standing "
            "next to <|ref|>two trees<|/ref|><|det|>[[400, 0, 600, 500], [700, 0, 990, 520]]<|/det|>.")
    r = parse_grounding(text)
    assert [(b.label, b.box_999) for b in r.boxes] == [
        ("a giraffe", (10, 20, 300, 900)), ("two trees", (400, 0, 600, 500)), ("two trees", (700, 0, 990, 520))]
    assert r.text == "The image shows a giraffe standing next to two trees."
    assert r.problems == []


def test_det_after_words_is_not_given_the_previous_label():
    r = parse_grounding("<|ref|>cup<|/ref|><|det|>[[1,2,3,4]]<|/det|> and something <|det|>[[5,6,7,8]]<|/det|>")
    assert [b.label for b in r.boxes] == ["cup", ""]
    assert any("no <|ref|>" in p for p in r.problems)


# --- malformed outputs seen in the wild (issue #96 and friends)

def test_nested_lists():
    assert boxes("<|ref|>x<|/ref|><|det|>[[[100, 200, 300, 400]]]<|/det|>") == [("x", (100, 200, 300, 400))]


def test_odd_number_of_values_is_reported_not_guessed():
    r = parse_grounding("<|ref|>x<|/ref|><|det|>[[100, 200, 300]]<|/det|>")
    assert r.boxes == []
    assert len(r.problems) == 1 and "3 value" in r.problems[0]


def test_good_box_survives_next_to_a_bad_one():
    r = parse_grounding("<|ref|>x<|/ref|><|det|>[[1, 2, 3, 4], [5, 6, 7]]<|/det|>")
    assert [b.box_999 for b in r.boxes] == [(1, 2, 3, 4)]
    assert len(r.problems) == 1


def test_runaway_digits_are_clamped_and_reported():
    r = parse_grounding("<|ref|>x<|/ref|><|det|>[[12, 34, 1234567, 99999999999999999999999999]]<|/det|>")
    assert [b.box_999 for b in r.boxes] == [(12, 34, 999, 999)]
    assert sum("clamped" in p for p in r.problems) == 2


def test_huge_digit_runs_do_not_break_int_conversion():
    r = parse_grounding("<|det|>[[" + "9" * 10000 + ", 1, 2, 3]]<|/det|>")
    assert [b.box_999 for b in r.boxes] == [(2, 1, 999, 3)]


def test_missing_brackets():
    assert boxes("<|ref|>x<|/ref|><|det|>100, 200, 300, 400<|/det|>") == [("x", (100, 200, 300, 400))]
    assert boxes("<|ref|>x<|/ref|><|det|>[100, 200, 300, 400<|/det|>") == [("x", (100, 200, 300, 400))]
    assert boxes("<|ref|>x<|/ref|><|det|>[[1, 2, 3, 4], 5, 6, 7, 8]<|/det|>") == [("x", (1, 2, 3, 4)),
                                                                                   ("x", (5, 6, 7, 8))]


def test_flat_list_of_eight_values_is_two_boxes():
    assert boxes("<|ref|>x<|/ref|><|det|>[[1, 2, 3, 4, 5, 6, 7, 8]]<|/det|>") == [("x", (1, 2, 3, 4)),
                                                                                  ("x", (5, 6, 7, 8))]


def test_missing_closing_tags():
    r = parse_grounding("<|ref|>cup<|det|>[[1, 2, 3, 4]]")
    assert [(b.label, b.box_999) for b in r.boxes] == [("cup", (1, 2, 3, 4))]
    assert any("<|/ref|>" in p for p in r.problems) and any("<|/det|>" in p for p in r.problems)
    # an unclosed det ends at the next ref
    assert boxes("<|ref|>a<|/ref|><|det|>[[1,2,3,4]<|ref|>b<|/ref|><|det|>[[5,6,7,8]]<|/det|>") == [
        ("a", (1, 2, 3, 4)), ("b", (5, 6, 7, 8))]


def test_det_without_ref():
    r = parse_grounding("<|det|>[[10, 20, 30, 40]]<|/det|>")
    assert [(b.label, b.box_999) for b in r.boxes] == [("", (10, 20, 30, 40))]
    assert any("no <|ref|>" in p for p in r.problems)


def test_ref_without_det_is_reported():
    r = parse_grounding("<|ref|>the moon<|/ref|>.")
    assert r.boxes == [] and any("the moon" in p for p in r.problems)


def test_floats_negative_and_reversed_corners():
    assert boxes("<|det|>[[10.6, 20.2, 30.0, 40.]]<|/det|>")[0][1] == (11, 20, 30, 40)
    r = parse_grounding("<|ref|>x<|/ref|><|det|>[[-5, 20, 30, 40]]<|/det|>")
    assert r.boxes[0].box_999 == (0, 20, 30, 40) and any("clamped" in p for p in r.problems)
    r = parse_grounding("<|ref|>x<|/ref|><|det|>[[300, 400, 100, 200]]<|/det|>")
    assert r.boxes[0].box_999 == (100, 200, 300, 400)


def test_no_numbers_at_all():
    r = parse_grounding("<|ref|>x<|/ref|><|det|>[[a, b, c, d]]<|/det|>")
    assert r.boxes == [] and r.problems


def test_non_ascii_digits_are_not_numbers():
    r = parse_grounding("<|det|>[[١٢, ٣٤, ٥٦, ٧٨]]<|/det|>")  # Arabic-Indic digits: int() would take them
    assert r.boxes == []


def test_plain_text_has_no_boxes_or_problems():
    r = parse_grounding("I cannot see a cup in this picture.")
    assert r.boxes == [] and r.problems == [] and r.text == "I cannot see a cup in this picture."


def test_to_pixels_and_xywh():
    box = Box("x", (0, 0, 999, 999))
    assert to_pixels(box, 640, 480) == (0, 0, 640, 480)
    assert to_pixels((499, 999, 999, 0), 1000, 200) == (round(499 / 999 * 1000), 200, 1000, 0)
    assert to_xywh((10, 20, 110, 220)) == (10, 20, 100, 200)


_PIECES = st.sampled_from(["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "[", "]", "[[", "]]",
                           ",", " ", "-", ".", "999", "1234567", "0", "12.5", "cup", "\n", "e5", "nan", "inf"])


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_never_raises_on_arbitrary_text(text):
    r = parse_grounding(text)
    for b in r.boxes:
        x1, y1, x2, y2 = b.box_999
        assert 0 <= x1 <= x2 <= 999 and 0 <= y1 <= y2 <= 999


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=40).map("".join))
def test_never_raises_on_tag_soup(text):
    r = parse_grounding(text)
    assert isinstance(r.problems, list) and all(isinstance(p, str) for p in r.problems)
    for b in r.boxes:
        x1, y1, x2, y2 = b.box_999
        assert 0 <= x1 <= x2 <= 999 and 0 <= y1 <= y2 <= 999
        assert all(isinstance(v, int) for v in b.box_999)


def test_non_string_input_is_a_problem_not_an_exception():
    assert parse_grounding(None).problems  # type: ignore[arg-type]
