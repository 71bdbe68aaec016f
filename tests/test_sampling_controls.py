"""Logprobs, prompt logprobs, penalties, biases, token restrictions and best_of in the engine, with the real default
model, against transformers' logits and plain reference implementations of each definition."""
import math
from collections import Counter

import pytest
import torch

from engine import SamplingParams
from engine.engine import RequestRefused
from tests.conftest import CHAT_QUESTIONS, chat_prompt

STEPS = 32


def _hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: transformers' log-probabilities of the next token at each position."""
    with torch.inference_mode():
        return hf_model(torch.tensor([ids])).logits[0].log_softmax(dim=-1)


def _assert_entry_matches(entry, token: int, expected: torch.Tensor, top: int) -> None:
    """An entry against transformers' row: the token's logprob, and the top-k (values in order; ids compared
    through transformers' values, as two ids may swap at a near-tie)."""
    assert entry.token_id == token and abs(entry.logprob - expected[token].item()) < 1e-3
    assert len(entry.top) == top
    ids, values = zip(*entry.top) if top else ((), ())
    torch.testing.assert_close(torch.tensor(values), expected.topk(top).values, atol=1e-3, rtol=0)
    torch.testing.assert_close(expected[list(ids)], expected.topk(top).values, atol=1e-3, rtol=0)
    assert list(values) == sorted(values, reverse=True)


def test_logprobs_of_sampled_tokens_match_transformers(llm_float32, hf_model):
    prompt = llm_float32.get_tokenizer().encode(chat_prompt(CHAT_QUESTIONS[1]))
    out = llm_float32.generate(prompt, SamplingParams(temperature=1.0, seed=5, max_tokens=12, logprobs=5))[0].outputs[0]
    expected = _hf_logprobs(hf_model, prompt + out.token_ids)[len(prompt) - 1:-1]
    assert len(out.logprobs) == len(out.token_ids) == 12
    for entry, token, row in zip(out.logprobs, out.token_ids, expected):
        _assert_entry_matches(entry, token, row, 5)
    assert math.isclose(out.cumulative_logprob, sum(e.logprob for e in out.logprobs), abs_tol=1e-4)


def test_logprobs_zero_gives_the_sampled_token_only_and_none_asked_gives_none(llm):
    asked, plain = llm.generate([[504, 3458], [504, 3458]], [SamplingParams(temperature=0, max_tokens=3, logprobs=0),
                                                            SamplingParams(temperature=0, max_tokens=3)])
    assert [e.top for e in asked.outputs[0].logprobs] == [[], [], []]
    assert plain.outputs[0].logprobs is None and plain.outputs[0].cumulative_logprob is None


def test_prompt_logprobs_match_transformers_in_chunks_and_after_the_prompt_was_cached(llm_float32, hf_model):
    """A prompt longer than the step budget (512) comes in two chunks; it was computed just before, so its blocks
    are cached, yet a request that scores it computes every position."""
    text = " ".join(CHAT_QUESTIONS * 12)
    prompt = llm_float32.get_tokenizer().encode(text)
    assert len(prompt) > 512
    llm_float32.generate(prompt, SamplingParams(max_tokens=1))
    out = llm_float32.generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=2))[0]
    assert out.num_cached_tokens == 0 and out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    expected = _hf_logprobs(hf_model, prompt)
    for position, entry in enumerate(out.prompt_logprobs[1:], start=1):
        _assert_entry_matches(entry, prompt[position], expected[position - 1], 2)
    assert llm_float32.engine.pool.num_free == llm_float32.engine.pool.num_blocks


@torch.inference_mode()
def _reference_greedy(hf_model, prompt: list[int], params: SamplingParams, bad_words: list[tuple[int, ...]]):
    """Greedy decoding with each control applied from its definition, one token at a time."""
    out, state = [], hf_model(torch.tensor([prompt]), use_cache=True)
    for _ in range(STEPS):
        logits = state.logits[0, -1].clone()
        if params.allowed_token_ids is not None:
            allowed = logits.clone()
            logits.fill_(float("-inf"))
            logits[params.allowed_token_ids] = allowed[params.allowed_token_ids]
        for word in bad_words:  # generating the last token would complete the word
            if len(word) - 1 <= len(out) and tuple(out[len(out) - len(word) + 1:]) == word[:-1]:
                logits[word[-1]] = float("-inf")
        for token, bias in (params.logit_bias or {}).items():
            logits[token] += bias
        for token in set(prompt + out):
            value = logits[token]
            logits[token] = value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
        for token, count in Counter(out).items():
            logits[token] -= params.frequency_penalty * count + params.presence_penalty
        out.append(int(logits.argmax()))
        state = hf_model(torch.tensor([out[-1:]]), past_key_values=state.past_key_values, use_cache=True)
    return out


CONTROLS = {
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=1.2),
    "negative_frequency": dict(frequency_penalty=-0.5, presence_penalty=-0.3),
    "repetition": dict(repetition_penalty=1.4),
    "repetition_below_one": dict(repetition_penalty=0.7),
    "bias": dict(logit_bias={28: 4.0, 30: 3.5, 2: -100.0}),
    "allowed": dict(allowed_token_ids=list(range(260, 2000, 3)) + [30]),
    "bad_words": dict(bad_words=["Paris", " the", "sea and"]),
    "all_at_once": dict(presence_penalty=0.5, frequency_penalty=0.4, repetition_penalty=1.2, logit_bias={30: 2.0},
                        bad_words=["The"]),
}


def test_controls_match_their_definitions_for_32_greedy_steps(llm_float32, hf_model):
    """Every control in one batch, beside a request with none: each row gets its own."""
    tokenizer = llm_float32.get_tokenizer()
    prompts = [tokenizer.encode(chat_prompt(CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)])) for i in range(len(CONTROLS))]
    params = [SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, **kwargs)
              for kwargs in CONTROLS.values()]
    outputs = llm_float32.generate(prompts + [prompts[0]], params + [SamplingParams(temperature=0, max_tokens=STEPS)])
    for name, prompt, p, out in zip(CONTROLS, prompts, params, outputs):
        bad_words = sorted({tuple(tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False))
                            for word in p.bad_words or [] for prefix in ("", " ")})
        expected = _reference_greedy(hf_model, prompt, p, bad_words)
        assert out.outputs[0].token_ids == expected, name
    plain = llm_float32.generate(prompts[0], SamplingParams(temperature=0, max_tokens=STEPS))[0]
    assert outputs[-1].outputs[0].token_ids == plain.outputs[0].token_ids


def test_best_of_returns_the_candidates_with_the_highest_summed_logprob(llm):
    """Candidate i of best_of draws as choice i of n does (seed + i): the n = best_of run shows all of them."""
    prompt = chat_prompt(CHAT_QUESTIONS[4])
    common = dict(temperature=1.0, seed=11, max_tokens=10, logprobs=0)
    every = llm.generate(prompt, SamplingParams(n=5, **common))[0].outputs
    best = llm.generate(prompt, SamplingParams(n=2, best_of=5, **common))[0].outputs
    ranked = sorted(every, key=lambda c: -sum(e.logprob for e in c.logprobs))
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked[:2]]
    assert [c.index for c in best] == [0, 1] and len({tuple(c.token_ids) for c in every}) > 2
    for choice in best:
        assert math.isclose(choice.cumulative_logprob, sum(e.logprob for e in choice.logprobs), abs_tol=1e-4)


@pytest.mark.parametrize("kwargs,what", [
    (dict(logit_bias={49152: 1.0}), "logit_bias"),
    (dict(allowed_token_ids=[5, 10**6]), "allowed_token_ids"),
    (dict(logprobs=21), "logprobs"),
    (dict(prompt_logprobs=21), "prompt_logprobs"),
    (dict(best_of=257), "best_of"),
])
def test_requests_the_engine_cannot_serve_are_refused_naming_the_parameter(llm, kwargs, what):
    with pytest.raises(RequestRefused) as refused:
        llm.engine.add_request([504, 3458], SamplingParams(**kwargs))
    assert refused.value.what == what and not llm.engine.has_unfinished_requests()
