"""FlexBERT's masked-language model as a Composer model."""

from __future__ import annotations

from typing import Any

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel

from flexbert.model import FlexBertForMaskedLM, MaskedLMOutput
from flexbert.model.losses import IGNORE_INDEX
from flexbert.train.metrics import MaskedTokenAccuracy


class ComposerMLM(ComposerModel):
    """Batches are the packed loader's dicts; the loss is the mean over masked tokens only.

    Gradient accumulation weighs microbatches by their masked-token counts (the trainer runs with
    ``accumulate_train_batch_on_tokens``), so a step's loss is the mean over every masked token of
    the global batch, whatever the microbatch split or world size.
    """

    def __init__(self, model: FlexBertForMaskedLM):
        super().__init__()
        self.model = model
        self.train_metrics = {"MaskedAccuracy": MaskedTokenAccuracy(ignore_index=IGNORE_INDEX)}
        self.eval_metrics = {
            "MaskedAccuracy": MaskedTokenAccuracy(ignore_index=IGNORE_INDEX),
            "LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
            "LanguagePerplexity": LanguagePerplexity(ignore_index=IGNORE_INDEX),
        }

    def forward(self, batch: dict[str, Any]) -> MaskedLMOutput:
        return self.model(batch["input_ids"], labels=batch["labels"], cu_seqlens=batch["cu_seqlens"],
                          max_seqlen=batch["max_seqlen"], masked_index=batch["masked_index"])

    def loss(self, outputs: MaskedLMOutput, batch: dict[str, Any]) -> torch.Tensor:
        return outputs.loss

    def eval_forward(self, batch: dict[str, Any], outputs: MaskedLMOutput | None = None) -> MaskedLMOutput:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: dict[str, Any], outputs: MaskedLMOutput, metric) -> None:
        if not self.model.config.sparse_prediction:
            metric.update(outputs.logits, batch["labels"])
            return
        targets = batch["labels"][batch["masked_index"]]  # outputs exist only at masked tokens
        # Training computes no whole logits (see MaskedLMOutput); accuracy needs only the argmax.
        metric.update(outputs.predictions if isinstance(metric, MaskedTokenAccuracy) else outputs.logits, targets)
