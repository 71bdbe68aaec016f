"""On the native backend a token's hidden states and logits are the same bits whatever else the step computes: any
other rows of a product, any other queries of attention, however its prompt is cut into chunks, whether it is
decoded or recomputed in a prompt, and with any number of threads. Every comparison is `torch.equal`."""
import contextlib
import os
import platform
import shutil
from dataclasses import dataclass, field

import pytest
import torch

from models.attention import AttentionMetadata
from models.native import compile_kernels
from tests.conftest import CHAT_QUESTIONS

pytestmark = pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("gcc")), reason="no C compiler")


@contextlib.contextmanager
def threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# "": this machine's widest vectors; -mno-avx512f: AVX2's tiles of 6 rows and no reading of panels side by side.
@pytest.mark.parametrize("flags", ["", pytest.param("-mno-avx512f", marks=pytest.mark.skipif(
    platform.machine() != "x86_64", reason="x86 vector extensions"))])
def test_linear_rows_do_not_depend_on_the_other_rows(monkeypatch, flags):
    """Every row count from 1 to 600 (each remainder of the tiles and of the few-rows path, several blocks of rows),
    each row at many positions, with 1 and 2 threads: each row as the same row computed alone."""
    monkeypatch.setenv("CC", f"gcc {flags}")
    kernel = compile_kernels(4, 2, 16).linear
    generator = torch.Generator().manual_seed(0)
    # Three panels, the last one partial; the default model's width (over which MKL's sgemm rounds differently past
    # 256 rows); threaded from 7 rows.
    outputs, inputs = 70, 576
    x, weight = torch.randn(600, inputs, generator=generator), torch.randn(outputs, inputs, generator=generator)
    bias, packed = torch.randn(outputs, generator=generator), kernel.pack(weight)
    alone = torch.cat([kernel(row[None], packed, bias, outputs) for row in x])
    for count in (1, 2):
        with threads(count):
            for rows in range(1, 601):
                picked = (rows * 7 + torch.arange(rows)) % 600  # a different first row for each count
                assert torch.equal(kernel(x[picked], packed, bias, outputs), alone[picked]), (count, rows)


def test_rms_norm_and_silu_rows_do_not_depend_on_the_other_rows():
    """A width that is no multiple of the vector width, so that rows begin at every alignment; threaded and not.
    (PyTorch's F.silu fails this: it splits the elements between threads anywhere, and its vector and scalar exp
    round differently.)"""
    kernels = compile_kernels(4, 2, 16)
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3000, 74, generator=generator) * 4, torch.randn(37, generator=generator)
    for kernel in (lambda rows: kernels.rms_norm(rows[:, :37], weight, 1e-5), kernels.silu_mul):
        alone = torch.cat([kernel(row[None]) for row in x[:100]])
        for rows in (1, 5, 100, 999, 3000):
            assert torch.equal(kernel(x[:rows])[:100], alone[:rows])


def scattered_cache(heads: int, kv_heads: int, head_dim: int, block_size: int, lengths: list[int], seed: int = 0):
    """Random keys and values, sequences of `lengths` tokens in shuffled blocks, and one random query a token."""
    generator = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in lengths]
    cache = torch.randn(2, sum(blocks) + 3, block_size, kv_heads, head_dim, generator=generator)
    order = torch.randperm(len(cache[0]), generator=generator).tolist()
    tables, start = [], 0
    for count in blocks:
        tables.append(order[start:start + count] + [0] * (max(blocks) - count))
        start += count
    q = torch.randn(sum(lengths), heads, head_dim, generator=generator) * 3
    return q, cache, torch.tensor(tables)


def query_index(lengths: list[int]) -> list[tuple[int, int]]:
    """(sequence, context length) of each query when every token of each sequence is a query."""
    return [(s, t + 1) for s, n in enumerate(lengths) for t in range(n)]


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [(9, 3, 64, 16), (6, 2, 36, 5)])
def test_attention_of_a_query_does_not_depend_on_the_batch(heads, kv_heads, head_dim, block_size):
    """Each query alone, one query per sequence (decoding) among other sequences, and among the other queries of its
    sequence's prompt in one call (tiles of queries), cut into chunks of several sizes, with 1 and 2 threads.
    Contexts cross the fixed parts (256 tokens) and the tiles (8 queries)."""
    lengths = [700, 1, 257, 40]
    q, cache, tables = scattered_cache(heads, kv_heads, head_dim, block_size, lengths)
    kernel = compile_kernels(heads, kv_heads, head_dim).paged_decode
    scale = head_dim ** -0.5
    index = query_index(lengths)

    def run(picks: list[list[int]], counts: int) -> torch.Tensor:
        """picks[s]: the queries of sequence s in this call, a run of consecutive tokens ending at the last one's
        context; returns their outputs in order."""
        seqs = [s for s, p in enumerate(picks) if p]
        rows = [i for p in picks for i in p]
        starts = torch.tensor([0, *torch.tensor([len(picks[s]) for s in seqs]).cumsum(0).tolist()])
        lens = torch.tensor([index[picks[s][-1]][1] for s in seqs])
        with threads(counts):
            return kernel(q[rows], cache, tables[seqs], lens, scale, starts)

    firsts = [sum(lengths[:s]) for s in range(len(lengths))]
    alone = torch.cat([kernel(q[i:i + 1], cache, tables[s:s + 1], torch.tensor([n]), scale)
                       for i, (s, n) in enumerate(index)])
    for counts in (1, 2):
        decodes = [[firsts[s] + n - 1] for s, n in enumerate(lengths)]  # each sequence's last token
        assert torch.equal(run(decodes, counts), alone[[d[0] for d in decodes]])
        for cuts in ([700], [512, 188], [37, 512, 151], [1, 8, 9, 300, 382]):
            start = 0
            for cut in cuts:  # sequence 0's prompt in chunks, beside the others' last tokens and a chunk of one
                chunk = list(range(start, start + cut))
                picks = [chunk, decodes[1], list(range(firsts[2] + 100, firsts[2] + 113)), decodes[3]]
                rows = [i for p in picks for i in p]
                assert torch.equal(run(picks, counts), alone[rows]), (counts, cuts, cut)
                start += cut


@dataclass(eq=False)  # compared by identity
class Sequence:
    """A sequence's tokens and its own blocks of a private cache."""
    tokens: list[int]
    blocks: list[int] = field(default_factory=list)


class Pool:
    """A private KV cache for the real model (of the dtype its kernels were compiled for), and forward passes over
    hand-built metadata, built as the runner builds it: sequences with several new tokens first, then those with
    one."""

    def __init__(self, model, num_blocks: int = 400, block_size: int = 16):
        cfg = model.config
        self.model, self.block_size, self.free = model, block_size, list(range(num_blocks))[::-1]  # blocks in reverse
        shape = (2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        dtype = model.model.layers[0].self_attn.attn.decode_kernel.cache_dtype
        self.caches = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)]

    @torch.inference_mode()
    def forward(self, work: list[tuple[Sequence, int, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """work: (sequence, first position, count) of each sequence in this forward, prompts first. Returns the
        final hidden states of each one's new tokens, and the logits of each one's last new token."""
        assert [n > 1 for _, _, n in work] == sorted((n > 1 for _, _, n in work), reverse=True)
        ids, positions, slots = [], [], []
        for seq, start, count in work:
            while len(seq.blocks) * self.block_size < start + count:
                seq.blocks.append(self.free.pop())
            span = range(start, start + count)
            ids += seq.tokens[start:start + count]
            positions += span
            slots += [seq.blocks[p // self.block_size] * self.block_size + p % self.block_size for p in span]
        width = max(len(seq.blocks) for seq, _, _ in work)
        context_lens = [start + count for _, start, count in work]
        prefills = sum(n > 1 for _, _, n in work)
        meta = AttentionMetadata(
            query_lens=[n for _, _, n in work], context_lens=context_lens, num_prefills=prefills,
            slot_mapping=torch.tensor(slots), block_tables=torch.tensor([s.blocks + [0] * (width - len(s.blocks))
                                                                         for s, _, _ in work]),
            decode_context_lens=torch.tensor(context_lens[prefills:]))
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.caches, meta)
        ends = torch.tensor(meta.query_lens).cumsum(0)
        return list(hidden.split(meta.query_lens)), self.model.compute_logits(hidden[ends - 1])


@pytest.fixture(scope="module")
def model(llm):
    model = llm.engine.runner.model
    assert all(layer.decode_kernel is not None for layer in model.model.layers)  # the native backend
    return model


@pytest.fixture(scope="module")
def texts(llm) -> list[list[int]]:
    """A prompt of 700 tokens, then 16 others of 2 to 300 tokens."""
    tokenizer = llm.get_tokenizer()
    words = tokenizer.encode(" ".join(CHAT_QUESTIONS * 40), add_special_tokens=False)
    return [words[:700]] + [words[7 * i + 3: 7 * i + 3 + n] for i, n in enumerate([2, 5, 9, 16, 17, 31, 64, 100,
                                                                                    128, 150, 200, 255, 256, 257,
                                                                                    299, 300])]


@pytest.fixture(scope="module")
def whole(model, texts):
    """The prompt computed whole and alone: its hidden states and the logits of every position."""
    [hidden], _ = Pool(model).forward([(Sequence(texts[0]), 0, 700)])
    return hidden, model.compute_logits(hidden)


def chunked(pool: Pool, seq: Sequence, cuts: list[int], start: int = 0, beside=lambda step: []):
    """The sequence's tokens from `start` on in chunks of `cuts` tokens, each step with `beside(step)`'s work of other
    sequences (their prompts before it, their decode tokens after it, as the runner orders them). Returns its hidden
    states and the logits of each chunk's last token."""
    hidden, logits = [], []
    for step, cut in enumerate(cuts):
        others = beside(step)
        work = [w for w in others if w[2] > 1] + [(seq, start, cut)] + [w for w in others if w[2] == 1]
        states, last = pool.forward(work)
        at = work.index((seq, start, cut))
        hidden.append(states[at])
        logits.append(last[at])
        start += cut
    return torch.cat(hidden), torch.stack(logits)


@pytest.mark.parametrize("cuts", [[512, 188], [37, 512, 151], [1, 255, 2, 442]])
def test_a_prompt_in_chunks_gives_the_bits_of_the_whole(model, texts, whole, cuts):
    hidden, logits = chunked(Pool(model), Sequence(texts[0]), cuts)
    assert torch.equal(hidden, whole[0])
    assert torch.equal(logits, whole[1][torch.tensor(cuts).cumsum(0) - 1])


def test_a_prompt_on_one_thread_gives_the_bits_of_two(model, texts, whole):
    with threads(1):
        hidden, logits = chunked(Pool(model), Sequence(texts[0]), [300, 400])
    assert torch.equal(hidden, whole[0])
    assert torch.equal(logits, whole[1][[299, 699]])


def test_a_prompt_beside_other_prompts_and_decodes_gives_the_bits_of_the_whole(model, texts, whole):
    """Each step also computes another prompt (before ours, as the runner orders them) and, every other step, 8 other
    sequences' decode tokens (after it). The second half of the prompt is computed by another sequence whose first
    32 blocks are the first one's (a prefix cache hit: keys and values computed in other steps)."""
    pool = Pool(model)
    others = [Sequence(t) for t in texts[1:]]
    for seq in others[:8]:  # all but their last token, which they decode beside the prompt
        pool.forward([(seq, 0, len(seq.tokens) - 1)])

    def beside(step: int) -> list[tuple[Sequence, int, int]]:
        decodes = [(seq, len(seq.tokens) - 1, 1) for seq in others[:8]] if step % 2 == 0 else []
        prompt = others[8 + step]
        return [(prompt, 0, len(prompt.tokens))] + decodes

    first = Sequence(texts[0])
    hidden, _ = chunked(pool, first, [100, 412], beside=beside)
    assert torch.equal(hidden, whole[0][:512])
    hit = Sequence(texts[0], first.blocks[:512 // pool.block_size])
    hidden, logits = chunked(pool, hit, [100, 88], start=512, beside=lambda step: beside(step + 2))
    assert torch.equal(hidden, whole[0][512:])
    assert torch.equal(logits, whole[1][[611, 699]])


def test_a_decode_token_alone_among_others_and_recomputed_in_a_prompt(model, texts, whole):
    """The token after the prompt: decoded alone, decoded among 15 other sequences' tokens, and computed as the last
    token of a prompt (as after a preemption, which computes a sequence's tokens again)."""
    tokens = texts[0] + [int(whole[1][-1].argmax())]
    pool = Pool(model)
    seq = Sequence(tokens)
    pool.forward([(seq, 0, 700)])
    [alone], alone_logits = pool.forward([(seq, 700, 1)])

    others = [Sequence(t) for t in texts[1:]]
    for other in others[:15]:
        pool.forward([(other, 0, len(other.tokens) - 1)])
    decodes = [(other, len(other.tokens) - 1, 1) for other in others[:15]]
    again = Sequence(tokens)
    pool.forward([(again, 0, 512)])
    pool.forward([(again, 512, 188)])
    states, logits = pool.forward(decodes[:7] + [(again, 700, 1)] + decodes[7:])
    assert torch.equal(states[7], alone)
    assert torch.equal(logits[7], alone_logits[0])

    [states], logits = Pool(model).forward([(Sequence(tokens), 0, 701)])
    assert torch.equal(states[-1:], alone)
    assert torch.equal(logits, alone_logits)


@pytest.fixture(scope="module")
def cohere(tmp_path_factory):
    """A random Cohere (no decoder layer kernel: PyTorch steps between the native kernels), large enough that PyTorch
    splits its elementwise steps between threads; GQA, Q/K norms, an intermediate size that is no multiple of 16."""
    from transformers import CohereConfig, CohereForCausalLM
    from models.loader import load_model
    from tests.test_llama_parity import _randomize_norms
    torch.manual_seed(0)
    hf = CohereForCausalLM(CohereConfig(vocab_size=1000, hidden_size=256, intermediate_size=700, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=2, use_qk_norm=True,
                                        initializer_range=0.1, logit_scale=0.25)).eval()
    _randomize_norms(hf)
    folder = tmp_path_factory.mktemp("cohere")
    hf.save_pretrained(folder)
    model = load_model(folder, torch.float32, torch.device("cpu"))
    assert model.model.layers[0].mlp.act_kernel is not None  # the native backend
    return model


def test_cohere_prompts_and_decodes_do_not_depend_on_the_batch(cohere):
    generator = torch.Generator().manual_seed(0)
    texts = [torch.randint(0, 1000, (n,), generator=generator).tolist() for n in (401, 3, 50, 120, 7, 260)]
    with threads(1):  # the steps beside run on two threads, between which PyTorch splits elementwise steps
        [hidden], _ = Pool(cohere).forward([(Sequence(texts[0]), 0, 401)])
        logits = cohere.compute_logits(hidden)

    pool = Pool(cohere)
    others = [Sequence(t) for t in texts[1:]]
    for seq in others[:3]:
        pool.forward([(seq, 0, len(seq.tokens) - 1)])
    decodes = [(seq, len(seq.tokens) - 1, 1) for seq in others[:3]]
    got, last = chunked(pool, Sequence(texts[0]), [1, 100, 300],
                        beside=lambda step: [(others[3 + step], 0, len(others[3 + step].tokens))] + decodes
                        if step < 2 else decodes)
    assert torch.equal(got, hidden)
    assert torch.equal(last, logits[[0, 100, 400]])

    seq = Sequence(texts[0])
    pool.forward([(seq, 0, 400)])
    states, last = pool.forward(decodes[:2] + [(seq, 400, 1)] + decodes[2:])
    assert torch.equal(states[2], hidden[-1:])
    assert torch.equal(last[2], logits[-1])
