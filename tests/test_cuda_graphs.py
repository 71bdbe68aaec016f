"""Decode graphs (`engine/cuda_graphs.py`) on the CPU: the Triton kernel runs under its interpreter and a stand-in
recorder replays each recorded forward by running it again on the same buffers. What this checks is everything
around the CUDA graph itself: the batch sizes, padding, the scratch slot, the buffers refilled each step, the routing
of decode steps. tests/test_cuda.py records real graphs where a GPU is at hand."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from models.attention import AttentionMetadata
from server.cli import configs
from server.flags import parse_args
from tests.helpers import tiny_llama

PROMPTS = [[1, 5, 9, 33, 2, 7, 100, 64, 3, 900, 31000], [1, 70, 71], [1, 400, 401, 402, 403, 404, 405], [1, 2]]
GREEDY = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)


def record_by_rerunning(forward):
    """A stand-in for a CUDA graph: a replay runs the forward again, into the output the recording returned."""
    output = forward()
    return (lambda: output.copy_(forward())), output


class CountingRecorder:
    def __init__(self):
        self.replays: list[int] = []  # the batch size of each replay

    def __call__(self, forward):
        replay, output = record_by_rerunning(forward)
        size = len(output)
        return (lambda: (self.replays.append(size), replay())), output


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny"))


def _llm(model_path, **kwargs) -> LLM:
    return LLM(str(model_path), kernel_backend="triton", dtype="float32", block_size=4, num_kv_blocks=40, **kwargs)


def test_batch_sizes_are_vllms_up_to_the_first_that_holds_max_num_seqs():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 4]
    assert graph_batch_sizes(9) == [1, 2, 4, 8, 16]
    assert graph_batch_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert graph_batch_sizes(10_000)[-1] == 512


@pytest.fixture(scope="module")
def eager_tokens(model_path):
    return [o.outputs[0].token_ids for o in _llm(model_path).generate(PROMPTS, GREEDY)]


def test_decode_steps_replayed_with_padding_give_the_eager_tokens(model_path, eager_tokens):
    """The prompts run eagerly in one step; then two decode steps of four sequences replay the graph of 4, and once
    the short request is done, four steps of three sequences replay it with a padding row."""
    llm = _llm(model_path, max_num_seqs=4)
    runner = llm.engine.runner
    recorder = CountingRecorder()
    runner.graphs = runner.capture_decode_graphs(recorder, [1, 2, 4], llm.engine.max_model_len)
    short = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outputs = llm.generate(PROMPTS, [GREEDY, short, GREEDY, GREEDY])
    assert [o.outputs[0].token_ids for o in outputs[::2]] == eager_tokens[::2]
    assert outputs[1].outputs[0].token_ids == eager_tokens[1][:3]
    assert outputs[3].outputs[0].token_ids == eager_tokens[3]
    assert recorder.replays == [4] * 6


def test_batches_larger_than_the_largest_graph_run_eagerly(model_path, eager_tokens):
    llm = _llm(model_path)
    runner = llm.engine.runner
    recorder = CountingRecorder()
    runner.graphs = runner.capture_decode_graphs(recorder, [1, 2], llm.engine.max_model_len)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == eager_tokens
    assert recorder.replays == []
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[1:3], GREEDY)] == eager_tokens[1:3]
    assert recorder.replays == [2] * 6


def test_padding_rows_write_only_the_scratch_block(model_path):
    """A batch of 3 in the graph of 4: the cache changes only at the 3 sequences' new slots and in the scratch block,
    which the pool never hands out; the logits equal those of the same step run eagerly."""
    llm = _llm(model_path)
    runner = llm.engine.runner
    graphs = DecodeGraphs(runner.model, runner.kv_caches, [4], 8, runner.num_blocks * runner.block_size,
                          record_by_rerunning)
    ids, positions, slots, lengths, tables = [5, 6, 7], [4, 0, 9], [16, 0, 29], [5, 1, 10], [[3, 4], [0], [2, 9, 7]]
    before = [cache.clone() for cache in runner.kv_caches]
    with torch.inference_mode():
        logits = graphs.run(ids, positions, slots, lengths, tables).clone()
    for old, new in zip(before, runner.kv_caches):
        changed = (old != new).reshape(2, -1, old.shape[3] * old.shape[4]).any(-1).any(0).nonzero().flatten()
        scratch = range(runner.num_blocks * runner.block_size, (runner.num_blocks + 1) * runner.block_size)
        assert set(changed.tolist()) - set(scratch) == set(slots)
    expected = _eager_decode(runner, ids, positions, slots, lengths, tables, before)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def _eager_decode(runner, ids, positions, slots, lengths, tables, caches) -> torch.Tensor:
    width = max(map(len, tables))
    meta = AttentionMetadata(query_lens=[1] * len(ids), context_lens=lengths, num_prefills=0,
                             slot_mapping=torch.tensor(slots), decode_context_lens=torch.tensor(lengths),
                             block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]))
    with torch.inference_mode():
        return runner.model.compute_logits(runner.model(torch.tensor(ids), torch.tensor(positions), caches, meta))


def test_a_batch_whose_table_outgrows_the_buffers_runs_eagerly(model_path):
    runner = _llm(model_path).engine.runner
    graphs = DecodeGraphs(runner.model, runner.kv_caches, [2], 1, runner.num_blocks * runner.block_size,
                          record_by_rerunning)
    with torch.inference_mode():
        assert graphs.run([5], [4], [17], [5], [[3, 4]]) is None
        assert graphs.run([5], [2], [14], [3], [[3]]) is not None


def test_models_whose_step_reads_the_host_are_not_recorded(model_path):
    """The PyTorch attention path sizes its mask from the batch's lengths on the host: no graphs there."""
    llm = LLM(str(model_path), kernel_backend="torch", dtype="float32", block_size=4, num_kv_blocks=40)
    assert not llm.engine.runner.model.graph_capturable
    assert llm.engine.runner.capture_decode_graphs(record_by_rerunning, [1], 128) is None
    assert _llm(model_path).engine.runner.model.graph_capturable


def test_no_graphs_on_the_cpu_and_the_flags_reach_the_config(model_path):
    assert _llm(model_path).engine.runner.graphs is None  # CUDA graphs are CUDA's
    engine, _ = configs(parse_args(["--enforce-eager", "--load-format", "dummy"]))
    assert engine.enforce_eager and engine.load_format == "dummy"
    engine, _ = configs(parse_args([]))
    assert not engine.enforce_eager and engine.load_format == "auto"


def test_dummy_weights_need_no_weight_files(model_path, tmp_path):
    """`--load-format dummy` reads the config and tokenizer alone: random weights of the model's shape."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((model_path / name).read_bytes())
    llm = LLM(str(tmp_path), load_format="dummy", dtype="float32", block_size=4, num_kv_blocks=40)
    model = llm.engine.runner.model
    assert model.model.norm.weight.eq(1).all()
    assert 0 < model.model.layers[0].mlp.down_proj.weight.abs().max() <= 1e-3
    assert len(llm.generate([PROMPTS[0]], GREEDY)[0].outputs[0].token_ids) == GREEDY.max_tokens


def test_the_gpu_benchmark_runs_through_on_the_cpu():
    """`python -m engine.bench_cuda` end to end at a tiny shape: transformers' model, its weights loaded into ours,
    both generating, the targets and the profile printed. Its figures mean nothing here."""
    command = [sys.executable, "-m", "engine.bench_cuda", "--device", "cpu", "--tiny", "--layers", "2", "--prompt-len",
               "24", "--new-tokens", "4", "--batches", "1", "3", "--transformers-batches", "1", "3"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout
    assert re.search(r"ours, 3 sequences: [\d.]+ output tokens/s, [\d.]+x transformers", out)
    assert "where 5 decode steps of 3 sequences spend their time" in out and "aten::mm" in out


def test_the_gpu_check_says_what_it_lacks_without_a_gpu():
    result = subprocess.run(["bash", str(Path(__file__).parent / "gpu_check.sh")], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "no CUDA device" in result.stderr
