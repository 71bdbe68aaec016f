import os
import sys

# Triton's kernels run under its CPU interpreter in the tests (tests/test_triton_attention.py), unless they run on a
# GPU (`--device cuda`). Triton reads this as its modules are imported, and transformers imports it with itself: so
# it is set before any test module loads.
_ON_CUDA = "--device=cuda" in sys.argv or ("--device", "cuda") in zip(sys.argv, sys.argv[1:])
if not _ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from models.default_model import resolve_model  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda"),
                     help="where the parity tests run their models (tests/gpu_check.sh passes cuda)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device of `--device`: the parity tests run there (the oracle too)."""
    if request.config.getoption("--device") == "cuda" and not torch.cuda.is_available():
        pytest.fail("--device cuda, but CUDA is not available")
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def default_model_path():
    """The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF), fetched once into the user cache."""
    return resolve_model(None)


@pytest.fixture(scope="session")
def llm(default_model_path):
    from engine import LLM
    return LLM(str(default_model_path))


@pytest.fixture(scope="session")
def llm_float32(default_model_path):
    """The default model dequantized to float32 (`--quantization none --dtype float32`, a float32 KV cache): what
    matches transformers' logits."""
    from engine import LLM
    return LLM(str(default_model_path), quantization="none", dtype="float32")


@pytest.fixture(scope="session")
def hf_model(default_model_path):
    """transformers' own GGUF loading of the same file: the oracle."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(default_model_path.parent, gguf_file=default_model_path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(default_model_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(default_model_path.parent, gguf_file=default_model_path.name)


CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "How do I reverse a list in Python?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a tip for sleeping better.",
]


def chat_prompt(question: str) -> str:
    """SmolLM2's ChatML layout with its default system prompt, as its template renders it."""
    return ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
