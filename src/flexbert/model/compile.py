"""torch.compile for chosen regions of a model (the config's ``compile_regions``).

Small regions compile once and run fused: the GLU's activation and gate, a norm, the head's
dense-activation-norm chain. The data-dependent parts between them (unpadding, document masks,
varying document counts) stay eager, so nothing there can cause recompiles or graph breaks.
Parameter names are unchanged, so checkpoints and Hugging Face export do not notice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch.nn as nn

REGIONS: dict[str, Callable[[str, nn.Module], bool]] = {
    "mlp": lambda name, module: name.rsplit(".", 1)[-1] == "mlp",
    "norm": lambda name, module: isinstance(module, (nn.LayerNorm, nn.RMSNorm)),
    "head": lambda name, module: name == "head",
}


def compile_regions(model: nn.Module, regions: Iterable[str]) -> None:
    """Compile, in place, every submodule that one of ``regions`` names (outermost first)."""
    regions = list(regions)
    compiled: list[str] = []
    for name, module in model.named_modules():
        inside_compiled = any(name.startswith(prefix + ".") for prefix in compiled)
        if not inside_compiled and any(REGIONS[region](name, module) for region in regions):
            # The token count changes with every batch: compile for any length from the start.
            module.compile(dynamic=True)
            compiled.append(name)
