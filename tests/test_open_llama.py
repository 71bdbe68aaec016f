"""Open-Llama against the reference outputs of the original implementation (shared/reference/open_llama)."""
import json
from pathlib import Path

import pytest
import torch

from models.loader import load_model
from tests.helpers import SingleSequence

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "open_llama"


@pytest.fixture(scope="module", params=["open_llama_tiny_shared", "open_llama_tiny_unshared",
                                        "open_llama_tiny_ropescale"])
def case(request):
    folder = FIXTURES / request.param
    return load_model(folder, torch.float32, torch.device("cpu")), json.loads((folder / "reference.json").read_text())


def test_logits_match(case):
    model, ref = case
    for seq in ref["sequences"]:
        got = SingleSequence(model, seq["length"]).feed(seq["input_ids"])
        torch.testing.assert_close(got[-1], torch.tensor(seq["last_position_logits"]), atol=1e-4, rtol=0)
        if "all_position_logits" in seq:
            torch.testing.assert_close(got, torch.tensor(seq["all_position_logits"]), atol=1e-4, rtol=0)


def test_greedy_tokens_match_through_the_paged_cache(case):
    model, ref = case
    for seq in ref["sequences"]:
        new = seq["greedy_new_tokens"]
        cache = SingleSequence(model, seq["length"] + len(new), block_size=3)
        logits = cache.feed(seq["input_ids"])[-1]
        tokens = []
        for _ in new:
            tokens.append(int(logits.argmax()))
            logits = cache.feed([tokens[-1]])[-1]
        assert tokens == new
