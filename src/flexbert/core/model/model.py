"""The FlexBERT encoder and its masked-language-model wrapper.

    input_ids [T] ──embeddings──► h [T, H] ──layers (global / local attention)──► final_norm
              └─► MLM: head ─► tied decoder ─► logits [N, V]   (N = masked tokens when sparse)

Everything runs on the unpadded stream (see :mod:`flexbert.core.model.backends`): padded ``(B, S)``
batches are unpadded at the model's entrance and repadded at its exit, and packed rows (several
documents per row) are simply streams with more documents than rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexbert.core.model.attention import AttentionContext, RotaryTables
from flexbert.core.model.backends import resolve_backend
from flexbert.core.model.blocks import build_norm
from flexbert.core.model.compile import compile_regions
from flexbert.core.model.config import FlexBertConfig, LayerType
from flexbert.core.model.layout import DocumentLayout, scatter_rows
from flexbert.core.model.losses import IGNORE_INDEX
from flexbert.core.model.registries import ATTENTION_BACKENDS, EMBEDDINGS, HEAD, INIT, LAYER, LOSS


@dataclass(frozen=True)
class Unpadding:
    """Where the real tokens of a padded (B, S) batch live, to go there and back."""

    indices: torch.Tensor  # [T] flat indices of real tokens in the (B*S) grid
    batch_size: int
    seqlen: int
    layout: DocumentLayout

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor) -> Unpadding:
        batch_size, seqlen = attention_mask.shape
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1, dtype=torch.int32)
        indices = torch.nonzero(mask.flatten()).flatten()
        cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        layout = DocumentLayout.from_cu_seqlens(cu_seqlens, int(lengths.max()), indices.shape[0])
        return cls(indices, batch_size, seqlen, layout)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [T, ...]"""
        return padded.flatten(0, 1)[self.indices]

    def repad(self, unpadded: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[T, ...] -> [B, S, ...], with ``fill`` at padding positions."""
        return scatter_rows(unpadded, self.indices, self.batch_size * self.seqlen, fill).unflatten(
            0, (self.batch_size, self.seqlen)
        )


@dataclass
class EncodedBatch:
    """The encoder's output on the unpadded stream, and the way back to the caller's layout."""

    hidden: torch.Tensor  # [T, H]
    layout: DocumentLayout
    unpadding: Unpadding | None  # set when the input was padded

    def flatten(self, per_token: torch.Tensor | None) -> torch.Tensor | None:
        """Caller layout ([B, S, ...] or [T, ...]) -> [T, ...]."""
        if per_token is None or self.unpadding is None:
            return per_token
        return self.unpadding.unpad(per_token)

    def restore(self, per_token: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> the caller's layout, zeros at padding."""
        return per_token if self.unpadding is None else self.unpadding.repad(per_token)


class FlexBertModel(nn.Module):
    """The encoder: embeddings, a stack of layers, and a final norm."""

    def __init__(self, config: FlexBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = EMBEDDINGS.get(config.blocks.embeddings)(config)
        layer_factory = LAYER.get(config.blocks.layer)
        self.layers = nn.ModuleList(layer_factory(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = build_norm(config) if config.final_norm else nn.Identity()
        self.rotary = RotaryTables(config.head_dim)

    def attention_contexts(self, layout: DocumentLayout) -> dict[LayerType, AttentionContext]:
        """Masks and rotary tables, built once per batch for each layer type present."""
        config = self.config
        device = layout.doc_ids.device
        prepare = ATTENTION_BACKENDS.get(resolve_backend(config.attn_backend, device))
        scale = config.head_dim**-0.5
        contexts = {}
        for layer_type in sorted({layer.layer_type for layer in self.layers}):
            is_global = layer_type == "global"
            half_window = None if is_global else config.local_half_window
            theta = config.global_rope_theta if is_global else config.local_rope_theta
            cos, sin = self.rotary.lookup(layout.positions, layout.max_seqlen, theta)
            attend = prepare(layout, half_window, scale, causal=config.causal)
            contexts[layer_type] = AttentionContext(attend, cos, sin)
        return contexts

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> EncodedBatch:
        """Run the encoder on either input form:

        * padded: ``input_ids`` [B, S] with ``attention_mask`` [B, S] (1 = real token), unpadded here;
        * unpadded/packed: ``input_ids`` [T] with ``cu_seqlens`` [docs + 1] (and ``max_seqlen``).
        """
        unpadding = None
        if cu_seqlens is None:
            if input_ids.dim() != 2:
                raise ValueError("input_ids must be [B, S] (padded) or [T] with cu_seqlens (unpadded)")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
            unpadding = Unpadding.from_attention_mask(attention_mask)
            layout = unpadding.layout
            input_ids = unpadding.unpad(input_ids)
        else:
            if input_ids.dim() != 1:
                raise ValueError("with cu_seqlens, input_ids must be the flat [T] token stream")
            layout = DocumentLayout.from_cu_seqlens(cu_seqlens, max_seqlen, input_ids.shape[0])
        return EncodedBatch(self(input_ids, layout), layout, unpadding)

    def forward(self, input_ids: torch.Tensor, layout: DocumentLayout) -> torch.Tensor:
        """input_ids: [T] -> hidden states [T, H]"""
        if layout.max_seqlen > self.config.max_position_embeddings:
            raise ValueError(
                f"a document of {layout.max_seqlen} tokens exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        hidden = self.embeddings(input_ids, layout.positions)
        contexts = self.attention_contexts(layout)
        for layer in self.layers:
            hidden = layer(hidden, contexts[layer.layer_type])
        return self.final_norm(hidden)


@dataclass
class MaskedLMOutput:
    loss: torch.Tensor | None
    # [B, S, V] padded input; [T, V] unpadded; [N, V] at labelled tokens if sparse. None where the
    # caller asked for none (``return_logits=False``): the loss is then computed chunk by chunk.
    logits: torch.Tensor | None
    hidden_states: torch.Tensor  # [B, S, H] or [T, H], the encoder output
    predictions: torch.Tensor | None = None  # [N] argmax ids at the labelled tokens, if sparse
    token_losses: torch.Tensor | None = None  # [N] fp32 cross-entropy at the labelled tokens, in evaluation


def finish_building(model: nn.Module, config: FlexBertConfig) -> None:
    """The last step of building any FlexBERT model, its task layers included: initialise every
    parameter with the configured init, then compile the regions the config names."""
    INIT.get(config.blocks.init)(model, config)
    compile_regions(model, config.compile_regions)


class FlexBertForMaskedLM(nn.Module):
    """Encoder + prediction head + vocabulary decoder tied to the token embeddings."""

    def __init__(self, config: FlexBertConfig):
        super().__init__()
        self.config = config
        self.model = FlexBertModel(config)
        self.head = HEAD.get(config.blocks.head)(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        self.decoder.weight = self.model.embeddings.tok_embeddings.weight
        self.loss_fn = LOSS.get(config.blocks.loss)(config)
        finish_building(self, config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        masked_index: torch.Tensor | None = None,
        return_logits: bool | None = None,
    ) -> MaskedLMOutput:
        """Input forms as :meth:`FlexBertModel.encode`; ``labels`` has the shape of ``input_ids``,
        with -100 where there is no target. ``masked_index`` [N] may give the positions in the
        unpadded stream of the labelled tokens: the packed loader finds them on the host, which
        spares the device a sync to find them here.

        Under sparse prediction, the labelled tokens' logits [N, V] are returned when
        ``return_logits`` says so (by default: when no gradient is taken). Otherwise they are never
        held whole: training takes the loss and its gradient chunk by chunk, and evaluation returns
        each token's loss (``token_losses``) and the predicted ids instead."""
        encoded = self.model.encode(input_ids, attention_mask, cu_seqlens, max_seqlen)
        hidden = encoded.hidden  # [T, H]
        labels = encoded.flatten(labels)
        if labels is None or not self.config.sparse_prediction:
            token_logits = self.decoder(self.head(hidden))  # [T, V]
            loss = self.loss_fn(token_logits, labels) if labels is not None else None
            return MaskedLMOutput(loss, encoded.restore(token_logits), encoded.restore(hidden))
        if masked_index is None:
            masked_index = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        targets = labels[masked_index]  # [N]
        predicted = self.head(hidden[masked_index])  # [N, H]
        training = torch.is_grad_enabled()
        if return_logits is None:
            return_logits = not training
        chunked = getattr(self.loss_fn, "from_hidden" if training else "token_losses_from_hidden", None)
        if return_logits or chunked is None:
            logits = self.decoder(predicted)  # [N, V]
            return MaskedLMOutput(self.loss_fn(logits, targets), logits, encoded.restore(hidden), logits.argmax(dim=-1))
        if training:
            loss, predictions = chunked(predicted, self.decoder, targets)
            return MaskedLMOutput(loss, None, encoded.restore(hidden), predictions)
        token_losses, predictions = chunked(predicted, self.decoder, targets)
        loss = token_losses.sum() / max(targets.shape[0], 1)
        return MaskedLMOutput(loss, None, encoded.restore(hidden), predictions, token_losses)

    def set_rope_theta(self, global_theta: float | None = None, local_theta: float | None = None) -> None:
        """Change RoPE thetas (e.g. 160k global for context extension); frequencies follow at once."""
        if global_theta is not None:
            self.config.global_rope_theta = float(global_theta)
        if local_theta is not None:
            self.config.local_rope_theta = float(local_theta)
        self.config.validate()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
