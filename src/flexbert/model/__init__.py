"""The FlexBERT encoder. Depends only on torch.

Importing this package registers every built-in block (see ``flexbert registry``).
"""

from flexbert.model import (  # noqa: F401  (imported for their registrations)
    attention,
    backends,
    embeddings,
    heads,
    init,
    layers,
    losses,
    mlp,
    norms,
)
from flexbert.model.config import PRESETS, BlocksConfig, FlexBertConfig
from flexbert.model.layout import DocumentLayout, Unpadding
from flexbert.model.model import FlexBertForMaskedLM, FlexBertModel, MaskedLMOutput
from flexbert.model.classification import (
    FlexBertForSentenceEmbedding,
    FlexBertForSequenceClassification,
    FlexBertForTokenClassification,
)

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
