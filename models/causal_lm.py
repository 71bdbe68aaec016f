"""What every architecture shares: token embedding, decoder layers, final norm, output head."""
import torch
import torch.nn.functional as F
from torch import nn

from models.attention import AttentionMetadata, KVCache, PagedAttention
from models.config import ModelConfig
from models.layers import Linear, RotaryEmbedding
from models.parallel import TensorParallel


class DecoderModel(nn.Module):
    """Parameter names as in Hugging Face checkpoints: model.embed_tokens, model.layers.N, model.norm. The embedding
    holds this rank's rows of the vocabulary (all of them on one rank)."""

    def __init__(self, cfg: ModelConfig, layer: type[nn.Module], norm: nn.Module, embed_norm: nn.Module | None,
                 tp: TensorParallel):
        super().__init__()
        start, stop = tp.vocab_span(cfg.vocab_size)
        self.embed_tokens = nn.Embedding(stop - start, cfg.hidden_size)
        self.embed_layer_norm = embed_norm
        self.layers = nn.ModuleList(layer(cfg, tp) for _ in range(cfg.num_layers))
        self.norm = norm


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: type[nn.Module], norm: nn.Module, embed_norm: nn.Module | None = None,
                 tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.config, self.tp = cfg, tp
        self.model = DecoderModel(cfg, layer, norm, embed_norm, tp)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        rows = self.model.embed_tokens.num_embeddings
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, rows, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        """A flat batch of tokens in, their final hidden states out: [tokens, hidden]."""
        h = self._embed(input_ids)
        if self.model.embed_layer_norm is not None:
            h = self.model.embed_layer_norm(h)
        rotation = self.rotary(positions, meta.seq_len_per_token if self.rotary.needs_seq_lens else None)
        for layer, cache in zip(self.model.layers, kv_caches):
            h = layer(h, rotation, cache, meta)
        return self.model.norm(h)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.model.embed_tokens(input_ids)
        ids = input_ids - self.tp.vocab_span(self.config.vocab_size)[0]
        mine = (ids >= 0) & (ids < self.model.embed_tokens.num_embeddings)
        rows = self.model.embed_tokens(torch.where(mine, ids, 0)) * mine[:, None]  # other ranks' tokens: zeros
        return self.tp.all_reduce(rows)

    @property
    def graph_capturable(self) -> bool:
        """Whether a step reads the batch's metadata through its tensors alone and never waits on the device (every
        attention runs a paged kernel; dynamic rotary scaling computes on the host), so a CUDA graph can record it."""
        return not self.rotary.needs_seq_lens and all(
            module.decode_kernel is not None for module in self.modules() if isinstance(module, PagedAttention))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        tied = self.lm_head is None
        logits = (F.linear(hidden, self.model.embed_tokens.weight) if tied else self.lm_head(hidden)).float()
        logits = self.tp.gather_vocab(logits, self.config.vocab_size)
        return logits if self.config.logit_scale == 1 else logits * self.config.logit_scale
