"""DeepSeekMoE feed-forward (DeepSeekMoE paper; DeepSeek-V2/V3 routers): fine-grained routed
experts chosen per token by a router, plus always-on shared experts.

Routed experts are stored stacked, `gate_up` (E, 2M, D) and `down` (E, D, M), and computed grouped:
the token copies are sorted by expert and each active expert runs one matmul over its slice.
Plain torch: engine/native/fast.py swaps in subclasses that run decode through native kernels.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .config import LanguageConfig


def silu_gate(h: torch.Tensor, inner: int) -> torch.Tensor:
    """The gated MLPs' activation: h = gate | up (..., 2 * inner) -> silu(gate) * up (..., inner)."""
    gate, up = h.split(inner, dim=-1)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SiLU-gated MLP; gate_proj and up_proj are fused into one (2I, D) weight at load time."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.inner = inner
        self.gate_up = nn.Parameter(torch.empty(2 * inner, hidden))
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.act = silu_gate  # (h, inner) -> silu(gate) * up; the engine may swap it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., D)."""
        return self.down_proj(self.act(F.linear(x, self.gate_up), self.inner))


class Router(nn.Module):
    """Chooses num_experts_per_tok experts per token and their weights (both per token).

    Scores are computed in float32 from float32 copies of the gate weight, as the reference does.
    - softmax + greedy (tiny, small): raw top-k probabilities, no renormalisation by default.
    - group_limited_greedy: top-k within the best topk_group groups (by max score).
    - sigmoid + noaux_tc (27B): experts chosen by score + e_score_correction_bias, weighted by the
      unbiased scores; groups ranked by the sum of their two best biased scores.
    Then optional renormalisation to sum 1 and multiplication by routed_scaling_factor.
    """

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_experts = cfg.n_routed_experts
        self.scoring = cfg.scoring_func
        self.method = cfg.topk_method
        self.n_group = cfg.n_group or 1
        self.topk_group = cfg.topk_group or 1
        self.normalise = cfg.norm_topk_prob
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size, dtype=torch.float32))
        if self.method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.empty(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> expert ids (N, k) int64 and weights (N, k) float32."""
        logits = F.linear(x.float(), self.weight)  # (N, E)
        scores = logits.softmax(-1) if self.scoring == "softmax" else logits.sigmoid()
        if self.method == "greedy":
            weights, ids = scores.topk(self.top_k, dim=-1, sorted=False)
        elif self.method == "group_limited_greedy":
            group_scores = scores.view(-1, self.n_group, self.n_experts // self.n_group).amax(-1)
            ids = self._topk_in_groups(scores, group_scores)
            weights = scores.gather(1, ids)
        else:  # noaux_tc
            biased = scores + self.e_score_correction_bias
            grouped = biased.view(-1, self.n_group, self.n_experts // self.n_group)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            ids = self._topk_in_groups(biased, group_scores)
            weights = scores.gather(1, ids)
        if self.top_k > 1 and self.normalise:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scale

    def _topk_in_groups(self, scores: torch.Tensor, group_scores: torch.Tensor) -> torch.Tensor:
        if self.n_group > 1:
            best = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # (N, topk_group)
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            keep = keep.repeat_interleave(self.n_experts // self.n_group, dim=1)  # (N, E)
            scores = scores.masked_fill(~keep, 0.0)  # the reference fills with 0, not -inf
        return scores.topk(self.top_k, dim=-1, sorted=False).indices


# torch >= 2.8: one call for all experts with offsets computed on the device (no host sync on a
# GPU), and faster than a Python loop of per-expert matmuls on CPU too.
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
_loop = threading.local()  # per-thread switch for `looped_experts()`


@contextmanager
def looped_experts():
    """Run every `Experts` on the per-expert loop inside (autograd, FLOP counting, comparisons)."""
    previous = getattr(_loop, "value", False)
    _loop.value = True
    try:
        yield
    finally:
        _loop.value = previous


def combine_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, n_experts: int, run,
                    combine=None) -> torch.Tensor:
    """The grouped MoE computation around `run(routed, counts) -> outputs`:

    token copies are sorted by expert (`routed` (N*k, D), expert by expert, `counts` (E,) how many
    rows each has), `run` applies every expert to its contiguous slice, and the outputs are put
    back in token order and summed with the router weights, in float32 as the reference does.
    `combine(outputs, order, weights)`, where given, does that last step (None: it does not apply).
    """
    n, k = ids.shape
    flat = ids.flatten()  # (N*k,)
    order = flat.argsort(stable=True)  # token copies grouped by expert
    counts = torch.bincount(flat, minlength=n_experts)  # (E,), on x's device
    out = run(x[order // k], counts)  # (N*k, D), still sorted by expert
    combined = combine(out, order, weights) if combine is not None else None
    if combined is not None:
        return combined
    unsorted = torch.empty_like(out)
    unsorted[order] = out
    return (unsorted.view(n, k, -1).float() * weights.unsqueeze(-1)).sum(1).to(x.dtype)


def per_expert_loop(routed: torch.Tensor, counts: torch.Tensor, expert) -> torch.Tensor:
    """`expert(e, rows)` on each expert's slice of `routed` (the portable fallback)."""
    out = torch.empty(routed.shape[0], routed.shape[1], dtype=routed.dtype, device=routed.device)
    start = 0
    for e, count in enumerate(counts.tolist()):
        if count:
            out[start:start + count] = expert(e, routed[start:start + count])
            start += count
    return out


class Experts(nn.Module):
    """The routed experts as stacked weights: gate_up (E, 2M, D), down (E, D, M)."""

    def __init__(self, n_experts: int, hidden: int, inner: int, grouped_mm: bool = HAS_GROUPED_MM):
        """grouped_mm False: always the per-expert loop (as inside `looped_experts()`)."""
        super().__init__()
        self.inner = inner
        self.n_experts = n_experts
        self.gate_up = nn.Parameter(torch.empty(n_experts, 2 * inner, hidden))
        self.down = nn.Parameter(torch.empty(n_experts, hidden, inner))
        self.grouped_mm = grouped_mm and HAS_GROUPED_MM
        self.act = silu_gate  # (h, inner) -> silu(gate) * up; the engine may swap it
        self.combine = None  # combine_experts' last step; the engine may set one

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x (n, D) -> (n, D)."""
        return F.linear(self.act(F.linear(x, self.gate_up[e]), self.inner), self.down[e])

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, D), ids/weights (N, k) -> sum_k weight * expert(x) as (N, D)."""
        return combine_experts(x, ids, weights, self.n_experts, self._run, self.combine)

    def _run(self, routed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if not self.grouped_mm or getattr(_loop, "value", False):
            return per_expert_loop(routed, counts, self.expert)
        offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's slice
        h = torch._grouped_mm(routed, self.gate_up.transpose(1, 2), offs=offs)  # (N*k, 2M)
        return torch._grouped_mm(self.act(h, self.inner), self.down.transpose(1, 2), offs=offs)  # (N*k, D)


class MoE(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        ids, weights = self.gate(flat)
        y = self.experts(flat, ids, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(shape)
