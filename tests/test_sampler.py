"""Sampling rules on small hand-made distributions."""
import dataclasses
import math

import pytest
import torch

from engine.controls import TokenControls
from engine.params import ParamError, SamplingParams
from engine.sampler import Sampler, SamplingRequest

LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def _request(params: SamplingParams, row: int = 0, generator=None, banned=()) -> SamplingRequest:
    """A request with nothing generated yet; `banned`: the ids that min_tokens bars (params.min_tokens > 0)."""
    controls = TokenControls(None, None, None, (), torch.tensor(banned) if banned else None, None)
    return SamplingRequest(params, controls, [], 0, row, generator)


def _draw(params: SamplingParams, n=2000, banned=()) -> torch.Tensor:
    sampler = Sampler(torch.device("cpu"), seed=0)
    # every request draws from the one row, as the choices of one prompt do
    if banned:
        params = dataclasses.replace(params, min_tokens=1)
    return torch.tensor(sampler(LOGITS[None].clone(), [_request(params, banned=banned)] * n).token_ids)


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
    seeded = lambda seed, row: _request(SamplingParams(temperature=1.0, seed=seed), row, _gen(seed))  # noqa: E731
    alone = [Sampler(torch.device("cpu"), 0)(LOGITS[None].clone(), [seeded(s, 0)]).token_ids[0] for s in range(32)]
    other = lambda row: _request(SamplingParams(temperature=1.0), row)  # noqa: E731
    batch = [r for s in range(32) for r in (other(2 * s), seeded(s, 2 * s + 1))]
    drawn = Sampler(torch.device("cpu"), 1)(LOGITS.repeat(64, 1), batch).token_ids
    assert drawn[1::2] == alone and len(set(alone)) > 1


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                    dict(top_k=2.5), dict(min_p=2), dict(max_tokens=-1),
                                    dict(min_tokens=5, max_tokens=2), dict(stop=[""]), dict(stop_token_ids=[-1])])
def test_invalid_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(presence_penalty=2.5), dict(frequency_penalty=-2.01), dict(presence_penalty=math.nan),
    dict(repetition_penalty=0), dict(repetition_penalty=math.inf), dict(logit_bias={5: 100.5}),
    dict(logit_bias={-1: 1.0}), dict(logit_bias={5: math.nan}), dict(allowed_token_ids=[]),
    dict(allowed_token_ids=[3, -2]), dict(bad_words=[" "]), dict(logprobs=-1), dict(prompt_logprobs=1.5),
    dict(n=3, best_of=2), dict(best_of=0),
])
def test_invalid_controls_name_their_parameter(kwargs):
    with pytest.raises(ParamError) as error:
        SamplingParams(**kwargs)
    assert error.value.param == next(name for name in kwargs if name != "n")


def test_stop_string_is_normalized_to_a_list():
    assert SamplingParams(stop="x").stop == ["x"] and math.isclose(SamplingParams().top_p, 1.0)
    assert SamplingParams(bad_words="no way").bad_words == ["no way"]
