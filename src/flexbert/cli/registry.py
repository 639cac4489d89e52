"""``flexbert registry``: every registered block (the core install), and the optimizers and schedules
where the training extra is installed."""

from __future__ import annotations

import argparse

import flexbert.core.model  # noqa: F401  (registers the built-in blocks)
from flexbert.registry import CATALOGUE, import_plugins

try:  # the training extra's registries, where it is installed (the schedules need Composer)
    import flexbert.train.schedulers  # noqa: F401
except ImportError:
    pass
else:
    import flexbert.train.optimizers  # noqa: F401


def _cmd_registry(args: argparse.Namespace) -> int:
    import_plugins(args.plugins, key_path="--plugins")
    for registry in CATALOGUE:
        if args.family and registry.family not in args.family:
            continue
        print(f"{registry.family}: {registry.description}")
        print(f"  factory: {registry.signature}")
        for entry in registry.entries():
            print(f"  - {entry.name:<20} {entry.description}")
    return 0


def _configure_registry(parser: argparse.ArgumentParser) -> None:
    parser.description = "List the registered blocks that a config's model.blocks section can name."
    parser.add_argument("family", nargs="*", help="only these registries (default: all)")
    parser.add_argument(
        "--plugins",
        nargs="+",
        default=[],
        metavar="MODULE",
        help="import these modules first, so their blocks are listed too",
    )
    parser.set_defaults(run=_cmd_registry)


PARSERS = {"registry": _configure_registry}
