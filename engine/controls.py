"""Token-level controls on a step's logits, in vLLM's order: allowed tokens, bad words, min_tokens' bans, logit
bias, then the repetition, frequency and presence penalties. Each works on the whole batch at once: per-request ids
become tensors once, when the request arrives, and a step only scatters and masks with them."""
from dataclasses import dataclass

import torch

from engine.params import SamplingParams


@dataclass(frozen=True)
class TokenControls:
    """A request's controls as tensors on the model's device, built once (`build`)."""
    allowed: torch.Tensor | None  # ids that may be sampled
    bias_ids: torch.Tensor | None
    bias_values: torch.Tensor | None
    bad_words: tuple[tuple[int, ...], ...]  # each bad word's token ids, as it is written and after a space
    min_tokens_banned: torch.Tensor | None  # EOS and stop ids, barred while fewer than min_tokens are out
    prompt_ids: torch.Tensor | None  # the prompt's distinct ids, which the repetition penalty counts as seen

    @staticmethod
    def build(params: SamplingParams, prompt_ids: list[int], eos_ids: list[int], encode, device) -> "TokenControls":
        """`encode(text)` -> token ids without special tokens (for bad_words)."""
        ids = lambda values: torch.tensor(sorted(set(values)), dtype=torch.long, device=device)  # noqa: E731
        bias = params.logit_bias or {}
        banned = None
        if params.min_tokens:
            banned = ids(params.stop_token_set.union(() if params.ignore_eos else eos_ids))
        return TokenControls(
            allowed=None if params.allowed_token_ids is None else ids(params.allowed_token_ids),
            bias_ids=torch.tensor(list(bias), dtype=torch.long, device=device) if bias else None,
            bias_values=torch.tensor(list(bias.values()), device=device) if bias else None,
            bad_words=_bad_word_ids(params.bad_words or [], encode), min_tokens_banned=banned,
            prompt_ids=ids(prompt_ids) if params.repetition_penalty != 1 else None)

    @property
    def empty(self) -> bool:
        return self.allowed is None and self.bias_ids is None and not self.bad_words \
            and self.min_tokens_banned is None


def _bad_word_ids(words: list[str], encode) -> tuple[tuple[int, ...], ...]:
    """A word's tokens differ at the start of a text and after a space: bar both spellings, as vLLM does."""
    spellings = {tuple(encode(prefix + word.lstrip())) for word in words for prefix in ("", " ")}
    return tuple(sorted(s for s in spellings if s))


@dataclass
class ControlledRow:
    """One row of the step's logits and what controls it."""
    params: SamplingParams
    controls: TokenControls
    token_ids: list[int]  # prompt then output
    num_prompt_tokens: int

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


def apply_controls(logits: torch.Tensor, rows: list[ControlledRow]) -> torch.Tensor:
    """The logits [rows, vocab] with every control applied, in place."""
    _mask_disallowed(logits, rows)
    _bar(logits, [(i, t) for i, row in enumerate(rows) for t in _barred_bad_word_ends(row)])
    for i, row in enumerate(rows):
        banned = row.controls.min_tokens_banned
        if banned is not None and len(row.token_ids) - row.num_prompt_tokens < row.params.min_tokens:
            logits[i, banned] = float("-inf")
    _add_bias(logits, rows)
    _penalize(logits, rows)
    return logits


def _mask_disallowed(logits: torch.Tensor, rows: list[ControlledRow]) -> None:
    limited = [i for i, row in enumerate(rows) if row.controls.allowed is not None]
    if not limited:
        return
    allowed = [rows[i].controls.allowed for i in limited]
    keep = torch.zeros(len(limited), logits.shape[1], dtype=torch.bool, device=logits.device)
    keep[_row_of_each(allowed), torch.cat(allowed)] = True
    index = torch.tensor(limited, device=logits.device)
    logits[index] = logits[index].masked_fill(~keep, float("-inf"))


def _barred_bad_word_ends(row: ControlledRow) -> list[int]:
    """The last token of each bad word whose other tokens end the output so far: generating it would complete
    the word. A one-token bad word is always barred."""
    out = row.output_ids
    return [word[-1] for word in row.controls.bad_words
            if len(word) - 1 <= len(out) and tuple(out[len(out) - len(word) + 1:]) == word[:-1]]


def _bar(logits: torch.Tensor, cells: list[tuple[int, int]]) -> None:
    if cells:
        rows, tokens = zip(*cells)
        logits[list(rows), list(tokens)] = float("-inf")


def _add_bias(logits: torch.Tensor, rows: list[ControlledRow]) -> None:
    biased = [(i, row.controls) for i, row in enumerate(rows) if row.controls.bias_ids is not None]
    if biased:
        ids = [c.bias_ids for _, c in biased]
        index = torch.tensor([i for i, _ in biased], device=logits.device)[_row_of_each(ids)]
        logits.index_put_((index, torch.cat(ids)), torch.cat([c.bias_values for _, c in biased]), accumulate=True)


def _penalize(logits: torch.Tensor, rows: list[ControlledRow]) -> None:
    """OpenAI's presence and frequency penalties over the output so far; transformers' repetition penalty over the
    prompt and the output (a seen token's logit is divided by it when positive, multiplied when negative). Only
    the cells of seen tokens are touched: a step reads and writes those, not the whole [rows, vocab]."""
    penalized = [i for i, row in enumerate(rows) if row.params.penalized]
    if not penalized:
        return
    flat, vocab, device = logits.view(-1), logits.shape[1], logits.device
    per_row = lambda name: torch.tensor([getattr(row.params, name) for row in rows], device=device)  # noqa: E731
    outputs = {i: torch.tensor(rows[i].output_ids, dtype=torch.long, device=device) for i in penalized}
    repeated = [i for i in penalized if rows[i].params.repetition_penalty != 1]
    if repeated:
        seen = _cells(vocab, {i: torch.cat([rows[i].controls.prompt_ids, outputs[i]]) for i in repeated}).unique()
        values, penalty = flat[seen], per_row("repetition_penalty")[seen // vocab]
        flat[seen] = torch.where(values > 0, values / penalty, values * penalty)
    cells, counts = _cells(vocab, outputs).unique(return_counts=True)
    row_of = cells // vocab
    flat[cells] -= per_row("frequency_penalty")[row_of] * counts + per_row("presence_penalty")[row_of]


def _cells(vocab: int, ids: dict[int, torch.Tensor]) -> torch.Tensor:
    """The flat index (row * vocab + token) of each row's tokens."""
    return torch.cat([row * vocab + tokens for row, tokens in ids.items()])


def _row_of_each(tensors: list[torch.Tensor]) -> torch.Tensor:
    """For the tensors concatenated: the index of the tensor each element came from."""
    sizes = torch.tensor([len(t) for t in tensors], device=tensors[0].device)
    return torch.arange(len(tensors), device=sizes.device).repeat_interleave(sizes)
