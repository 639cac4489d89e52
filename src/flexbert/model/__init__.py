"""The FlexBERT encoder. Depends only on torch.

Importing this package registers every built-in block (see ``flexbert registry``).
"""

from flexbert.model import attention, backends, blocks, init, losses  # noqa: F401  (for their registrations)
from flexbert.model.backends import DocumentLayout
from flexbert.model.classification import (
    FlexBertForSentenceEmbedding,
    FlexBertForSequenceClassification,
    FlexBertForTokenClassification,
)
from flexbert.model.config import PRESETS, BlocksConfig, FlexBertConfig
from flexbert.model.model import FlexBertForMaskedLM, FlexBertModel, MaskedLMOutput, Unpadding

__all__ = [
    "PRESETS",
    "BlocksConfig",
    "DocumentLayout",
    "FlexBertConfig",
    "FlexBertForMaskedLM",
    "FlexBertForSentenceEmbedding",
    "FlexBertForSequenceClassification",
    "FlexBertForTokenClassification",
    "FlexBertModel",
    "MaskedLMOutput",
    "Unpadding",
]
