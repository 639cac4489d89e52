"""BERT-style masked-language-model corruption, reproducible per sample."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MaskingConfig:
    mlm_probability: float = 0.30  # ModernBERT pretrains at 30% (and evaluates at 15%)
    mask_fraction: float = 0.8  # of selected tokens, replaced by [MASK]
    random_fraction: float = 0.1  # replaced by a random regular token; the rest stay unchanged
    seed: int = 0

    def validate(self, path: str = "masking") -> None:
        from flexbert.typed_config import ConfigError

        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"{path}.mlm_probability", f"must be in (0, 1), got {self.mlm_probability}")
        if self.mask_fraction < 0 or self.random_fraction < 0 or self.mask_fraction + self.random_fraction > 1:
            raise ConfigError(
                f"{path}.mask_fraction",
                f"mask_fraction={self.mask_fraction} and random_fraction={self.random_fraction} must be "
                "non-negative and sum to at most 1",
            )
        if self.seed < 0:
            raise ConfigError(f"{path}.seed", f"must be non-negative, got {self.seed}")


class Masker:
    """Selects each non-special token with probability p; of those, 80% -> [MASK], 10% -> random,
    10% kept. The random draws are seeded by (seed, identity), so a sample's masking depends only on
    which sample it is, not on worker count, batch order or resumption."""

    def __init__(self, config: MaskingConfig, mask_id: int, special: np.ndarray):
        self.config = config
        self.mask_id = mask_id
        self.special = special  # bool [vocab_size]
        self.regular_ids = np.flatnonzero(~special)

    def __call__(self, tokens: np.ndarray, identity: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """tokens: int64 [n] -> (corrupted input ids [n], labels [n] with -100 where not selected)."""
        rng = np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence([self.config.seed, *identity])))
        selected = (rng.random(tokens.shape[0]) < self.config.mlm_probability) & ~self.special[tokens]
        labels = np.where(selected, tokens, IGNORE_INDEX)
        action = rng.random(tokens.shape[0])
        to_mask = selected & (action < self.config.mask_fraction)
        to_random = selected & (action >= self.config.mask_fraction) & (
            action < self.config.mask_fraction + self.config.random_fraction
        )
        corrupted = tokens.copy()
        corrupted[to_mask] = self.mask_id
        corrupted[to_random] = rng.choice(self.regular_ids, size=int(to_random.sum()))
        return corrupted, labels
