import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from flexbert.core.model import FlexBertConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# ModernBERT's tokenizer ships with the project, at the path the recipes name.
TOKENIZER = ROOT / "tokenizers" / "modernbert"
# Real third-party data beside the project (a user's clone has none): only tests of it may skip.
SHARED = ROOT.parent / "shared"
STSB = SHARED / "data" / "glue" / "STS-B"
needs_stsb = pytest.mark.skipif(not STSB.is_dir(), reason=f"needs GLUE STS-B at {STSB} (../shared is absent)")
# The columns of GLUE's STS-B TSVs, for tests that write files in its layout.
STSB_COLUMNS = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()


def tiny_stsb_overrides(run_root: Path) -> list[str]:
    """A fine-tuning recipe on the real STS-B from ../shared, shrunk to a from-scratch model small
    enough to train in seconds on 2 cores."""
    return [
        f"vars.glue={SHARED / 'data' / 'glue'}",
        f"tokenizer={TOKENIZER}",
        f"run_root={run_root}",
        "model.hidden_size=64",
        "model.num_hidden_layers=2",
        "model.num_attention_heads=4",
        "model.intermediate_size=96",
        "model.attn_backend=sdpa",
        "logging.progress_bar=false",
    ]


def tiny_config(**overrides) -> FlexBertConfig:
    """A few-layer model with ModernBERT's structure, small enough for fp32 tests on 2 cores."""
    values = dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=1024,
        local_attention=16,
        pad_token_id=0,
        cls_token_id=1,
        sep_token_id=2,
        attn_backend="sdpa",
    )
    values.update(overrides)
    return FlexBertConfig.from_dict(values)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
