"""Logits of the last position of each sequence to the next token of each, and its log-probabilities."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.controls import ControlledRow, apply_controls
from engine.grammar import mask_rows
from engine.outputs import TokenLogprobs
from engine.params import SamplingParams

DRAW_BLOCK = 256  # probabilities summed together when a draw looks for its block


@dataclass
class SamplingRequest(ControlledRow):
    """What the sampler needs to know of one sequence this step."""
    row: int = 0  # of the step's logits: several choices of one prompt sample from its row
    generator: torch.Generator | None = None  # the request's own, when it has a seed
    grammar: object | None = None  # the sequence's llguidance matcher, when its output is constrained


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
        """The logits are the sampler's to change: nothing reads them after it."""
        logits = _rows(logits, [request.row for request in requests])  # a decode step's rows as they are
        scored = [i for i, r in enumerate(requests) if r.params.scored]
        raw_logprobs = _rows(logits, scored).log_softmax(dim=-1) if scored else None  # before the controls
        if constrained := [i for i, r in enumerate(requests) if r.grammar is not None]:
            mask_rows(logits, constrained, [requests[i].grammar for i in constrained])
        if any(not r.controls.empty or r.params.penalized for r in requests):
            logits = _controlled(logits, requests, constrained)
        tokens = torch.empty(len(requests), dtype=torch.long, device=logits.device)
        if greedy := [i for i, r in enumerate(requests) if r.params.greedy]:
            tokens[greedy] = _rows(logits, greedy).max(dim=-1).indices  # the first of ties, as argmax; faster
        if random_rows := [i for i, r in enumerate(requests) if not r.params.greedy]:
            probs = self._probabilities(_rows(logits, random_rows), [requests[i].params for i in random_rows])
            tokens[random_rows] = self._draw(probs, [requests[i].generator for i in random_rows])
        logprobs: list[TokenLogprobs | None] = [None] * len(requests)
        if scored:
            top = [requests[i].params.logprobs or 0 for i in scored]
            for i, entry in zip(scored, token_logprobs(raw_logprobs, tokens[scored], top)):
                logprobs[i] = entry
        return Sampled(tokens.tolist(), logprobs)

    @staticmethod
    def _probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """The rows' sampling distributions; `logits` is theirs to overwrite."""
        column = lambda values: torch.tensor(values, device=logits.device)[:, None]  # noqa: E731
        logits = logits.div_(column([p.temperature for p in params]))
        top_k = [min(p.top_k or logits.shape[-1], logits.shape[-1]) for p in params]
        if min(top_k) < logits.shape[-1]:
            kth = logits.sort(dim=-1, descending=True).values.gather(1, column(top_k) - 1)
            logits = logits.masked_fill_(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        if any(p.top_p < 1 for p in params):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Drop a token when the more likely ones already cover top_p; the most likely always stays.
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs > column([p.top_p for p in params])
            probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
        if any(p.min_p > 0 for p in params):
            floor = probs.max(dim=-1, keepdim=True).values * column([p.min_p for p in params])
            probs = probs.masked_fill_(probs < floor, 0.0)
        return probs

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """Sample each row in proportion to its probabilities by inverse transform: one uniform number per row, drawn
        from the request's own generator when it has a seed (so that its draws do not depend on the batch), against
        the row's cumulative probabilities. One number rather than noise over the whole vocabulary: drawing 49,152
        exponentials a row took half of a 64-sequence decode step. The number finds its block of DRAW_BLOCK tokens,
        then its token in the block, both in float64 sums, so that the tail of a large vocabulary keeps its share,
        without writing a float64 copy of the probabilities."""
        rows, vocab = probs.shape
        blocks = (F.pad(probs, (0, -vocab % DRAW_BLOCK)) if vocab % DRAW_BLOCK else probs).view(rows, -1, DRAW_BLOCK)
        block_ends = blocks.sum(dim=-1).double().cumsum(dim=-1)
        uniforms = torch.stack([torch.rand((), dtype=torch.float64, device=probs.device,
                                           generator=generator or self.generator) for generator in generators])
        targets = (uniforms * block_ends[:, -1])[:, None]
        block = torch.searchsorted(block_ends, targets, right=True).clamp_(max=block_ends.shape[1] - 1)
        before = torch.where(block > 0, block_ends.gather(1, (block - 1).clamp(min=0)), 0.0)
        within = blocks[torch.arange(rows, device=probs.device), block[:, 0]].double().cumsum(dim=-1)
        token = torch.searchsorted(within, targets - before, right=True)
        # The block's float32 sum may round above its float64 one: past the end, take its last likely token.
        last_likely = (within < within[:, -1:]).sum(dim=-1, keepdim=True)
        return (block * DRAW_BLOCK + torch.minimum(token, last_likely))[:, 0]


def _controlled(logits: torch.Tensor, requests: list[SamplingRequest], constrained: list[int]) -> torch.Tensor:
    """The logits with the controls applied. A constrained row that they leave no token (allowed_token_ids or
    bad_words against the grammar, min_tokens barring the EOS that is all a complete grammar allows) keeps its
    grammar's mask alone: the output must match its spec, and token 0 drawn from nothing would break it."""
    before = logits[constrained] if constrained else None  # a copy: indexing with a list copies
    logits = apply_controls(logits, requests)
    if constrained:
        dead = (logits[constrained] == float("-inf")).all(dim=-1)
        for k in dead.nonzero()[:, 0].tolist():
            logits[constrained[k]] = before[k]
    return logits


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """These rows of x: x itself when they are all of its rows in order, else a copy."""
    return x if rows == list(range(x.shape[0])) else x[rows]


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, top: list[int]) -> list[TokenLogprobs]:
    """Each row's entry for its token, with its `top[i]` most likely tokens; logprobs: [rows, vocab]."""
    chosen = logprobs.gather(1, tokens[:, None])
    values, ids = logprobs.topk(max(*top, 1), dim=-1)
    # A rank counts the tokens more likely than the chosen one: all among the most likely when it is there itself
    # (most often), so that only the other rows are counted over the whole vocabulary.
    ranks = (values > chosen).sum(dim=-1).add_(1)
    if len(outside := (ids != tokens[:, None]).all(dim=-1).nonzero()[:, 0]):
        ranks[outside] = (logprobs[outside] > chosen[outside]).sum(dim=-1).add_(1)
    values, ids = values.tolist(), ids.tolist()
    return [TokenLogprobs(token, logprob, rank, list(zip(ids[i][:k], values[i][:k])))
            for i, (token, logprob, rank, k) in enumerate(zip(tokens.tolist(), chosen[:, 0].tolist(), ranks.tolist(),
                                                              top))]


@torch.inference_mode()
def prompt_logprobs(logits: torch.Tensor, targets: list[int], top: int) -> list[TokenLogprobs]:
    """The entries of prompt tokens `targets`, each scored by the logits of the position before it."""
    tokens = torch.tensor(targets, device=logits.device)
    return token_logprobs(logits.log_softmax(dim=-1), tokens, [top] * len(targets))
