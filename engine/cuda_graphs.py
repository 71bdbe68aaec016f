"""Decode steps replayed from CUDA graphs.

A decode step of a model on a GPU is hundreds of small kernel launches, and at small batches the CPU takes longer to
launch them than the GPU to run them. A graph records a step's launches once and replays them in one call. It
replays on fixed buffers at fixed shapes, so graphs are recorded at start for a set of batch sizes, and a batch runs in
the smallest that holds it. Its extra rows are padding: token 0 at position 0, whose key and value go to a scratch
slot that no sequence owns, reading one token of context; their logits are dropped."""
import functools
import logging
import time
from collections.abc import Callable

import torch

from models.attention import AttentionMetadata, KVCache

log = logging.getLogger(__name__)

# forward -> (replay, output): run the recorded forward again on the buffers' current contents, into `output`.
Recorder = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], object], torch.Tensor]]
LARGEST_GRAPH = 512  # beyond this many sequences a step's launches are a small share of its time


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then multiples of 8 (vLLM's sizes), up to the first that holds max_num_seqs, at most LARGEST_GRAPH."""
    candidates = [1, 2, 4, *range(8, LARGEST_GRAPH + 1, 8)]
    return [size for size in candidates if size < max_num_seqs] + [size for size in candidates
                                                                   if size >= max_num_seqs][:1]


class CudaGraphRecorder:
    """Records each forward into a CUDA graph, all graphs sharing one memory pool (they never run at once)."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], object], torch.Tensor]:
        forward()  # once outside the graph: Triton compiles its kernels, cuBLAS picks its algorithms
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = forward()
        return graph.replay, output


class DecodeGraphs:
    """One recorded decode step (one new token per sequence, the model's logits out) per batch size, over shared
    input buffers of the largest size. `run` fills the buffers, pads the batch and replays."""

    def __init__(self, model, kv_caches: list[KVCache], sizes: list[int], table_width: int, scratch_slot: int,
                 record: Recorder):
        self.sizes, self.scratch_slot = sorted(sizes), scratch_slot
        device, largest = kv_caches[0].device, max(sizes)
        # Rows: token ids, positions, cache slots, context lengths. Padding rows keep these values.
        self.inputs = torch.tensor([[0], [0], [scratch_slot], [1]], device=device).repeat(1, largest)
        self.block_tables = torch.zeros(largest, table_width, dtype=torch.long, device=device)
        self.query_starts = torch.arange(largest + 1, device=device)
        self.graphs = {}
        for size in reversed(self.sizes):  # the largest first: the shared pool grows once, to its size
            self.graphs[size] = record(functools.partial(self._forward, model, kv_caches, size))

    @classmethod
    def capture(cls, model, kv_caches: list[KVCache], sizes: list[int], table_width: int, scratch_slot: int,
                record: Recorder) -> "DecodeGraphs":
        start = time.perf_counter()
        graphs = cls(model, kv_caches, sizes, table_width, scratch_slot, record)
        log.warning("CUDA graphs: %d decode batch sizes (%s) recorded in %.1f s; larger batches and steps with "
                    "prompt tokens run eagerly", len(sizes), ", ".join(map(str, graphs.sizes)),
                    time.perf_counter() - start)
        return graphs

    def _forward(self, model, kv_caches: list[KVCache], size: int) -> torch.Tensor:
        """The model over the first `size` rows of the buffers. The metadata's lists describe the batch at
        recording; the model reads its tensors alone (`CausalLM.graph_capturable`)."""
        ids, positions, slots, context_lens = self.inputs[:, :size]
        meta = AttentionMetadata(query_lens=[1] * size, context_lens=[1] * size, num_prefills=0, slot_mapping=slots,
                                 block_tables=self.block_tables[:size], decode_context_lens=context_lens,
                                 query_starts=self.query_starts[:size + 1], context_lens_tensor=context_lens)
        return model.compute_logits(model(ids, positions, kv_caches, meta))

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], context_lens: list[int],
            block_tables: list[list[int]]) -> torch.Tensor | None:
        """Logits [sequences, vocab] of one decode token per sequence, or None when no graph holds the batch.
        They live in the graph's output buffer: valid until the next replay."""
        count, width = len(input_ids), max(map(len, block_tables))
        size = next((size for size in self.sizes if size >= count), None)
        if size is None or width > self.block_tables.shape[1]:
            return None
        pad = size - count
        padded = [input_ids + [0] * pad, positions + [0] * pad, slots + [self.scratch_slot] * pad,
                  context_lens + [1] * pad]
        self.inputs[:, :size].copy_(torch.tensor(padded))
        # Padding rows read block 0 or a table left by an earlier batch: any block is a valid read of one token.
        self.block_tables[:count, :width].copy_(torch.tensor([table + [0] * (width - len(table))
                                                              for table in block_tables]))
        replay, logits = self.graphs[size]
        replay()
        return logits[:count]
