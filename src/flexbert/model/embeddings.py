"""Token ids to the first hidden states."""

from __future__ import annotations

import torch
import torch.nn as nn

from flexbert.model.norms import build_norm
from flexbert.model.registries import EMBEDDINGS


@EMBEDDINGS.register("token")
class TokenEmbeddings(nn.Module):
    """Token lookup -> norm -> dropout, with no position embeddings (ModernBERT: RoPE does positions)."""

    def __init__(self, config):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.norm = build_norm(config)
        self.drop = nn.Dropout(config.embedding_dropout)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> [T, H]"""
        return self.drop(self.norm(self.embed(input_ids, positions)))


@EMBEDDINGS.register("learned_absolute")
class LearnedPositionEmbeddings(TokenEmbeddings):
    """Token lookup + learned absolute position (restarting per document) -> norm -> dropout."""

    def __init__(self, config):
        super().__init__(config)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(input_ids) + self.position_embeddings(positions)
