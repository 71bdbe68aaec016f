"""Our Cohere against transformers' CohereForCausalLM on tiny random checkpoints, in float32, on the CPU or, with
`--device cuda`, on a GPU."""
import pytest
import torch
from transformers import CohereConfig, CohereForCausalLM as HFCohere

from models.loader import load_model
from tests.helpers import SingleSequence
from tests.test_llama_parity import _randomize_norms

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, initializer_range=0.1, logit_scale=0.25)
CONFIGS = {
    "mha": {},
    "gqa-qk-norm": dict(num_key_value_heads=2, use_qk_norm=True),
    "large-vocab": dict(vocab_size=256000, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                        num_key_value_heads=1),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory, device):
    torch.manual_seed(0)
    hf = HFCohere(CohereConfig(**{**BASE, **CONFIGS[request.param]})).eval()
    _randomize_norms(hf)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf.to(device), load_model(folder, torch.float32, device)


def test_prefill_and_cached_decode_match(pair, device):
    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (24,), generator=torch.Generator().manual_seed(1)).to(device)
    seq = SingleSequence(ours, 32, block_size=3)
    with torch.inference_mode():
        out = hf(ids[None], use_cache=True)
        torch.testing.assert_close(seq.feed(ids.tolist()), out.logits[0], atol=1e-4, rtol=0)
        token = out.logits[0, -1].argmax()
        for _ in range(6):
            out = hf(token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
            torch.testing.assert_close(seq.feed([int(token)])[-1], out.logits[0, -1], atol=1e-4, rtol=0)
            token = out.logits[0, -1].argmax()
