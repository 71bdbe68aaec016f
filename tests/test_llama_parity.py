"""Our Llama against transformers' LlamaForCausalLM on tiny random checkpoints, in float32, on the CPU or, with
`--device cuda`, on a GPU (the Triton attention kernel there)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM as HFLlama

from models.loader import load_model
from tests.helpers import SingleSequence

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=32, rms_norm_eps=1e-5, initializer_range=0.1)
CONFIGS = {
    "mha-untied": {},
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mqa-head-dim": dict(num_key_value_heads=1, head_dim=24),
    "biases": dict(attention_bias=True, mlp_bias=True, num_key_value_heads=2),
    "rope-linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}),
    "rope-dynamic": dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    "rope-llama3": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                         "rope_theta": 500000.0}),
}
PROMPT_LEN, DECODE_STEPS = 40, 8  # past max_position_embeddings, so that dynamic scaling takes effect


def _randomize_norms(model: torch.nn.Module) -> None:
    """transformers leaves norms at 1 and biases at 0; random ones catch swapped or missing tensors."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory, device):
    torch.manual_seed(0)
    hf = HFLlama(LlamaConfig(**{**BASE, **CONFIGS[request.param]})).eval()
    _randomize_norms(hf)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder, max_shard_size="100KB")  # sharded, with model.safetensors.index.json
    assert (folder / "model.safetensors.index.json").exists()
    return hf.to(device), load_model(folder, torch.float32, device)


def _ids(seed: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).to(device)


def test_prefill_logits_match(pair, device):
    hf, ours = pair
    ids = _ids(1, device)
    with torch.inference_mode():
        expected = hf(ids[None]).logits[0]
    got = SingleSequence(ours, PROMPT_LEN).feed(ids.tolist())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_cached_decode_matches_incremental_transformers(pair, device):
    """Prefill then one token at a time through paged blocks, as transformers' cached generation does."""
    hf, ours = pair
    ids = _ids(2, device)
    seq = SingleSequence(ours, PROMPT_LEN + DECODE_STEPS, block_size=3)
    with torch.inference_mode():
        out = hf(ids[None], use_cache=True)
        torch.testing.assert_close(seq.feed(ids.tolist())[-1], out.logits[0, -1], atol=1e-4, rtol=0)
        token = out.logits[0, -1].argmax()
        for _ in range(DECODE_STEPS):
            out = hf(token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
            got = seq.feed([int(token)])[-1]
            torch.testing.assert_close(got, out.logits[0, -1], atol=1e-4, rtol=0)
            token = out.logits[0, -1].argmax()


def test_prefill_after_cached_tokens_matches(pair, device):
    """New tokens that attend to earlier ones already in the cache (the path prefix caching and chunked
    prefill will take) give the same logits as one full prefill."""
    hf, ours = pair
    if hf.config.rope_parameters["rope_type"] == "dynamic":
        pytest.skip("dynamic scaling rotates the first chunk with the shorter length, as transformers' cache does")
    ids = _ids(3, device)
    seq = SingleSequence(ours, PROMPT_LEN, block_size=5)
    seq.feed(ids[:13].tolist())
    with torch.inference_mode():
        expected = hf(ids[None]).logits[0, 13:]
    torch.testing.assert_close(seq.feed(ids[13:].tolist()), expected, atol=1e-4, rtol=0)


def test_float16_checkpoint_loads_in_the_dtype_asked_for(tmp_path):
    """A float16 checkpoint (as Llama-2's are) runs in float32 on the CPU: the same logits as transformers
    computing in float32 from the same float16 weights."""
    torch.manual_seed(0)
    hf = HFLlama(LlamaConfig(**{**BASE, "num_key_value_heads": 2})).eval()
    _randomize_norms(hf)
    hf.half().save_pretrained(tmp_path)
    ours = load_model(tmp_path, torch.float32, torch.device("cpu"))
    assert ours.model.embed_tokens.weight.dtype == torch.float32
    ids = list(range(5, 30))
    reference = HFLlama.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(SingleSequence(ours, len(ids)).feed(ids), expected, atol=1e-4, rtol=0)


def test_a_checkpoint_missing_one_projection_of_a_fused_matrix_is_refused(tmp_path):
    """q, k and v fill one matrix here: a checkpoint without k would leave a third of it uninitialised."""
    hf = HFLlama(LlamaConfig(**BASE)).eval()
    state = {name: t for name, t in hf.state_dict().items() if name != "model.layers.1.self_attn.k_proj.weight"}
    hf.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(ValueError, match=r"lacks tensors: \['model.layers.1.self_attn.k_proj.weight'\]"):
        load_model(tmp_path, torch.float32, torch.device("cpu"))
