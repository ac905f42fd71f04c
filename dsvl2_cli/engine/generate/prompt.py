"""What a prompt is to the cache: per position, the token id or the (image, index) it holds
(`position_keys`); where the images end (`image_prefix`, what the prompt store keeps); whether a
prompt fits the context (`check_context`); and `PromptCache`, a ModelCache that remembers which
positions it holds so a later prompt with the same start only computes what is new.
"""

from __future__ import annotations

import hashlib

import torch

from ...errors import ContextTooLongError
from ..cache import ModelCache
from ..prompt.processor import Prepared
from ..vlmodel import VLModel


def image_fingerprint(pixel_values: torch.Tensor) -> str:
    """Identity of an image as the model sees it (its normalised tiles)."""
    data = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def image_spans(prepared: Prepared) -> list[tuple[int, int]]:
    """[start, end) prompt positions of each image's tokens, in order."""
    positions = prepared.image_mask.nonzero().flatten().tolist()
    spans, i = [], 0
    for img in prepared.images:
        spans.append((positions[i], positions[i + img.num_tokens - 1] + 1))
        i += img.num_tokens
    return spans


def position_keys(prepared: Prepared) -> list:
    """Per prompt position what the cache must have seen there: a token id, or (image, index)."""
    keys: list = prepared.input_ids.tolist()
    for img, (start, end) in zip(prepared.images, image_spans(prepared)):
        fp = image_fingerprint(img.pixel_values)
        keys[start:end] = [(fp, j) for j in range(end - start)]
    return keys


def image_prefix(prepared: Prepared) -> int:
    """Positions up to the end of the last image's tokens (0 without images): what the prompt
    store keeps, since a new question about the same images shares exactly these."""
    spans = image_spans(prepared)
    return spans[-1][1] if spans else 0


def check_context(vlm: VLModel, prepared: Prepared) -> None:
    """ContextTooLongError unless the prompt leaves at least one position for the answer."""
    limit = vlm.config.language.max_position_embeddings
    total = int(prepared.input_ids.numel())
    if total < limit:
        return
    image_counts = [img.num_tokens for img in prepared.images]
    text = total - sum(image_counts)
    detail = f"images {' + '.join(map(str, image_counts))}, text {text}" if image_counts else f"text {text}"
    raise ContextTooLongError(
        f"prompt is {total} tokens ({detail}) but the context holds {limit} including the answer; "
        "use fewer images (with 3 or more, images are not tiled), smaller or less elongated images, "
        "a shorter text, or start a new conversation"
    )


class PromptCache:
    """A ModelCache plus what it holds, for reuse across the turns of one conversation."""

    def __init__(self):
        self.cache: ModelCache | None = None
        self.keys: list = []

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    def reset(self) -> None:
        self.cache, self.keys = None, []

    def reusable(self, keys: list) -> int:
        """How many leading positions of a new prompt the cache already holds (< len(keys):
        the last prompt position is always recomputed, its logits pick the first token)."""
        n = 0
        limit = min(len(self.keys), len(keys) - 1)
        while n < limit and self.keys[n] == keys[n]:
            n += 1
        if n and isinstance(keys[n], tuple) and keys[n][1] > 0:
            # never start inside an image: back up to its first token
            n -= keys[n][1]
        return n
