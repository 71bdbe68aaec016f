"""Logits of the last position of each sequence to the next token of each."""
from dataclasses import dataclass

import torch

from engine.params import SamplingParams


@dataclass
class SamplingRequest:
    """What the sampler needs to know of one sequence this step."""
    row: int  # of the step's logits: several choices of one prompt sample from its row
    params: SamplingParams
    generator: torch.Generator | None  # the request's own, when it has a seed
    banned_token_ids: torch.Tensor | None  # EOS and stop tokens while fewer than min_tokens are out


class Sampler:
    def __init__(self, device: torch.device, seed: int):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: list[SamplingRequest]) -> list[int]:
        rows = [request.row for request in requests]
        if rows != list(range(logits.shape[0])):  # a decode step takes its rows as they are: no copy
            logits = logits[rows]
        for row, request in enumerate(requests):
            if request.banned_token_ids is not None:
                logits[row, request.banned_token_ids] = float("-inf")
        tokens = logits.max(dim=-1).indices  # argmax, the first of ties alike; max's CPU kernel is faster
        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            probs = self._probabilities(logits[rows], [requests[i].params for i in random_rows])
            tokens[rows] = self._draw(probs, [requests[i].generator for i in random_rows])
        return tokens.tolist()

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
        """Sample each row in proportion to its probabilities (argmax of p / Exp(1) noise), using the
        request's own generator when it has a seed so that its draws do not depend on the batch."""
        noise = torch.empty_like(probs)
        for row, generator in enumerate(generators):
            noise[row].exponential_(generator=generator or self.generator)
        return (probs / noise).argmax(dim=-1)
