"""Runs the model on a scheduled batch: owns the device, the weights and the KV-cache tensors."""
import itertools
import logging
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.cuda_graphs import CudaGraphRecorder, DecodeGraphs, Recorder, graph_batch_sizes
from engine.parallel import RankGroup, check_devices, device_for_rank, launched_by_torchrun
from engine.scheduler import ScheduledBatch
from models.attention import AttentionMetadata, KVCache
from models.config import DTYPES, ModelConfig
from models.loader import load_model
from models.native import bfloat16_features
from models.options import KV_CACHE_DTYPES
from models.parallel import TensorParallel, check_split, local_heads

log = logging.getLogger(__name__)

# On the CPU, activations of more tokens than this overflow the caches and each large temporary is a
# fresh mmap (page faults on every touch), so a big prefill step runs as several forward passes.
CPU_TOKENS_PER_FORWARD = 2048
# Tokens a step computes by default with chunked prefill. On the CPU 512: running streams then get a token about every
# second while a long prompt comes in on a two-core machine (measured on a 2,048-token prompt of the default model:
# steps of 1.1 s at 512 tokens, 3.3 s at 2,048), for about 30% less prefill throughput than 2,048-token steps (433
# against 623 tokens/s); more cores shorten the steps. On a GPU 8192, vLLM's default for online serving.
CHUNKED_PREFILL_TOKENS = {"cpu": 512, "cuda": 8192}


@dataclass
class ScoredPrompt:
    """Logits of a chunk of a prompt that scores its tokens: row i, of position `start` + i, scores the token
    after it."""
    seq: object  # the Sequence
    start: int
    logits: torch.Tensor


@dataclass
class StepLogits:
    last: torch.Tensor  # [seqs, vocab]: each scheduled sequence's last new position, in batch order
    prompts: list[ScoredPrompt]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: torch.dtype,
                  kernel_backend: str = "auto") -> torch.dtype:
    """`auto`: on the CPU bfloat16 linear weights where the CPU multiplies them natively (AMX or AVX-512 BF16) and
    the native kernels run (activations stay float32), else float32; on a GPU the checkpoint's dtype, with bfloat16
    for float32 ones."""
    if name not in (*DTYPES, "auto"):
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {name!r}")
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        features = bfloat16_features()
        picked = torch.bfloat16 if features and kernel_backend in ("auto", "native") else torch.float32
        log.warning("dtype auto: %s linear weights (bfloat16 products on this CPU: %s; kernel backend %s)",
                    str(picked).removeprefix("torch."), features or "none", kernel_backend)
        return picked
    return torch.bfloat16 if checkpoint_dtype == torch.float32 else checkpoint_dtype


def resolve_kv_cache_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """`auto`: bfloat16 when the model's dtype is, else float32 (float16 stays float16)."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {name!r}")
    return dtype if name == "auto" else DTYPES[name]


class ModelRunner:
    """Rank `rank` of the model's tensor-parallel ranks (`engine/parallel.py`); rank 0, the engine's, starts the
    others and leads them."""

    def __init__(self, config: EngineConfig, model_path, checkpoint: ModelConfig, max_model_len: int, rank: int = 0):
        self.tp = TensorParallel(rank, config.tensor_parallel_size)
        self.device = device_for_rank(resolve_device(config.device), rank)
        self.dtype = resolve_dtype(config.dtype, self.device, checkpoint.dtype, config.kernel_backend)
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.block_size = config.block_size
        self.tokens_per_forward = CPU_TOKENS_PER_FORWARD if self.device.type == "cpu" else None
        self.chunked_prefill_tokens = CHUNKED_PREFILL_TOKENS[self.device.type]
        self.group = self._start_ranks(config, model_path, checkpoint, max_model_len) if self.tp.leads else None
        try:
            self._load(config, model_path, checkpoint, max_model_len)
        except BaseException:
            if self.group is not None:  # the other ranks fail with us: their peer is gone
                self.group.close()
            raise
        if self.group is not None:
            self.group.started()

    def _load(self, config: EngineConfig, model_path, checkpoint: ModelConfig, max_model_len: int) -> None:
        """This rank's share of the model, its KV cache and, on CUDA, its decode graphs."""
        self.model = load_model(model_path, self.dtype, self.device, config.kernel_backend,
                                config.quantization, self.kv_cache_dtype, config.load_format, self.tp)
        kv_heads = local_heads(checkpoint, self.tp)[1]
        self.num_blocks = config.num_kv_blocks or self.tp.least(self._blocks_that_fit(config, checkpoint, kv_heads))
        if self.num_blocks < 1:
            raise ValueError("the KV cache holds no block: give it more memory")
        # One block beyond the pool's: the scratch block that the padding rows of a CUDA graph's batch write to.
        shape = (2, self.num_blocks + 1, self.block_size, kv_heads, checkpoint.head_dim)
        self.kv_caches: list[KVCache] = [torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
                                         for _ in range(checkpoint.num_layers)]
        log.warning("KV cache: %d blocks of %d tokens = %d tokens (%s, %s)", self.num_blocks, self.block_size,
                    self.num_blocks * self.block_size, self.device, self.kv_cache_dtype)
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = self.capture_decode_graphs(CudaGraphRecorder(), graph_batch_sizes(config.max_num_seqs),
                                                     max_model_len)

    def _start_ranks(self, config: EngineConfig, model_path, checkpoint: ModelConfig,
                     max_model_len: int) -> RankGroup:
        """Check that the ranks can split the model here, then start them (or join torchrun's)."""
        check_devices(self.device, self.tp.size)
        check_split(checkpoint, self.tp.size)
        log.warning("tensor parallelism: %d ranks (%s)", self.tp.size, "torchrun's" if launched_by_torchrun()
                    else "worker processes started here")
        return RankGroup(config, model_path, max_model_len, self.device)

    def capture_decode_graphs(self, record: Recorder, sizes: list[int], max_model_len: int) -> DecodeGraphs | None:
        """Decode steps of up to max(sizes) sequences recorded by `record` (CUDA graphs, on CUDA), or None where
        the model's step cannot be recorded."""
        if not self.model.graph_capturable:
            log.warning("CUDA graphs off: attention runs on the PyTorch path (no paged kernel) or the rotary scaling "
                        "is dynamic, and either reads the batch on the host")
            return None
        with torch.inference_mode():
            return DecodeGraphs.capture(self.model, self.kv_caches, sizes, -(-max_model_len // self.block_size),
                                        self.num_blocks * self.block_size, record)

    def _blocks_that_fit(self, config: EngineConfig, checkpoint: ModelConfig, kv_heads: int) -> int:
        """Blocks of this rank's KV heads that its memory holds."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * config.gpu_memory_utilization
        else:
            budget = config.kv_cache_memory_gib * 2 ** 30
        elements = 2 * checkpoint.num_layers * kv_heads * checkpoint.head_dim
        bytes_per_block = elements * self.block_size * self.kv_cache_dtype.itemsize
        return int(budget // bytes_per_block)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepLogits:
        """Logits of the last new token of each scheduled sequence, in batch order, and of every new prompt
        position of the sequences that score their prompt."""
        if batch.block_copies:  # choices forked from a prompt take a copy of its partial last block
            self._on_every_rank("copy", batch.block_copies)
        counts = batch.num_new_tokens
        parts = [self._forward(batch.seqs[a:b], counts[a:b]) for a, b in self._split(counts)]
        last = parts[0].last if len(parts) == 1 else torch.cat([p.last for p in parts])  # decode: no copy
        return StepLogits(last, [scored for p in parts for scored in p.prompts])

    def _split(self, counts: list[int]) -> list[tuple[int, int]]:
        """Consecutive groups of whole sequences with at most `tokens_per_forward` tokens (or one sequence)."""
        groups, start, tokens = [], 0, 0
        for i, count in enumerate(counts):
            if self.tokens_per_forward and tokens and tokens + count > self.tokens_per_forward:
                groups.append((start, i))
                start, tokens = i, 0
            tokens += count
        return groups + [(start, len(counts))]

    def _forward(self, seqs: list, counts: list[int]) -> StepLogits:
        batch = _BatchInputs.of(seqs, counts, self.block_size)
        logits = self._on_every_rank("forward", batch)
        if not any(batch.scoring):
            return StepLogits(logits, [])
        ends = list(itertools.accumulate(len(rows) for rows in batch.wanted))
        prompts = [ScoredPrompt(seq, seq.num_computed_tokens, logits[end - len(rows):end])
                   for seq, rows, end, scores in zip(seqs, batch.wanted, ends, batch.scoring) if scores]
        last = logits if len(logits) == len(seqs) else logits[[end - 1 for end in ends]]
        return StepLogits(last, prompts)

    def _on_every_rank(self, order: str, payload):
        """Do `order` here and, with tensor parallelism, have every other rank do it with us."""
        if self.group is None:
            return self.handle(order, payload)
        with self.group.leading(order, payload):
            return self.handle(order, payload)

    @torch.inference_mode()
    def handle(self, order: str, payload) -> torch.Tensor | None:
        """One order, on any rank: "copy" [(source, destination)] blocks, or "forward" a batch (its logits)."""
        if order == "copy":
            sources, destinations = (torch.tensor(ids, device=self.device) for ids in zip(*payload))
            for cache in self.kv_caches:
                cache[:, destinations] = cache[:, sources]
            return None
        return self._logits(payload)

    def _logits(self, batch: "_BatchInputs") -> torch.Tensor:
        """The model on the batch: logits of its wanted rows."""
        if self.graphs is not None and len(batch.input_ids) == len(batch.context_lens) and not any(batch.scoring):
            logits = self.graphs.run(batch.input_ids, batch.positions, batch.slots, batch.context_lens,
                                     batch.block_tables)
            if logits is not None:
                return logits
        num_prefills = sum(n > 1 for n in batch.query_lens)
        width = max(map(len, batch.block_tables))
        tensor = lambda data: torch.tensor(data, dtype=torch.long, device=self.device)  # noqa: E731
        meta = AttentionMetadata(
            query_lens=batch.query_lens, context_lens=batch.context_lens, num_prefills=num_prefills,
            slot_mapping=tensor(batch.slots),
            block_tables=tensor([table + [0] * (width - len(table)) for table in batch.block_tables]),
            decode_context_lens=tensor(batch.context_lens[num_prefills:]))
        hidden = self.model(tensor(batch.input_ids), tensor(batch.positions), self.kv_caches, meta)
        return self.model.compute_logits(hidden[tensor([i for rows in batch.wanted for i in rows])])


@dataclass
class _BatchInputs:
    """A forward pass's new tokens, flat, and where each goes in the cache: what rank 0 sends the other ranks."""
    input_ids: list[int]
    positions: list[int]
    slots: list[int]  # flat cache slot of each token
    query_lens: list[int]  # per sequence, its new tokens
    context_lens: list[int]  # per sequence, once the step's tokens are in
    block_tables: list[list[int]]  # per sequence
    wanted: list[range]  # per sequence, the rows whose logits the step returns
    scoring: list[bool]  # per sequence, whether it scores its prompt

    @classmethod
    def of(cls, seqs: list, counts: list[int], block_size: int) -> "_BatchInputs":
        batch = cls([], [], [], list(counts), [seq.num_computed_tokens + n for seq, n in zip(seqs, counts)],
                    [seq.block_table for seq in seqs], [], [_scores_prompt(seq) for seq in seqs])
        for seq, count, scores in zip(seqs, counts, batch.scoring):
            start, first = seq.num_computed_tokens, len(batch.input_ids)
            span = range(start, start + count)
            batch.wanted.append(range(first + (0 if scores else count - 1), first + count))
            batch.input_ids += seq.token_ids[start:start + count]
            batch.positions += span
            batch.slots += [seq.block_table[p // block_size] * block_size + p % block_size for p in span]
        return batch


def _scores_prompt(seq) -> bool:
    """Whether the sequence's next chunk holds prompt positions whose logits score a prompt token."""
    return seq.prompt_logprobs is not None and seq.num_computed_tokens < len(seq.prompt_token_ids) - 1
