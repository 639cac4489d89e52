"""FlexBERT's masked-language model as a Composer model."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from flexbert.model import FlexBertForMaskedLM, MaskedLMOutput
from flexbert.model.losses import IGNORE_INDEX
from flexbert.train.metrics import MaskedCrossEntropy, MaskedPerplexity, MaskedTokenAccuracy


def flexbert_module(model: torch.nn.Module) -> torch.nn.Module:
    """The FlexBERT model inside what training wraps it in: DistributedDataParallel (``module``),
    torch.compile (``_orig_mod``) and the ComposerModel (``model``). FSDP2 shards a model in place,
    without a wrapper; its parameters are then shards (see :func:`full_weights`)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, ComposerModel):
            model = model.model
        else:
            return model


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's whole state dict, on the CPU. Under FSDP the shards are gathered, a
    collective that every rank must join, and only rank 0 gets them (the others an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module = flexbert_module(model)
    if not any(isinstance(p, DTensor) for p in module.parameters()):
        return {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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
            "LanguageCrossEntropy": MaskedCrossEntropy(),
            "LanguagePerplexity": MaskedPerplexity(),
        }

    def forward(self, batch: dict[str, Any]) -> MaskedLMOutput:
        # Never whole [masked, vocab] logits: chunked loss in training, per-token losses in evaluation.
        return self.model(batch["input_ids"], labels=batch["labels"], cu_seqlens=batch["cu_seqlens"],
                          max_seqlen=batch["max_seqlen"], masked_index=batch["masked_index"], return_logits=False)

    def loss(self, outputs: MaskedLMOutput, batch: dict[str, Any]) -> torch.Tensor:
        return outputs.loss

    def eval_forward(self, batch: dict[str, Any], outputs: MaskedLMOutput | None = None) -> MaskedLMOutput:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: dict[str, Any], outputs: MaskedLMOutput, metric) -> None:
        if not self.model.config.sparse_prediction:  # whole logits [T, V]
            if isinstance(metric, MaskedCrossEntropy):
                labelled = batch["labels"] != IGNORE_INDEX
                metric.update(F.cross_entropy(outputs.logits.float()[labelled], batch["labels"][labelled],
                                              reduction="none"))
            else:
                metric.update(outputs.logits, batch["labels"])
            return
        # Outputs exist only at the labelled tokens: their predicted ids, and in evaluation their losses.
        if isinstance(metric, MaskedCrossEntropy):
            metric.update(outputs.token_losses)
        else:
            metric.update(outputs.predictions, batch["labels"][batch["masked_index"]])
