"""Which checkpoint autoresume loads: the newest intact one in the save folder.

Composer's autoresume loads whatever ``latest-rank0.pt`` points to. A run killed while writing a
checkpoint, or a disk that damaged one, would then crash the resumed run at load time. (A run
killed between writing a checkpoint and pointing the link at it, or before its first link, would
restart from scratch and then refuse the folder's newer files.) So, before the trainer exists, rank 0
checks the newest checkpoint file: a damaged one is moved aside to ``<name>.corrupt`` with a warning
naming it, and so on back to the newest intact one, which the link is pointed at. The other ranks
wait, then Composer broadcasts rank 0's choice, so every rank resumes from the same checkpoint. A
folder holding checkpoints none of which is intact stops the run with one line naming them all.

Only local folders of whole-file checkpoints are checked; a remote ``save_folder`` or sharded
(FSDP) checkpoints are left to Composer.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

from composer.utils import dist

from flexbert.typed_config import ConfigError

LATEST_LINK = "latest-rank0.pt"
# Composer's default checkpoint name, ep{epoch}-ba{batch}-rank{rank}.pt; rank 0 writes the file.
CHECKPOINT_NAME = re.compile(r"ep(\d+)-ba(\d+)-rank0\.pt")


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None if it is. ``torch.save`` writes a zip
    archive with a CRC per record: truncation loses the archive's directory, and damage anywhere
    fails a CRC (which ``torch.load`` does not check)."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        return f"not a complete checkpoint ({err})"
    if damaged is not None:
        return f"damaged: {damaged} fails its CRC check"
    if not any(name.endswith("data.pkl") for name in names):
        return "not a torch checkpoint (no data.pkl)"
    return None


def _checkpoints_newest_first(folder: Path) -> list[Path]:
    found = [(int(match[2]), path) for path in folder.iterdir()
             if (match := CHECKPOINT_NAME.fullmatch(path.name)) and path.is_file() and not path.is_symlink()]
    return [path for _, path in sorted(found, reverse=True)]


def choose_resume_checkpoint(folder: Path) -> Path | None:
    """Rank 0's part: set aside damaged newest checkpoints, point the latest link at the newest intact
    one and return it; None for a folder without checkpoints (a fresh start). A folder whose every
    checkpoint is damaged raises, leaving them in place: starting over would silently throw the run
    away."""
    link = folder / LATEST_LINK
    if link.is_symlink() and link.resolve().is_dir():
        return None  # sharded checkpoints
    candidates = _checkpoints_newest_first(folder) if folder.is_dir() else []
    if not candidates:
        return None
    problems = {}
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            break
        problems[path] = problem
    else:
        tried = "; ".join(f"{path.name} is {problem}" for path, problem in problems.items())
        raise ConfigError("autoresume", f"no intact checkpoint to resume from in {folder}: {tried}. Repair or move "
                          "them away to start over, or set load_path to another checkpoint")
    chosen = path
    for damaged, problem in problems.items():
        os.replace(damaged, damaged.with_name(damaged.name + ".corrupt"))
        warnings.warn(f"autoresume: checkpoint {damaged} is {problem}; moved it to {damaged.name}.corrupt, "
                      f"resuming from {chosen.name}")
    if not (link.is_symlink() and os.readlink(link) == chosen.name):
        if link.is_symlink() and not problems:
            warnings.warn(f"autoresume: {link} points at {os.readlink(link)}, but the newer {chosen} is intact "
                          "(a run killed before it updated the link?); resuming from the newer one")
        temporary = folder / f".{LATEST_LINK}.tmp"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(chosen.name)
        os.replace(temporary, link)  # atomic: a kill now leaves the old link or the new one
    return chosen


def prepare_autoresume(save_folder: str) -> None:
    """On every rank, before the trainer is built: rank 0 chooses, the others wait for it."""
    if "://" not in save_folder:
        check_on_rank_zero(lambda: choose_resume_checkpoint(Path(save_folder)))


def check_on_rank_zero(check: Callable[[], object]) -> None:
    """Run ``check`` on rank 0 alone, and raise the ConfigError it raised on every rank: a check only
    rank 0 makes must not leave the other ranks waiting for it until the timeout."""
    error = None
    if dist.get_global_rank() == 0:
        try:
            check()
        except ConfigError as err:
            error = err
    if dist.get_world_size() > 1:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise error
