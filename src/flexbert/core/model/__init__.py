"""The FlexBERT encoder. Depends only on torch.

Importing this package registers every built-in block (see ``flexbert registry``).
"""

from flexbert.core.model import attention, backends, blocks, init, losses  # noqa: F401  (for their registrations)
from flexbert.core.model.classification import (
    FlexBertForSentenceEmbedding,
    FlexBertForSequenceClassification,
    FlexBertForTokenClassification,
)
from flexbert.core.model.config import PRESETS, BlocksConfig, FlexBertConfig
from flexbert.core.model.layout import DocumentLayout
from flexbert.core.model.model import FlexBertForMaskedLM, FlexBertModel, MaskedLMOutput, Unpadding

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
