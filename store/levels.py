"""The caption hierarchy, in one place: each level, the level below it, the stage that writes its captions,
its official training epochs, and where its checkpoints live in the store (captions: store.tables)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Level:
    name: str
    lower: str | None  # the level whose captions it reads (recursive models)
    stage: str         # the stage, and CLI command, that writes its captions
    epochs: int        # official training epochs (Video ReCap: clip 5, then segment and video 10 each)


LEVEL = {level.name: level for level in (
    Level("clip", None, "captions", 5),
    Level("segment", "clip", "segments", 10),
    Level("video", "segment", "summaries", 10),
)}
LEVELS = tuple(LEVEL)


def check_level(level: str) -> str:
    if level not in LEVEL:
        raise ValueError(f"unknown caption level {level!r}; expected one of {', '.join(LEVELS)}")
    return level


def checkpoints_dir(level: str) -> str:
    """Training runs of a level: checkpoints/<level>/<run>/epoch-NNNN/ ("unified" is ReCap-U's)."""
    return f"checkpoints/{level}"


def latest_checkpoint(store, level: str) -> str | None:
    """The checkpoint `recap train` last finished for `level` (absolute), or None."""
    pointer = store.read_json(f"{checkpoints_dir(level)}/latest.json")
    if not pointer:
        return None
    path = pointer["path"]
    return path if Path(path).is_absolute() else store.abs(path)


def record_latest(store, level: str, path: str) -> None:
    """Make `path` (store-relative, so a moved store still finds it) the level's default checkpoint."""
    store.write_json(f"{checkpoints_dir(level)}/latest.json", {"path": path})
