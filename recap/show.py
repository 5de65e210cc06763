"""`recap show`: one video's captions on a timeline, or the three that cover one moment."""

from __future__ import annotations

import re

import pandas as pd

from recap.reader import StoreReader
from store import CAPTION_SCHEMA, LEVEL

LABEL = {"video": "summary", "segment": "segment", "clip": "clip"}
NONE = {"video": "no summary", "segment": "no segment descriptions", "clip": "no clip captions"}


def clock(seconds: float) -> str:
    """mm:ss, or h:mm:ss from an hour on."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def parse_moment(text: str) -> float:
    """Seconds from mm:ss, h:mm:ss or plain seconds; ValueError naming the text otherwise."""
    if not re.fullmatch(r"\d+(\.\d+)?|(\d+:)?\d+:[0-5]\d(\.\d+)?", text.strip()):
        raise ValueError(f"--at {text!r}: expected mm:ss, h:mm:ss or seconds")
    seconds = 0.0
    for part in text.strip().split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def show_lines(reader: StoreReader, video_id: str, at: float | None = None) -> list[str]:
    """The video's summary, then its segments each followed by its clips; with `at`, only the summary, segment
    and clip whose windows hold that moment. ValueError for a video the store does not know, or a moment past
    its end."""
    videos = reader.videos
    row = videos[videos["video_id"] == video_id]
    if row.empty:
        raise ValueError(f"{reader.store.url('videos.parquet')}: no video {video_id!r} (see `recap status`)")
    if row["status"].iloc[0] != "ok":
        raise ValueError(f"{reader.store.url('videos.parquet')}: {video_id} could not be read at ingest "
                         f"({row['error'].iloc[0]})")
    duration = float(row["duration_s"].iloc[0] or 0.0)
    if at is not None and not 0 <= at <= duration:
        raise ValueError(f"--at {clock(at)}: outside {video_id} (00:00-{clock(duration)})")
    rows = {level: _rows(reader, level, video_id) for level in ("video", "segment", "clip")}
    versions = ", ".join(str(rows[level]["version"].iloc[0]) for level in rows if len(rows[level]))
    lines = [f"{video_id}  {clock(duration)}" + (f"  ({versions})" if versions else "")]
    if at is not None:
        lines[0] += f"  at {clock(at)}"
        for level, frame in rows.items():
            hit = _covering(frame, at)
            lines.append(_line(level, hit, nested=False) if hit is not None
                         else f"{LABEL[level]:<8} ({NONE[level]} at {clock(at)})")
        return lines
    lines += [_line("video", r) for _, r in rows["video"].iterrows()] or [_missing("video")]
    parts = [rows[level].assign(rank=rank) for rank, level in enumerate(("segment", "clip")) if len(rows[level])]
    if parts:  # segments, each followed by the clips that start inside it
        timeline = pd.concat(parts, ignore_index=True).sort_values(["start_s", "rank", "end_s"], kind="stable")
        lines += [_line(r["level"], r) for _, r in timeline.iterrows()]
    return lines + [_missing(level) for level in ("segment", "clip") if rows[level].empty]


def _rows(reader: StoreReader, level: str, video_id: str) -> pd.DataFrame:
    try:
        return reader.captions(level, video_id)
    except FileNotFoundError:  # no current version of this level: nothing to show at it
        return pd.DataFrame(columns=CAPTION_SCHEMA.names)


def _covering(frame: pd.DataFrame, at: float):
    """The row whose window [start, end) holds `at`; the video's last moment is in the last window."""
    start, end = frame["start_s"], frame["end_s"]
    hits = frame[(start <= at) & ((at < end) | ((at == end) & (end == end.max())))]
    return None if hits.empty else hits.iloc[0]


def _line(level: str, row, nested: bool = True) -> str:
    indent = "  " if nested and level == "clip" else ""
    span = f"{clock(row['start_s'])}–{clock(row['end_s'])}"
    return f"{indent}{LABEL[level]:<{8 - len(indent)}} {span}  {' '.join(row['text'].split()) if isinstance(row['text'], str) else ''}"


def _missing(level: str) -> str:
    return f"{LABEL[level]:<8} ({NONE[level]}: run `recap {LEVEL[level].stage}`)"
