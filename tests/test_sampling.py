import pytest
import torch

from dsvl2_cli.engine.generate.sampling import (SamplingParams, apply_repetition_penalty, filter_top_k, filter_top_p,
                                                make_generator, sample)
from dsvl2_cli.errors import Dsvl2Error


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    assert sample(logits, SamplingParams()).tolist() == [1, 0]


def test_top_k_keeps_k_best():
    out = filter_top_k(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), 2)
    assert torch.isinf(out[0, [0, 3]]).all() and out[0, 1] == 4.0 and out[0, 2] == 3.0


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_top_p(probs.log(), 0.7)
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2:]).all()
    # always at least one token
    assert torch.isfinite(filter_top_p(probs.log(), 0.01)[0, 0])


def test_repetition_penalty_direction():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    assert apply_repetition_penalty(logits, torch.tensor([[0]]), 1.0) is logits


def test_seed_reproducibility_and_distribution():
    logits = torch.zeros(1, 50)
    p = SamplingParams(temperature=1.0, seed=3)
    a = [int(sample(logits, p, generator=g)[0]) for g in [make_generator(3)] for _ in range(20)]
    b = [int(sample(logits, p, generator=g)[0]) for g in [make_generator(3)] for _ in range(20)]
    assert a == b and len(set(a)) > 5
    # low temperature concentrates on the best token
    peaked = torch.tensor([[0.0, 1.0, 0.5]])
    g = make_generator(0)
    draws = [int(sample(peaked, SamplingParams(temperature=0.05), generator=g)[0]) for _ in range(50)]
    assert draws.count(1) >= 49


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                    dict(repetition_penalty=0)])
def test_bad_params_are_refused(kwargs):
    with pytest.raises(Dsvl2Error):
        SamplingParams(**kwargs)
