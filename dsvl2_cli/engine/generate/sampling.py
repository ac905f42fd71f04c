"""Choosing the next token: pure functions of (logits, history, settings, generator).

Default is greedy (temperature 0): the official DeepSeek-VL2 examples decode greedily, it is the
usual choice for OCR and grounding, and it makes runs reproducible. For open-ended chat the model
card advises sampling with temperature <= 0.7 (higher temperatures degrade quality), e.g.
`temperature=0.6, top_p=0.9`.
"""

from __future__ import annotations

import torch

from ..events import SamplingParams  # noqa: F401  (defined without torch, for clients of a server)


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as transformers): divide positive logits, multiply negative ones."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(-1, history)
    logits = logits.clone()
    logits.scatter_(-1, history, torch.where(seen > 0, seen / penalty, seen * penalty))
    return logits


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative - sorted_logits.softmax(-1) >= p  # tokens entirely beyond the nucleus
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else torch.seed())
    return g


def sample(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) float32 -> next token ids (B,) on the CPU-side generator's terms."""
    if history is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, history.to(logits.device), params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    logits = filter_top_p(filter_top_k(logits / params.temperature, params.top_k), params.top_p)
    probs = logits.softmax(-1).float().cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)
