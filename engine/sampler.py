"""Logits of the last position of each sequence to the next token of each, and its log-probabilities."""
from dataclasses import dataclass

import torch

from engine.controls import ControlledRow, apply_controls
from engine.outputs import TokenLogprobs
from engine.params import SamplingParams


@dataclass
class SamplingRequest(ControlledRow):
    """What the sampler needs to know of one sequence this step."""
    row: int = 0  # of the step's logits: several choices of one prompt sample from its row
    generator: torch.Generator | None = None  # the request's own, when it has a seed

    @property
    def wants_logprobs(self) -> bool:
        """Its logprobs are returned, or summed to rank best_of candidates."""
        return self.params.logprobs is not None or self.params.num_candidates > self.params.n


@dataclass
class Sampled:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # for the requests that want them


class Sampler:
    def __init__(self, device: torch.device, seed: int):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: list[SamplingRequest]) -> Sampled:
        rows = [request.row for request in requests]
        if rows != list(range(logits.shape[0])):  # a decode step takes its rows as they are: no copy
            logits = logits[rows]
        scored = [i for i, r in enumerate(requests) if r.wants_logprobs]
        raw_logprobs = logits[scored].log_softmax(dim=-1) if scored else None  # before the controls change logits
        if any(not r.controls.empty or r.params.penalized for r in requests):
            logits = apply_controls(logits, requests)
        tokens = logits.max(dim=-1).indices  # argmax, the first of ties alike; max's CPU kernel is faster
        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if random_rows:
            index = torch.tensor(random_rows, device=logits.device)
            probs = self._probabilities(logits[index], [requests[i].params for i in random_rows])
            tokens[index] = self._draw(probs, [requests[i].generator for i in random_rows])
        logprobs: list[TokenLogprobs | None] = [None] * len(requests)
        if scored:
            top = [requests[i].params.logprobs or 0 for i in scored]
            for i, entry in zip(scored, token_logprobs(raw_logprobs, tokens[scored], top)):
                logprobs[i] = entry
        return Sampled(tokens.tolist(), logprobs)

    @staticmethod
    def _probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        column = lambda values: torch.tensor(values, device=logits.device)[:, None]  # noqa: E731
        logits = logits / column([p.temperature for p in params])
        top_k = [min(p.top_k or logits.shape[-1], logits.shape[-1]) for p in params]
        if min(top_k) < logits.shape[-1]:
            kth = logits.sort(dim=-1, descending=True).values.gather(1, column(top_k) - 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        if any(p.top_p < 1 for p in params):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Drop a token when the more likely ones already cover top_p; the most likely always stays.
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs > column([p.top_p for p in params])
            probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
        if any(p.min_p > 0 for p in params):
            floor = probs.max(dim=-1, keepdim=True).values * column([p.min_p for p in params])
            probs = probs.masked_fill(probs < floor, 0.0)
        return probs

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """Sample each row in proportion to its probabilities by inverse transform: one uniform number per row, drawn
        from the request's own generator when it has a seed (so that its draws do not depend on the batch), against
        the row's cumulative probabilities. One number rather than noise over the whole vocabulary: drawing 49,152
        exponentials a row took half of a 64-sequence decode step."""
        cumulative = probs.cumsum(dim=-1, dtype=torch.float64)  # float64: no drift over a vocabulary of sums
        uniforms = torch.stack([torch.rand((), dtype=torch.float64, device=probs.device,
                                           generator=generator or self.generator) for generator in generators])
        targets = (uniforms * cumulative[:, -1])[:, None]
        return torch.searchsorted(cumulative, targets, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, top: list[int]) -> list[TokenLogprobs]:
    """Each row's entry for its token, with its `top[i]` most likely tokens; logprobs: [rows, vocab]."""
    chosen = logprobs.gather(1, tokens[:, None])
    ranks = (logprobs > chosen).sum(dim=-1).add_(1).tolist()
    values, ids = ([], []) if not max(top, default=0) else \
        (t.tolist() for t in logprobs.topk(max(top), dim=-1))
    return [TokenLogprobs(token, logprob, rank, list(zip(ids[i][:k], values[i][:k])) if k else [])
            for i, (token, logprob, rank, k) in enumerate(zip(tokens.tolist(), chosen[:, 0].tolist(), ranks, top))]


@torch.inference_mode()
def prompt_logprobs(logits: torch.Tensor, targets: list[int], top: int) -> list[TokenLogprobs]:
    """The entries of prompt tokens `targets`, each scored by the logits of the position before it."""
    tokens = torch.tensor(targets, device=logits.device)
    return token_logprobs(logits.log_softmax(dim=-1), tokens, [top] * len(targets))
