"""Masked-language-modelling objectives."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexbert.core.model.config import FlexBertConfig
from flexbert.core.model.registries import LOSS

# The label of a token with no target: not masked, or padding. The data pipeline writes it too.
IGNORE_INDEX = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, a chunk of tokens at
    a time, with the gradients computed during the forward pass.

    Materialising the logits [N, V] and then their gradient costs two N x V buffers and four passes
    over them (log-softmax, its backward, the loss's zero-filled gradient, a bias broadcast); here one
    chunk-sized buffer is reused: logits, then softmax in place, then minus the one-hot targets,
    which is the gradient that the two matmuls of the backward pass consume right away.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens):
        # hidden [N, H], weight [V, H], bias [V] or None, targets [N]
        device_type = hidden.device.type
        # Devices without autocast (meta, which tests use to stand in for a GPU) compute as given.
        has_autocast = torch.amp.is_autocast_available(device_type)
        autocast = has_autocast and torch.is_autocast_enabled(device_type)
        compute_dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
        with torch.autocast(device_type, enabled=False) if has_autocast else contextlib.nullcontext():
            h_all, w = hidden.to(compute_dtype), weight.to(compute_dtype)
            num_targets = targets.shape[0]
            grad_hidden = torch.empty_like(h_all)
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
            grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            predictions = torch.empty_like(targets)
            for start in range(0, num_targets, chunk_tokens):
                end = min(start + chunk_tokens, num_targets)
                h, t = h_all[start:end], targets[start:end, None]
                logits = (h @ w.T).float()  # [n, V]
                if bias is not None:
                    logits += bias
                predictions[start:end] = logits.argmax(dim=-1)
                log_normaliser = logits.logsumexp(dim=-1, keepdim=True)  # [n, 1]
                loss += (log_normaliser - logits.gather(1, t)).sum()
                grad_logits = logits.sub_(log_normaliser).exp_()  # softmax
                grad_logits.scatter_add_(1, t, torch.full_like(t, -1.0, dtype=grad_logits.dtype))
                grad_logits = grad_logits.div_(num_targets).to(compute_dtype)
                grad_hidden[start:end] = grad_logits @ w
                if compute_dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.T, h)
                else:
                    grad_weight += (grad_logits.T @ h).float()
                grad_bias += grad_logits.sum(dim=0, dtype=torch.float32)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype), grad_bias)
        ctx.mark_non_differentiable(predictions)
        return loss / num_targets, predictions

    @staticmethod
    def backward(ctx, grad_loss, grad_predictions):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype),
            grad_weight * grad_loss.to(grad_weight.dtype),
            grad_bias * grad_loss if ctx.has_bias else None,
            None,
            None,
        )


@LOSS.register("cross_entropy")
class MaskedCrossEntropy(nn.Module):
    """Mean cross-entropy over positions whose label is not -100."""

    def __init__(self, config: FlexBertConfig):
        super().__init__()
        self.chunk_tokens = config.loss_chunk_tokens

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)

    def from_hidden(
        self, hidden: torch.Tensor, decoder: nn.Linear, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of ``decoder(hidden)`` against ``targets`` (all real labels) without holding the
        logits whole, for training; returns (loss, predicted ids [N])."""
        if targets.shape[0] == 0:
            return hidden.sum() * 0.0, targets
        return _ChunkedLinearCrossEntropy.apply(hidden, decoder.weight, decoder.bias, targets, self.chunk_tokens)

    @torch.no_grad()
    def token_losses_from_hidden(
        self, hidden: torch.Tensor, decoder: nn.Linear, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation's counterpart of :meth:`from_hidden`: each target's cross-entropy (fp32) and
        the predicted ids, [N] each, a chunk of tokens at a time. At a recipe's microbatch (14.7k
        masked tokens at 15%) whole logits would take 3 GB in fp32."""
        losses = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        predictions = torch.empty_like(targets)
        for start in range(0, targets.shape[0], self.chunk_tokens):
            end = start + self.chunk_tokens
            logits = decoder(hidden[start:end]).float()  # [n, V]
            losses[start:end] = F.cross_entropy(logits, targets[start:end], reduction="none")
            predictions[start:end] = logits.argmax(dim=-1)
        return losses, predictions
