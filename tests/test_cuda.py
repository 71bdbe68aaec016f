"""On a GPU only (skipped without CUDA; tests/gpu_check.sh runs them): real CUDA graphs against eager steps, batch
invariance with graphs on and off, and bfloat16 against transformers. Their checkpoints need nothing from ../shared:
the GPU host has only the repository."""
import pytest
import torch
from transformers import CohereConfig, CohereForCausalLM, LlamaConfig, LlamaForCausalLM

from engine import LLM, SamplingParams
from engine.bench_cuda import write_checkpoint_folder
from models.loader import load_model
from tests.helpers import SingleSequence

pytestmark = pytest.mark.cuda
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
PROMPTS = [torch.randint(3, 512, (length,), generator=torch.Generator().manual_seed(length)).tolist()
           for length in (3, 17, 40, 5, 64)]


def _checkpoint(folder, model_class, config):
    torch.manual_seed(0)
    hf = model_class(config).eval()
    hf.save_pretrained(folder)
    write_checkpoint_folder(folder, config)
    return hf


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    _checkpoint(path, LlamaForCausalLM, LlamaConfig(**SHAPE))
    return path


def _llm(folder, **kwargs) -> LLM:
    return LLM(str(folder), device="cuda", dtype="float32", num_kv_blocks=256, max_num_seqs=8, **kwargs)


def _tokens(llm: LLM, prompts, lengths) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_graph_replays_give_the_eager_tokens(folder):
    """Requests of different lengths: the decode batch shrinks from 5 through 1, replaying the graphs of 8, 4, 2
    and 1 with padding rows."""
    graphs, eager = _llm(folder), _llm(folder, enforce_eager=True)
    assert graphs.engine.runner.graphs.sizes == [1, 2, 4, 8]
    assert eager.engine.runner.graphs is None
    lengths = [3, 9, 14, 20, 26]
    assert _tokens(graphs, PROMPTS, lengths) == _tokens(eager, PROMPTS, lengths)


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_batch_invariance(folder, enforce_eager):
    """Each prompt's greedy tokens alone equal its tokens in a batch."""
    llm = _llm(folder, enforce_eager=enforce_eager)
    alone = [_tokens(llm, [prompt], [16])[0] for prompt in PROMPTS]
    assert _tokens(llm, PROMPTS, [16] * len(PROMPTS)) == alone


COHERE = dict(SHAPE, use_qk_norm=True, logit_scale=0.25)
ARCHITECTURES = {"llama": (LlamaForCausalLM, LlamaConfig(**SHAPE)),
                 "cohere": (CohereForCausalLM, CohereConfig(**COHERE))}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_bfloat16_matches_transformers(architecture, tmp_path):
    """Both in bfloat16 on the GPU (weights never in float32 there): the prompt's logits within bfloat16's rounding,
    and the same top token at nearly every position."""
    model_class, config = ARCHITECTURES[architecture]
    hf = _checkpoint(tmp_path, model_class, config).to("cuda", torch.bfloat16)
    ours = load_model(tmp_path, torch.bfloat16, torch.device("cuda"))
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ids = PROMPTS[-1]
    with torch.inference_mode():
        expected = hf(torch.tensor([ids], device="cuda")).logits[0].float()
    got = SingleSequence(ours, len(ids), block_size=16, cache_dtype=torch.bfloat16).feed(ids).float()
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0.05)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
