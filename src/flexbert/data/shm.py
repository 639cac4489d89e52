"""Removing shared memory that a crashed streaming run left behind.

mosaicml-streaming coordinates ranks and workers through named shared-memory segments
(``/dev/shm/000015_locals`` ...). A run killed together with Python's resource tracker (SIGKILL of
the process group, an OOM kill, a node reset) leaves them behind. streaming's own cleaner unlinks
every segment it finds, including those of live runs on the same machine, and stops at the first
gap in the numbering; instead we remove exactly the segments that no live process has mapped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from streaming.base.constant import SHM_TO_CLEAN

SHM_DIR = Path("/dev/shm")
_STREAMING_SEGMENT = re.compile(r"\d{6}_(?:" + "|".join(re.escape(name) for name in SHM_TO_CLEAN) + ")")


def _mapped_segments() -> set[str]:
    """Names of /dev/shm files that some process we can inspect has mapped."""
    mapped = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    if "/dev/shm/" in line:
                        mapped.add(line.rsplit("/dev/shm/", 1)[1].split()[0])
        except OSError:  # the process exited, or is not ours to read
            continue
    return mapped


def clean_stale_streaming_memory() -> list[str]:
    """Unlink streaming's segments owned by us that no live process maps; return their names."""
    if not SHM_DIR.is_dir() or not Path("/proc/self/maps").exists():
        return []  # not Linux: streaming's resource tracker is all we have
    candidates = [
        entry
        for entry in SHM_DIR.iterdir()
        if _STREAMING_SEGMENT.fullmatch(entry.name) and entry.stat().st_uid == os.getuid()
    ]
    if not candidates:
        return []
    mapped = _mapped_segments()
    removed = []
    for entry in candidates:
        if entry.name not in mapped:
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed
