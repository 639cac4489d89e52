"""Writing an output directory all at once: an interrupted job leaves the old state, never half a new one."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flexbert.errors import FlexBertError


class OutputExistsError(FlexBertError, ValueError):
    """The output path already holds something and overwriting was not asked for."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging directory that replaces ``path`` when the block finishes without error.

    The staging directory is a hidden sibling of ``path``, so the final rename stays on one file
    system and is atomic. If the block raises (or is interrupted), the staging directory is deleted
    and ``path`` is untouched. An existing empty directory is replaced silently; anything else only
    with ``overwrite``.
    """
    path = Path(path)
    occupied = path.exists() and not (path.is_dir() and not any(path.iterdir()))
    if occupied and not overwrite:
        raise OutputExistsError(f"output {path} already exists and is not empty; use --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = path.parent / f".{path.name}.staging-{token}"
    # mkdir (not tempfile.mkdtemp) so the directory gets the user's usual permissions, not 0700.
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists() or path.is_symlink():
        # A directory cannot be renamed onto a non-empty one, so the old output steps aside first;
        # the window in which neither exists is two renames long.
        retired = path.parent / f".{path.name}.retired-{token}"
        path.rename(retired)
        staging.rename(path)
        _remove(retired)
    else:
        staging.rename(path)
