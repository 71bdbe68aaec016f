"""Incremental detokenization with the real SmolLM2 tokenizer."""
import random

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.stop import StopPattern
from models.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    return load_tokenizer(default_model_path)


def _stream(tokenizer, text: str, stop=(), prompt="Say:"):
    """Feed `text` token by token; returns the visible text after each token and the detokenizer."""
    patterns = tuple(map(StopPattern, stop))
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), patterns, skip_special_tokens=True)
    seen = []
    for token in tokenizer.encode(text):
        detok.add_token(token)
        seen.append(detok.visible_text(finished=False))
        if detok.stop_string:
            break
    return seen, detok


def test_multibyte_characters_are_never_split(tokenizer):
    text = "party 🎉 time 日本語 ok 👨‍👩‍👧"
    seen, detok = _stream(tokenizer, text)
    assert detok.text == text
    assert all("\ufffd" not in s for s in seen)
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))  # text only ever grows
    assert len(tokenizer.encode("🎉")) > 1  # the emoji really spans several byte-level tokens


def test_stop_string_spanning_tokens_is_cut_and_never_shown(tokenizer):
    seen, detok = _stream(tokenizer, "The answer is forty-two, my friend.", stop=["forty-two"])
    assert detok.stop_string == "forty-two"
    assert detok.text == "The answer is "
    assert not any("forty" in s for s in seen)


def test_earliest_stop_string_wins(tokenizer):
    _, detok = _stream(tokenizer, "alpha beta gamma", stop=["gamma", "beta"])
    assert detok.stop_string == "beta" and detok.text == "alpha "


def test_held_back_prefix_is_released_when_it_does_not_match(tokenizer):
    seen, detok = _stream(tokenizer, "one two three four", stop=["two thousand"])
    assert detok.stop_string is None
    assert "two" not in seen[1]  # " two" might still grow into "two thousand"
    assert seen[-1] == "one two three four"


@pytest.mark.parametrize("cut", [1, 2])
def test_a_character_begun_in_the_prompt_and_ended_in_the_output_is_output_text(tokenizer, cut):
    """A token-id prompt may end inside a character (its first byte tokens); the output's first tokens finish it.
    The whole character is then the output's text: it used to appear in neither."""
    char_ids = tokenizer.encode("🎉")
    assert len(char_ids) == 3  # byte-level tokens: its first two bytes, then one for each of the others
    prompt = tokenizer.encode("Say:") + char_ids[:cut]
    detok = IncrementalDetokenizer(tokenizer, prompt, (), skip_special_tokens=True)
    for token in char_ids[cut:] + tokenizer.encode(" ok"):
        detok.add_token(token)
    assert detok.text == "🎉 ok"


def test_a_prompt_ending_in_an_unfinished_character_shows_it_as_a_replacement(tokenizer):
    """If the output does not finish the prompt's last character, the output text shows U+FFFD for it."""
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("🎉")[:2], (), skip_special_tokens=True)
    detok.add_token(tokenizer.encode("ok")[0])
    assert detok.text.startswith("\ufffd") and detok.text.endswith("ok")


def test_flush_at_the_end_emits_an_incomplete_character(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], (), skip_special_tokens=True)
    detok.add_token(tokenizer.encode("🎉")[0])
    assert detok.text == ""
    detok.flush()
    assert detok.text == "\ufffd"


def test_partial_match_is_the_longest_end_of_the_text_that_starts_a_stop_string():
    """Against the definition, on texts and stop strings of a small alphabet (many overlapping borders)."""
    rng = random.Random(0)
    for _ in range(300):
        stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 7)))
        pattern, matched, text = StopPattern(stop), 0, ""
        for _ in range(rng.randint(1, 6)):
            piece = "".join(rng.choice("abc") for _ in range(rng.randint(1, 4)))
            matched = pattern.advance(matched, piece)
            text += piece
            assert matched == max(n for n in range(min(len(stop) - 1, len(text)) + 1)
                                         if text.endswith(stop[:n])), (stop, text)
