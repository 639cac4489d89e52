"""The package's layout is its architecture (ARCHITECTURE.md): read from the source, every import
counted, wherever it is written.

- ``flexbert.core`` (the core install) imports nothing of ``data``, ``train`` or ``cli``, and none
  of the training extra's packages unless as an optional dependency that it goes on without;
  ``data`` imports nothing of ``train`` or ``cli``; ``train`` nothing of ``cli``.
- No import cycle between modules, counting imports inside functions, under ``TYPE_CHECKING`` and of
  a package's ``__init__``.
- flexbert's modules import one another at the top; only the command-line dispatcher defers loading,
  through importlib. A third-party import inside a function is one of a few, each for a stated reason.
- Beside the layers' folders sit only the shared foundation modules.
"""

import ast
from collections import defaultdict
from pathlib import Path

from conftest import ROOT

SOURCE = ROOT / "src"
LAYERS = ("core", "data", "train", "cli")  # each may import only those before it
FOUNDATION = {"errors", "registry", "typed_config", "yaml_config"}  # flexbert/<name>.py, shared by all layers
TRAINING_PACKAGES = {"composer", "streaming", "omegaconf", "wandb", "torchmetrics", "matplotlib", "yaml"}
# Third-party imports made where used, and why: each is slow to import or needed by one rare path.
DEFERRED = {
    ("flexbert.core.sources", "datasets"),  # seconds to import; only saved datasets need it
    ("flexbert.data.labeled", "datasets"),  # likewise
    ("flexbert.data.convert", "boto3"),  # only s3:// outputs
    ("flexbert.data.convert", "botocore"),
    ("flexbert.core.object_storage", "boto3"),  # only s3:// checkpoints, and optional on the core install
    ("flexbert.core.object_storage", "botocore"),
    ("flexbert.data.convert", "streaming"),  # loads torch and transformers: argument errors come first
    ("flexbert.train.loggers", "wandb"),  # only runs that log to Weights & Biases
    ("flexbert.train.optimizers", "composer"),  # StableAdamW also serves the GPU check, without Composer
    ("flexbert.core.model.backends.flash", "flash_attn"),  # the gpu extra's kernels, loaded when called
    ("flexbert.core.model.backends.flash3", "flash_attn_interface"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in (SOURCE / "flexbert").rglob("*.py")}


def imports(module: str) -> list[tuple[str, str]]:
    """(imported module, where) for every import in ``module``: ``top``, ``optional`` (in a ``try`` at
    the top, which goes on without it) or ``deferred`` (inside a function or a block)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    where = {id(node): "top" for node in tree.body}
    for statement in tree.body:
        if isinstance(statement, ast.Try):
            where |= {id(node): "optional" for node in statement.body}
            where |= {id(node): "optional" for handler in statement.handlers for node in handler.body}
            where |= {id(node): "optional" for node in statement.orelse}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            # ``from package import name``: name may be a module of the package, else the package
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found += [(name, where.get(id(node), "deferred")) for name in names]
    return found


def flexbert_module(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else "flexbert"


def graph() -> dict[str, set[str]]:
    edges = defaultdict(set)
    for module in MODULES:
        for name, _ in imports(module):
            target = flexbert_module(name) if name.startswith("flexbert") else None
            if target and target != module:
                edges[module].add(target)
    return edges


def test_layers_import_only_the_layers_below_them():
    wrong = []
    for module in MODULES:
        for name, placed in imports(module):
            if name.startswith("flexbert."):
                source, target = layer(module), layer(flexbert_module(name))
                below = LAYERS[: LAYERS.index(source)] if source in LAYERS else ()
                if target in LAYERS and target != source and target not in below:
                    wrong.append(f"{module} imports {name}")
            elif layer(module) == "core" and name.split(".")[0] in TRAINING_PACKAGES and placed != "optional":
                wrong.append(f"{module} (core) imports {name}, a training package")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    edges, cycles = graph(), []
    state: dict[str, str] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_imports_are_written_at_the_top():
    hidden = []
    for module in MODULES:
        for name, placed in imports(module):
            if placed != "deferred" or name == "__future__":
                continue
            if name.startswith("flexbert") or (module, name.split(".")[0]) not in DEFERRED:
                hidden.append(f"{module} imports {name} inside a function or block")
    assert not hidden, "\n".join(hidden)


def test_only_the_foundation_sits_beside_the_layers():
    beside = {path.stem for path in (SOURCE / "flexbert").glob("*.py")} - {"__init__"}
    folders = {path.name for path in (SOURCE / "flexbert").iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert beside == FOUNDATION
    assert folders == set(LAYERS)


def test_the_analysis_sees_imports_inside_functions():
    """The checks above read every import: one in a function body is found, and marked as such."""
    found = imports("flexbert.data.convert")
    assert ("boto3", "deferred") in found and ("flexbert.core.sources", "top") in found
    assert ("streaming.base.format.mds.reader", "optional") in imports("flexbert.core.encode")
