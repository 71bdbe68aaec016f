"""Sampling rules on small hand-made distributions."""
import math

import pytest
import torch

from engine.params import SamplingParams
from engine.sampler import Sampler, SamplingRequest

LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def _draw(params: SamplingParams, n=2000, banned=()) -> torch.Tensor:
    sampler = Sampler(torch.device("cpu"), seed=0)
    # every request draws from the one row, as the choices of one prompt do
    request = SamplingRequest(0, params, None, torch.tensor(banned) if banned else None)
    return torch.tensor(sampler(LOGITS[None].clone(), [request] * n))


def test_greedy_takes_argmax_and_respects_bans():
    assert set(_draw(SamplingParams(temperature=0), n=5).tolist()) == {0}
    assert set(_draw(SamplingParams(temperature=0), n=5, banned=[0]).tolist()) == {1}


@pytest.mark.parametrize("temperature", [1e-6, 1e-38, 1e-320])
def test_a_vanishing_temperature_is_greedy(temperature):
    # logits / 1e-38 overflow float32 and softmax would turn them into NaN
    assert set(_draw(SamplingParams(temperature=temperature), n=5, banned=[0]).tolist()) == {1}


def test_frequencies_follow_the_distribution():
    counts = torch.bincount(_draw(SamplingParams(temperature=1.0), n=20000), minlength=4) / 20000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)


@pytest.mark.parametrize("params,allowed", [
    (SamplingParams(top_k=2), {0, 1}),
    (SamplingParams(top_p=0.7), {0, 1}),  # 0.5 alone is short of 0.7; 0.5 + 0.3 covers it
    (SamplingParams(top_p=0.45), {0}),
    (SamplingParams(min_p=0.4), {0, 1}),  # keeps p >= 0.4 * 0.5
    (SamplingParams(min_p=0.2, top_k=3), {0, 1, 2}),
])
def test_filters_keep_exactly_the_allowed_tokens(params, allowed):
    assert set(_draw(params).tolist()) == allowed


def test_low_temperature_sharpens():
    counts = torch.bincount(_draw(SamplingParams(temperature=0.25), n=4000), minlength=4)
    assert counts[0] / 4000 > 0.85


def test_seeded_requests_are_reproducible_whatever_the_batch():
    """32 seeded requests, each alone and then all in one batch among unseeded ones: the same draws (one draw of
    four tokens alone would match by chance a third of the time)."""
    seeded = lambda seed, row: SamplingRequest(row, SamplingParams(temperature=1.0, seed=seed), _gen(seed), None)  # noqa: E731
    alone = [Sampler(torch.device("cpu"), 0)(LOGITS[None].clone(), [seeded(s, 0)])[0] for s in range(32)]
    other = lambda row: SamplingRequest(row, SamplingParams(temperature=1.0), None, None)  # noqa: E731
    batch = [r for s in range(32) for r in (other(2 * s), seeded(s, 2 * s + 1))]
    drawn = Sampler(torch.device("cpu"), 1)(LOGITS.repeat(64, 1), batch)
    assert drawn[1::2] == alone and len(set(alone)) > 1


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                    dict(top_k=2.5), dict(min_p=2), dict(max_tokens=0),
                                    dict(min_tokens=5, max_tokens=2), dict(stop=[""]), dict(stop_token_ids=[-1])])
def test_invalid_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_stop_string_is_normalized_to_a_list():
    assert SamplingParams(stop="x").stop == ["x"] and math.isclose(SamplingParams().top_p, 1.0)
