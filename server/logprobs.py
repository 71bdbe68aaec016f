"""Log-probabilities as responses show them: chat's `content` entries and the legacy completions lists (OpenAI's
shapes), and vLLM's `prompt_logprobs`, from the engine's `TokenLogprobs`.

A token's string is its bytes decoded with errors replaced, as OpenAI's are: a token that carries part of a UTF-8
character reads U+FFFD, and chat's `bytes` give the true bytes, which a client joins to get the text back."""
import codecs

from engine.outputs import TokenLogprobs
from models.tokenizer import Tokenizer


class TextOffsets:
    """Where each token of a choice begins in the text its tokens make, in characters, for the legacy
    `text_offset`: the tokens' bytes are decoded in turn, so a character split between tokens counts once, and each
    of those tokens begins where the character does."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._position = 0

    def next(self, token_bytes: bytes) -> int:
        """The offset of the token with these bytes, which follows the tokens passed before it."""
        offset = self._position
        self._position += len(self._decoder.decode(token_bytes))
        return offset


def token_string(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprobs], top: int) -> dict:
    """Chat's `logprobs`: an entry per token, with its `top` most likely alternatives, most likely first."""
    def token(token_id: int, logprob: float) -> dict:
        return {"token": token_string(tokenizer, token_id), "logprob": logprob,
                "bytes": list(tokenizer.token_bytes(token_id))}

    content = [{**token(entry.token_id, entry.logprob), "top_logprobs": [token(*pair) for pair in entry.top[:top]]}
               for entry in entries]
    return {"content": content, "refusal": None}


def legacy_logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list[TokenLogprobs | None], top: int,
                    offsets: TextOffsets) -> dict:
    """The completions endpoint's `logprobs` for these tokens; an entry of None (a prompt's first token, which
    nothing scores) reads null. Each `top_logprobs` map holds the `top` most likely tokens and the chosen one, as
    OpenAI's do; tokens whose strings are equal (two partial characters) keep the likelier one's value."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        tokens.append(token_string(tokenizer, token_id))
        text_offset.append(offsets.next(tokenizer.token_bytes(token_id)))
        token_logprobs.append(None if entry is None else entry.logprob)
        top_logprobs.append(None if entry is None else _top_map(tokenizer, entry, top))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def _top_map(tokenizer: Tokenizer, entry: TokenLogprobs, top: int) -> dict[str, float]:
    alternatives = {}
    for token_id, logprob in [*entry.top[:top], (entry.token_id, entry.logprob)]:
        alternatives.setdefault(token_string(tokenizer, token_id), logprob)
    return alternatives


def vllm_prompt_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprobs | None], top: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: null for the first prompt token, then per position a map of token id (a string,
    as JSON keys are) to {logprob, rank, decoded_token}: the prompt's own token first, then the `top` most likely.
    A rank is 1 + how many tokens are more likely."""
    return [None if entry is None else _vllm_position(tokenizer, entry, top) for entry in entries]


def _vllm_position(tokenizer: Tokenizer, entry: TokenLogprobs, top: int) -> dict:
    ranked = [(entry.token_id, entry.logprob, entry.rank)] + [(t, lp, rank) for rank, (t, lp) in
                                                              enumerate(entry.top[:top], 1)]
    return {str(token_id): {"logprob": logprob, "rank": rank, "decoded_token": token_string(tokenizer, token_id)}
            for token_id, logprob, rank in ranked}
