"""The real default model end to end: logits and greedy tokens against transformers' GGUF loading."""
import torch

from engine import SamplingParams
from models.loader import load_model
from tests.conftest import CHAT_QUESTIONS, chat_prompt
from tests.helpers import SingleSequence


def test_file_is_the_pinned_one(default_model_path):
    from models.default_model import SHA256, _sha256
    assert _sha256(default_model_path) == SHA256


def test_last_position_logits_match_transformers(default_model_path, hf_model, llm_float32):
    ids = llm_float32.get_tokenizer().encode(chat_prompt(CHAT_QUESTIONS[0]))
    ours = load_model(default_model_path, torch.float32, torch.device("cpu"), quantization="none")
    got = SingleSequence(ours, len(ids), block_size=16).feed(ids)[-1]
    with torch.inference_mode():
        expected = hf_model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)


def _margins(logits: torch.Tensor) -> str:
    top2 = logits.topk(2).values
    return f"top-1/top-2 margin {float(top2[0] - top2[1]):.2e}"


def test_greedy_until_eos_matches_generate(llm_float32, hf_model):
    tokenizer = llm_float32.get_tokenizer()
    prompts = [tokenizer.encode(chat_prompt(q)) for q in CHAT_QUESTIONS]
    outputs = llm_float32.generate(prompts, SamplingParams(temperature=0, max_tokens=96))
    for ids, out in zip(prompts, outputs):
        with torch.inference_mode():
            hf = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   do_sample=False, max_new_tokens=96, pad_token_id=2)
        expected = hf[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].finish_reason == ("stop" if expected[-1] in tokenizer.eos_token_ids else "length")


def test_greedy_ignore_eos_matches_argmax_loop(llm_float32, hf_model):
    """64 tokens with EOS as an ordinary token, against a plain argmax loop over transformers' model."""
    tokenizer = llm_float32.get_tokenizer()
    prompts = [tokenizer.encode(chat_prompt(q)) for q in CHAT_QUESTIONS]
    outputs = llm_float32.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    for ids, out in zip(prompts, outputs):
        expected, margins = [], []
        with torch.inference_mode():
            step = hf_model(torch.tensor([ids]), use_cache=True)
            for _ in range(64):
                logits = step.logits[0, -1]
                expected.append(int(logits.argmax()))
                margins.append(_margins(logits))
                step = hf_model(torch.tensor([[expected[-1]]]), past_key_values=step.past_key_values, use_cache=True)
        got = out.outputs[0].token_ids
        first_diff = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        assert got == expected, f"first difference at {first_diff}: {margins[first_diff or 0]}"
        assert out.outputs[0].finish_reason == "length"
