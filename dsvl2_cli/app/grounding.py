"""Grounding: the prompts that ask DeepSeek-VL2 for boxes, a tolerant parser of its answers, and
an answer read as boxes in an image's pixels (`read_grounded`: ground and ocr --format json).

The model answers a referring expression with `<|ref|>the red cup<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>`,
coordinates in 0..999 of the image's width and height (pixel = v / 999 * W); one ref may carry
several boxes, and a grounded caption interleaves text with ref/det pairs. Real answers are
often malformed (DeepSeek-VL2 issue #96: odd value counts, nested lists, runaway digits, missing
brackets or closing tags), so `parse_grounding` never evaluates anything, never raises, keeps
every box it can recover (clamped to 0..999, corners put in order) and lists what it could not
use in `problems`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

REF, REF_END, DET, DET_END, GROUNDING = "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"
COORD_MAX = 999

CAPTION_QUESTION = "Describe the image in detail."

_TAG = re.compile(r"(<\|ref\|>|<\|/ref\|>|<\|det\|>|<\|/det\|>|<\|grounding\|>)")
_INNER_GROUP = re.compile(r"\[([^\[\]]*)\]")
# ASCII digits only: int()/float() would also accept other scripts' digits.
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]*)?", re.ASCII)
_MAX_DIGITS = 7  # beyond this a value is a runaway and clamps without conversion


def referring_prompt(expression: str) -> str:
    """The prompt that asks for the boxes of `expression` (one image)."""
    return f"<image>\n{REF}{expression.strip()}{REF_END}."


def caption_prompt(question: str | None = None) -> str:
    """A grounded caption (or grounded answer to `question`): text interleaved with boxes."""
    return f"<image>\n{GROUNDING}{(question or CAPTION_QUESTION).strip()}"


@dataclass(frozen=True)
class Box:
    label: str                               # the ref text ("" for a det without a ref)
    box_999: tuple[int, int, int, int]       # x1, y1, x2, y2 in 0..999, x1 <= x2, y1 <= y2
    ref_index: int = 0                       # which distinct label (for colours), in order of appearance


@dataclass
class GroundingResult:
    boxes: list[Box] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    text: str = ""                           # the answer without tags and box lists (labels kept)

    @property
    def labels(self) -> list[str]:
        """Distinct labels in order of appearance (index = Box.ref_index)."""
        seen: list[str] = []
        for b in self.boxes:
            if b.label not in seen:
                seen.append(b.label)
        return seen


def to_pixels(box: Box | tuple, width: int, height: int) -> tuple[int, int, int, int]:
    """0..999 coordinates -> pixel x1, y1, x2, y2 (pixel = v / 999 * size, rounded)."""
    x1, y1, x2, y2 = box.box_999 if isinstance(box, Box) else box
    sx, sy = width / COORD_MAX, height / COORD_MAX
    return round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)


def to_xywh(xyxy: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = xyxy
    return x1, y1, x2 - x1, y2 - y1


@dataclass(frozen=True)
class PixelBox:
    """A grounding box in the image's pixels, with its place in the answer."""

    label: str
    box_999: tuple[int, int, int, int]
    xyxy: tuple[int, int, int, int]
    ref_index: int  # which distinct label, in order of appearance


@dataclass(frozen=True)
class Grounded:
    """An answer read as boxes: `raw` the answer with its tags, `text` without tags and box lists."""

    raw: str
    text: str
    boxes: tuple[PixelBox, ...]
    problems: list[str]

    def box_records(self) -> list[dict]:
        """The JSON "boxes" of a grounded answer (ground, ocr --format json)."""
        return [{"label": b.label, "box_999": list(b.box_999), "xyxy": list(b.xyxy), "xywh": list(to_xywh(b.xyxy))}
                for b in self.boxes]


def read_grounded(answer: str, width: int, height: int) -> Grounded:
    """An answer's boxes, parsed (parse_grounding) and put in the pixels of a width x height image."""
    raw = answer.strip()
    result = parse_grounding(raw)
    boxes = tuple(PixelBox(b.label, b.box_999, to_pixels(b, width, height), b.ref_index) for b in result.boxes)
    return Grounded(raw, result.text, boxes, result.problems)


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _coordinate(token: str, problems: list[str], where: str) -> int:
    """One number -> an int in 0..999; out-of-range values are clamped and reported."""
    digits = token.lstrip("-").split(".")[0].lstrip("0")
    if len(digits) > _MAX_DIGITS:
        value = float("inf")
    else:
        value = float(token)
    if token.startswith("-") and value > 0:
        value = -value
    if value < 0 or value > COORD_MAX:
        clamped = 0 if value < 0 else COORD_MAX
        problems.append(f"{where}: value {_short(token, 20)} outside 0..{COORD_MAX}, clamped to {clamped}")
        return clamped
    return int(round(value))


def _groups(content: str) -> list[str]:
    """The number groups of a det: innermost [...] lists, plus any numbers left outside them
    (a missing bracket), or the whole content when it has no brackets at all."""
    inner = _INNER_GROUP.findall(content)
    rest = _INNER_GROUP.sub(" ", content)
    groups = list(inner)
    if _NUMBER.search(rest):
        groups.append(rest)
    return groups


def _parse_det(content: str, label: str, ref_index: int, det_no: int,
               boxes: list[Box], problems: list[str]) -> None:
    where = f"det {det_no}"
    found = 0
    for group in _groups(content):
        numbers = _NUMBER.findall(group)
        if not numbers:
            continue
        if len(numbers) % 4:
            problems.append(f"{where}: {len(numbers)} value(s) [{_short(', '.join(numbers), 40)}] "
                            "is not a whole number of boxes (4 values each); skipped")
            continue
        for i in range(0, len(numbers), 4):
            x1, y1, x2, y2 = (_coordinate(t, problems, where) for t in numbers[i:i + 4])
            if x1 > x2 or y1 > y2:
                problems.append(f"{where}: reversed corners put in order")
                x1, x2 = min(x1, x2), max(x1, x2)
                y1, y2 = min(y1, y2), max(y1, y2)
            boxes.append(Box(label, (x1, y1, x2, y2), ref_index))
            found += 1
    if not found and not any(p.startswith(where + ":") for p in problems):
        problems.append(f"{where}: no coordinates in {_short(content, 40)!r}")


def parse_grounding(text: str) -> GroundingResult:
    """Every box in a grounding answer, tolerantly; never raises (non-str input gives a problem)."""
    result = GroundingResult()
    if not isinstance(text, str):
        result.problems.append(f"expected text, got {type(text).__name__}")
        return result
    parts = _TAG.split(text)
    labels: list[str] = []
    plain: list[str] = []
    label: str | None = None     # label of the latest ref, while only dets/space follow it
    label_used = True
    after_label = False  # no plain text since the latest ref label
    det_no = 0
    i = 0
    while i < len(parts):
        part = parts[i]
        if part == REF:
            body = parts[i + 1] if i + 1 < len(parts) else ""
            i += 2
            if i < len(parts) and parts[i] == REF_END:
                i += 1
            else:
                result.problems.append(f"ref {_short(body, 30)!r}: missing {REF_END}")
            if label is not None and not label_used:
                result.problems.append(f"ref {label!r}: no {DET} box follows it")
            if after_label:
                plain.append(" ")  # two refs in a row: keep their labels apart in the text
            label, label_used = body.strip(), False
            plain.append(body)
            after_label = True
            continue
        if part == DET:
            body = parts[i + 1] if i + 1 < len(parts) else ""
            i += 2
            det_no += 1
            if i < len(parts) and parts[i] == DET_END:
                i += 1
            else:
                result.problems.append(f"det {det_no}: missing {DET_END}")
            name = label if label is not None else ""
            if label is None:
                result.problems.append(f"det {det_no}: no {REF} label before it")
            if name not in labels:
                labels.append(name)
            _parse_det(body, name, labels.index(name), det_no, result.boxes, result.problems)
            label_used = True
            continue
        if part in (REF_END, DET_END, GROUNDING):
            i += 1
            continue
        # ordinary text: a det after real words no longer belongs to the previous ref
        if part.strip() and label is not None:
            if not label_used:
                result.problems.append(f"ref {label!r}: no {DET} box follows it")
            label, label_used = None, True
        if part.strip():
            after_label = False
        plain.append(part)
        i += 1
    if label is not None and not label_used:
        result.problems.append(f"ref {label!r}: no {DET} box follows it")
    result.text = "".join(plain).strip()
    return result
