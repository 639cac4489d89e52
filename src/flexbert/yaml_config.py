"""Recipe files: YAML with ``include:`` lists, OmegaConf interpolation and ``key=value`` overrides,
read into plain containers that :func:`flexbert.typed_config.from_dict` then builds configs from.
OmegaConf comes with the training extra; the model side reads resolved ``config.json`` files alone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from flexbert.typed_config import ConfigError


def _yaml_error(path: Path, err: Exception) -> ConfigError:
    """One line naming where the YAML breaks: PyYAML's own message spans four lines."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return ConfigError(str(path), "is not valid YAML: " + " ".join(str(err).split()))
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    opened = f" ({context} that starts at line {context_mark.line + 1})" if context and context_mark else ""
    return ConfigError(
        f"{path}, line {mark.line + 1}, column {mark.column + 1}", f"is not valid YAML: {err.problem}{opened}"
    )


def _load_with_includes(path: Path, seen: tuple[Path, ...] = ()):
    """A YAML file as an OmegaConf node, after merging the files its ``include:`` list names
    (relative to it, in order, each overridden by what follows): recipes share one definition."""
    if not path.is_file():
        raise ConfigError(str(path), "config file not found")
    if path.resolve() in seen:
        raise ConfigError(str(path), "includes itself (through " + " -> ".join(map(str, seen)) + ")")
    try:
        node = OmegaConf.load(path)
    except YAMLError as err:
        raise _yaml_error(path, err) from None
    if not isinstance(node, DictConfig):
        raise ConfigError(str(path), "must hold a mapping of config keys (key: value lines), not a list")
    includes = node.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    parents = [_load_with_includes(path.parent / str(item), (*seen, path.resolve())) for item in includes]
    return OmegaConf.merge(*parents, node) if parents else node


def load_yaml_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A YAML file (with its includes) merged with ``key=value`` dotlist overrides, resolved to
    plain containers."""
    config = _load_with_includes(Path(path))
    for override in overrides:
        if "=" not in override:
            raise ConfigError(override, "overrides are written key=value (for example model.hidden_size=512)")
    try:
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(str(path), f"cannot resolve config: {err}") from None
