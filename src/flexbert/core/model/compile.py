"""torch.compile for chosen regions of a model (the config's ``compile_regions``).

Small regions compile once and run fused: the GLU's activation and gate, a norm, the head's
dense-activation-norm chain. The data-dependent parts between them (unpadding, document masks,
varying document counts) stay eager, so nothing there can cause recompiles or graph breaks.
Parameter names are unchanged, so checkpoints and Hugging Face export do not notice.

A block declares the region it belongs to with a class attribute, ``compile_region = "mlp"``; a
plugin block that declares none is never compiled.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch.nn as nn

CompileRegion = Literal["mlp", "norm", "head"]


def compile_regions(model: nn.Module, regions: Iterable[CompileRegion]) -> None:
    """Compile, in place, every submodule that declares one of ``regions`` (outermost first)."""
    regions = set(regions)
    compiled: list[str] = []
    for name, module in model.named_modules():
        inside_compiled = any(name.startswith(prefix + ".") for prefix in compiled)
        if not inside_compiled and getattr(module, "compile_region", None) in regions:
            # The token count changes with every batch: compile for any length from the start.
            module.compile(dynamic=True)
            compiled.append(name)
