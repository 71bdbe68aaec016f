"""Our GGUF tokenizer against transformers' tokenizer built from the same GGUF."""
import threading
import time

import pytest
from tokenizers import Tokenizer, normalizers, pre_tokenizers

from models.tokenizer import _max_chars_per_token, load_tokenizer
from tests.helpers import VOCAB

TEXTS = [
    "Hello world",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "Ünïcödé: café, naïve, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🎉🚀 and ZWJ families 👨‍👩‍👧‍👦 and flags 🇫🇷",
    "code: def f(x):\n    return x ** 2  # square",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "special tokens inline<|endoftext|>then text",
    "numbers 3.14159 and 1,000,000 and 2024-11-22",
    "",
    " ",
    "\u00a0non-breaking\u2003em space",
]


@pytest.fixture(scope="module")
def ours(default_model_path):
    return load_tokenizer(default_model_path)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(ours, hf_tokenizer, text):
    assert ours.encode(text) == hf_tokenizer(text)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers_and_round_trips(ours, hf_tokenizer, text):
    ids = ours.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)


def test_metadata(ours):
    """SmolLM2's GGUF: no BOS added, <|im_start|> is BOS (1) and <|im_end|> is EOS (2)."""
    assert ours.bos_token_id == 1 and ours.eos_token_ids == (2,)
    assert ours.encode("hi")[0] != 1
    assert ours.encode("<|im_end|>") == [2]
    assert "<|im_start|>" in ours.chat_template


def test_tokenizer_json_folder_with_bos_and_generation_eos(ours, tmp_path):
    """A Hugging Face folder: tokenizer.json, add_bos_token from tokenizer_config.json, and every EOS id
    of generation_config.json."""
    import json

    from models.tokenizer import load_tokenizer as load
    ours.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
         "chat_template": "{{ messages }}"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    folder = load(tmp_path)
    assert folder.encode("Hello world") == [1] + ours.encode("Hello world")
    assert folder.encode("Hello world", add_special_tokens=False) == ours.encode("Hello world")
    assert folder.eos_token_ids == (2, 0) and folder.chat_template == "{{ messages }}"


def test_named_chat_templates_use_the_default(ours, tmp_path):
    import json

    from models.tokenizer import load_tokenizer as load
    ours.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]}))
    assert load(tmp_path).chat_template == "plain"


def test_encoding_lets_other_threads_run(ours):
    """Tokenizing megabytes takes seconds: the server's event loop must go on meanwhile, so the GIL is let go.
    Counted as ticks of another thread while one long encode runs (with the GIL held there were none)."""
    done, ticks = threading.Event(), []
    worker = threading.Thread(target=lambda: (ours.encode("hello world " * 200_000), done.set()))
    worker.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
        time.sleep(0.005)
    worker.join()
    assert len(ticks) >= 5, f"only {len(ticks)} ticks while encoding"


@pytest.mark.parametrize("vocab", [None, "ggml-vocab-llama-spm.gguf", "ggml-vocab-command-r.gguf"])
def test_no_token_stands_for_more_characters_than_the_bound(ours, vocab):
    """The bound that lets the engine refuse an overlong prompt without tokenizing it."""
    tokenizer = ours if vocab is None else load_tokenizer(VOCAB / vocab)
    bound = tokenizer.max_chars_per_token
    assert bound is not None
    for text in TEXTS + ["=" * 5000, " " * 5000, "\n" * 5000, "ab" * 3000]:
        assert len(text) <= bound * max(len(tokenizer.encode(text, add_special_tokens=False)), 1 if text else 0)


def test_a_tokenizer_that_may_shorten_the_text_has_no_bound(ours):
    backend = Tokenizer.from_str(ours.backend.to_str())
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    assert _max_chars_per_token(backend) is None
    backend.normalizer, backend.pre_tokenizer = None, pre_tokenizers.WhitespaceSplit()
    assert _max_chars_per_token(backend) is None
