"""Tensor parallelism on the CPU: 2 ranks (rank 0 here, rank 1 a worker process) over gloo, against 1 rank, on tiny
random checkpoints with real vocabularies: the offline API, the server through the OpenAI SDK, the refusals, a rank
killed mid-request, and the loaders reading each rank's slices alone."""
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from transformers import CohereConfig, CohereForCausalLM, LlamaConfig, LlamaForCausalLM

from engine import LLM, SamplingParams
from models.loader import _iter_gguf, _iter_safetensors, load_config
from models.parallel import TensorParallel, checkpoint_slice
from models.registry import model_class
from server.cli import configs
from server.flags import parse_args
from tests.helpers import assert_idle, faults, running_server, start_server, status, stop_server, tiny_checkpoint

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
LLAMA_2 = ("ggml-vocab-llama-spm.gguf", {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
COMMAND_R = ("ggml-vocab-command-r.gguf", {"bos_token": "<BOS_TOKEN>", "eos_token": "<|END_OF_TURN_TOKEN|>",
                                           "add_bos_token": True})
FAMILIES = {
    "llama-2-gqa": (LlamaForCausalLM, LlamaConfig(vocab_size=32000, **SMALL), LLAMA_2),
    # one KV head for 2 ranks: each holds a copy of it; biases: rank 0 alone adds the output projections'
    "llama-mqa-biases": (LlamaForCausalLM, LlamaConfig(vocab_size=32000, **{**SMALL, "num_key_value_heads": 1},
                                                       attention_bias=True, mlp_bias=True), LLAMA_2),
    "command-r-qk-norm": (CohereForCausalLM, CohereConfig(vocab_size=256000, **SMALL, use_qk_norm=True), COMMAND_R),
}
ENGINE = dict(dtype="float32", block_size=4, num_kv_blocks=128, max_num_batched_tokens=16)  # prompts in chunks
PROMPTS = ["The quick brown fox jumps over the lazy dog and runs", "The quick brown fox jumps over a", "Hi"]


def _checkpoint(path, name: str):
    model, config, (vocab, special) = FAMILIES[name]
    return tiny_checkpoint(path, model, config, vocab, special)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def _run(llm: LLM) -> list:
    """Greedy with logprobs and prompt logprobs, two seeded choices that fork from one prompt (a block copy on every
    rank), then a prompt that begins as the first did (a prefix-cache hit)."""
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=3)
    forked = SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=6, ignore_eos=True)
    first = llm.generate(PROMPTS, [greedy, greedy, forked])
    return first + llm.generate([PROMPTS[0] + " far away"], SamplingParams(temperature=0, max_tokens=8, logprobs=3))


def _assert_logprobs_close(ours, theirs) -> None:
    for mine, other in zip(ours, theirs):
        if mine is None:
            assert other is None
            continue
        assert (mine.token_id, mine.rank) == (other.token_id, other.rank)
        assert abs(mine.logprob - other.logprob) <= 1e-4
        assert [i for i, _ in mine.top] == [i for i, _ in other.top]
        assert max(abs(a - b) for (_, a), (_, b) in zip(mine.top, other.top)) <= 1e-4


def test_two_ranks_give_one_ranks_tokens_and_logprobs(family):
    one = _run(LLM(str(family), **ENGINE))
    two_ranks = LLM(str(family), tensor_parallel_size=2, **ENGINE)
    two = _run(two_ranks)
    assert [[c.token_ids for c in o.outputs] for o in two] == [[c.token_ids for c in o.outputs] for o in one]
    for mine, other in zip(two[:2], one[:2]):
        _assert_logprobs_close(mine.prompt_logprobs, other.prompt_logprobs)
        _assert_logprobs_close(mine.outputs[0].logprobs, other.outputs[0].logprobs)
    _assert_logprobs_close(two[3].outputs[0].logprobs, one[3].outputs[0].logprobs)
    assert two[3].num_cached_tokens > 0
    pool = two_ranks.engine.pool  # rank 0's: the other ranks hold their heads of the same blocks, and nothing else
    assert pool.num_free == pool.num_blocks


def test_a_vocabulary_that_two_ranks_do_not_divide_is_padded(tmp_path):
    """32,001 rows: the last rank's share has a padding row, dropped from the gathered logits."""
    model, config, (vocab, special) = FAMILIES["llama-2-gqa"]
    folder = tiny_checkpoint(tmp_path, model, LlamaConfig(**{**config.to_dict(), "vocab_size": 32001}), vocab, special)
    score = SamplingParams(max_tokens=0, prompt_logprobs=5)
    one, two = (LLM(str(folder), tensor_parallel_size=n, **ENGINE).generate(PROMPTS[:1], score)[0] for n in (1, 2))
    _assert_logprobs_close(two.prompt_logprobs, one.prompt_logprobs)


def test_batch_invariance_and_aborts_with_two_ranks(family):
    llm = LLM(str(family), tensor_parallel_size=2, **ENGINE)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    alone = [llm.generate([prompt], greedy)[0].outputs[0].token_ids for prompt in PROMPTS]
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)] == alone
    engine = llm.engine
    ids = [engine.add_request(prompt, greedy) for prompt in PROMPTS]
    for _ in range(3):
        engine.step()
    for request_id in ids:
        engine.abort(request_id)
    assert not engine.has_unfinished_requests()
    assert engine.pool.num_free == engine.pool.num_blocks


@pytest.mark.parametrize("shape, size, message", [
    (dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96), 2,
     "3 KV heads are neither divisible by 2 nor a divisor"),
    (dict(num_attention_heads=3, num_key_value_heads=1, hidden_size=48), 2, "3 attention heads are not divisible by 2"),
    (dict(intermediate_size=95), 2, "95 intermediate features are not divisible by 2"),
    ({}, 4096, "more than the"),
])
def test_splits_that_cannot_be_made_are_refused_at_start(tmp_path, shape, size, message):
    config = LlamaConfig(vocab_size=32000, **{**SMALL, **shape})
    folder = tiny_checkpoint(tmp_path, LlamaForCausalLM, config, *LLAMA_2)
    with pytest.raises(ValueError, match=message):
        LLM(str(folder), tensor_parallel_size=size, **ENGINE)


def test_the_flag_and_argument_take_a_positive_count():
    engine, _ = configs(parse_args(["-tp", "2"]))
    assert engine.tensor_parallel_size == 2
    with pytest.raises(ValueError, match="tensor_parallel_size must be at least 1, got 0"):
        LLM(None, tensor_parallel_size=0)


@pytest.mark.parametrize("name", ["llama-2-gqa", "command-r-qk-norm"])
def test_each_rank_reads_its_slices_alone(tmp_path, name):
    """Both ranks' slices of every checkpoint tensor, put back together, are the tensor; a rank's share is half."""
    folder = _checkpoint(tmp_path, name)
    cfg = load_config(folder)
    whole = dict(_iter_safetensors(folder, cfg, TensorParallel()))
    ranks = [dict(_iter_safetensors(folder, cfg, TensorParallel(r, 2))) for r in range(2)]
    _assert_slices_rebuild(whole, ranks, cfg)
    assert ranks[1]["model.layers.0.mlp.down_proj.weight"].shape == (64, 48)


def test_gguf_slices_and_block_grids_rebuild_the_tensors(tmp_path):
    """A Q8_0 GGUF: weights and their block grids (see models/quant.py) sliced per rank; a grid that the split
    cuts through mid-block is dropped (that projection is quantized afresh)."""
    from gguf import GGMLQuantizationType as Q

    from tests.test_gguf import CFG, write_gguf
    torch.manual_seed(0)
    path = tmp_path / "tiny.gguf"
    write_gguf(LlamaForCausalLM(LlamaConfig(**CFG)).eval(), path, Q.Q8_0)
    from models.gguf_file import open_gguf
    reader = open_gguf(path)
    cfg = load_config(path)
    cls = model_class(cfg.architecture)
    whole = dict(_iter_gguf(reader, cls, cfg, True, TensorParallel()))
    ranks = [dict(_iter_gguf(reader, cls, cfg, True, TensorParallel(r, 2))) for r in range(2)]
    _assert_slices_rebuild(whole, ranks, cfg)


def _assert_slices_rebuild(whole: dict, ranks: list[dict], cfg) -> None:
    for name, tensor in whole.items():
        how = checkpoint_slice(name, cfg, TensorParallel(0, 2))
        if how == "drop":
            assert all(name not in rank for rank in ranks)
        elif how == "rank 0":
            assert torch.equal(ranks[0][name], tensor) and not ranks[1][name].any()
        elif how is None:
            assert all(torch.equal(rank[name], tensor) for rank in ranks)
        else:
            rebuilt = torch.cat([rank[name] for rank in ranks], dim=how[0])
            assert torch.equal(rebuilt.narrow(how[0], 0, tensor.shape[how[0]]), tensor), name


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("served"), "llama-2-gqa")


def test_the_server_on_two_ranks_answers_as_one_rank_does(llama_folder):
    expected = LLM(str(llama_folder), **ENGINE).generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=12))
    with running_server("--model", str(llama_folder), "-tp", "2", "--num-kv-blocks", "128", "--dtype", "float32",
                        "--block-size", "4", env=faults(NANOSERVE_STEP_DELAY=0.01)) as url:  # the leaver leaves mid-way
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
        out = client.completions.create(model=str(llama_folder), prompt=PROMPTS[0], temperature=0, max_tokens=12)
        assert out.choices[0].text == expected[0].outputs[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=str(llama_folder), prompt=PROMPTS[0], temperature=0, max_tokens=12, stream=True))
        assert streamed == expected[0].outputs[0].text
        with httpx.stream("POST", f"{url}/v1/completions", json={
                "model": str(llama_folder), "prompt": PROMPTS[1], "max_tokens": 200, "stream": True,
                "ignore_eos": True}) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # a client that leaves mid-stream
        assert_idle(url)


def test_a_rank_killed_mid_request_takes_the_server_down(llama_folder):
    proc, url = start_server("--model", str(llama_folder), "-tp", "2", "--num-kv-blocks", "128", "--dtype",
                             "float32", "--block-size", "4", env=faults(NANOSERVE_STEP_DELAY=0.02))  # 200 tokens: 4 s
    try:
        worker = int(subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "engine.worker"], capture_output=True,
                                    text=True).stdout.split()[0])
        statuses = []
        with httpx.stream("POST", f"{url}/v1/completions", json={
                "model": str(llama_folder), "prompt": PROMPTS[0], "max_tokens": 200, "stream": True,
                "ignore_eos": True}) as response:
            lines = response.iter_lines()
            first = next(lines)
            assert response.status_code == 200, first
            os.kill(worker, signal.SIGKILL)
            killed = time.monotonic()
            rest = list(lines)
            assert any("error" in line for line in rest), rest[-5:]  # the stream ends with an error event
        while proc.poll() is None and time.monotonic() - killed < 30:
            statuses.append(status(f"{url}/health"))
            time.sleep(0.1)
        assert proc.poll() not in (None, 0)
        assert 503 in statuses
    finally:
        stop_server(proc)




def test_torchrun_starts_the_ranks_and_rank_0_serves(llama_folder):
    """`torchrun --nproc-per-node 2 -m server -tp 2`: every rank runs the server's command, rank 1 turns into rank
    0's worker."""
    expected = LLM(str(llama_folder), **ENGINE).generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=8))
    with socket.socket() as s:  # the ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        rendezvous = s.getsockname()[1]
    torchrun = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(rendezvous))
    proc, url = start_server("--model", str(llama_folder), "-tp", "2", "--num-kv-blocks", "128", "--dtype",
                             "float32", "--block-size", "4", launcher=torchrun)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
        out = client.completions.create(model=str(llama_folder), prompt=PROMPTS[0], temperature=0, max_tokens=8)
        assert out.choices[0].text == expected[0].outputs[0].text
    finally:
        proc.terminate()  # torchrun ends its ranks, which run in sessions of their own
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop_server(proc)


STARTS_A_DYING_RANK = """
import os, signal, subprocess, sys, threading
import engine.parallel
from engine import LLM
popen = subprocess.Popen
def killed_at_once(*args, **kwargs):
    worker = popen(*args, **kwargs)
    threading.Timer(0.3, os.kill, (worker.pid, signal.SIGKILL)).start()
    return worker
engine.parallel.subprocess.Popen = killed_at_once
LLM(sys.argv[1], dtype="float32", num_kv_blocks=64, tensor_parallel_size=2)
print("started")
"""


def test_a_rank_that_dies_while_starting_ends_the_process(llama_folder):
    """Rank 0 waits inside torch.distributed for a rank that will never join: it exits 1 instead of hanging."""
    result = subprocess.run([sys.executable, "-c", STARTS_A_DYING_RANK, str(llama_folder)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "started" not in result.stdout
    assert "tensor-parallel rank 1 exited with code -9" in result.stderr
