"""`recap export`: the current captions as subtitle and data files a player or a script reads.

vtt     <video>.vtt: the clip captions as cues, the summary in a NOTE block at the top;
        <video>.chapters.vtt: the segment descriptions as cues, for a `<track kind="chapters">`
srt     <video>.srt: the clip captions as cues. SRT has no comments and no chapters: the summary and the
        segments are left out rather than shown as a subtitle over the whole video (the .vtt and .jsonl keep them)
jsonl   <video>.jsonl: every caption row, summary first, then each segment followed by its clips, each with its
        parent window: a clip's segment (the one holding the clip's start), a segment's video

Files go to exports/<format>/ in the store (or another folder), through the store's atomic writes; the same
captions give the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

from recap.reader import StoreReader
from store import CAPTION_SCHEMA, LEVELS, Store

FORMATS = ("vtt", "srt", "jsonl")


@dataclass
class Exported:
    files: list[str] = field(default_factory=list)     # written, store- or folder-relative
    skipped: list[str] = field(default_factory=list)   # videos without any current caption


def timestamp(seconds: float, sep: str = ".") -> str:
    """HH:MM:SS.mmm (WebVTT) or HH:MM:SS,mmm (SRT, sep=",")."""
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def _one_line(text) -> str:
    """Cue text on one line: a blank line would end the cue, and "-->" would read as a timing line."""
    return " ".join(str(text or "").split()).replace("-->", "->")


def _vtt_text(text) -> str:
    # WebVTT cue text has tags (<b>) and character references (&amp;): escape what would read as either.
    return _one_line(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def vtt(clips: pd.DataFrame, summary: pd.DataFrame) -> str:
    blocks = ["WEBVTT"]
    if len(summary):
        blocks.append("NOTE summary\n" + _one_line(summary["text"].iloc[0]))
    blocks += _cues(clips, ".", _vtt_text)
    return "\n\n".join(blocks) + "\n"


def chapters(segments: pd.DataFrame) -> str:
    return "\n\n".join(["WEBVTT", *_cues(segments, ".", _vtt_text)]) + "\n"


def srt(clips: pd.DataFrame) -> str:
    return "\n\n".join(_cues(clips, ",", _one_line)) + "\n" if len(clips) else ""


def _cues(rows: pd.DataFrame, sep: str, clean) -> list[str]:
    return [f"{i}\n{timestamp(r.start_s, sep)} --> {timestamp(r.end_s, sep)}\n{clean(r.text)}"
            for i, r in enumerate(rows.itertuples(), 1)]


def jsonl(video_id: str, duration_s: float, rows: dict[str, pd.DataFrame]) -> str:
    segments, clips = list(rows["segment"].itertuples()), list(rows["clip"].itertuples())
    # each clip's segment: the one whose window [start, end) holds the clip's start (-1: none described yet)
    owner = [next((i for i, s in enumerate(segments) if s.start_s <= c.start_s < s.end_s), -1) for c in clips]

    def line(r, parent=(None, None, None)) -> str:
        return json.dumps({"video_id": video_id, "level": r.level, "start_s": float(r.start_s),
                           "end_s": float(r.end_s), "text": r.text, "version": r.version, "parent_level": parent[0],
                           "parent_start_s": parent[1], "parent_end_s": parent[2]}, ensure_ascii=False) + "\n"

    lines = [line(r) for r in rows["video"].itertuples()] + [line(c) for c, o in zip(clips, owner) if o < 0]
    for i, seg in enumerate(segments):
        lines.append(line(seg, ("video", 0.0, float(duration_s))))
        lines += [line(c, ("segment", float(seg.start_s), float(seg.end_s))) for c, o in zip(clips, owner) if o == i]
    return "".join(lines)


def current_rows(reader: StoreReader, level: str, video_id: str) -> pd.DataFrame:
    """A video's current captions at a level; empty where the level has no current version."""
    try:
        return reader.captions(level, video_id).reset_index(drop=True)
    except FileNotFoundError:
        return pd.DataFrame(columns=CAPTION_SCHEMA.names)


def export(reader: StoreReader, fmt: str, video_id: str | None = None, out: str | None = None) -> Exported:
    """Write `fmt` files for one video or every readable one with captions; ValueError for an unknown format
    or video, or a video without any current caption."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    videos = reader.videos
    videos = videos[videos["status"] == "ok"]
    if video_id is not None:
        videos = videos[videos["video_id"] == video_id]
        if videos.empty:
            raise ValueError(f"{reader.store.url('videos.parquet')}: no readable video {video_id!r} "
                             "(see `recap status`)")
    target, folder = (reader.store, f"exports/{fmt}") if out is None else (Store(out), "")
    done = Exported()
    for video in videos.itertuples():
        rows = {level: current_rows(reader, level, video.video_id) for level in LEVELS}
        if not any(len(r) for r in rows.values()):
            done.skipped.append(video.video_id)
            continue
        if fmt == "vtt":
            files = {".vtt": vtt(rows["clip"], rows["video"]), ".chapters.vtt": chapters(rows["segment"])}
        elif fmt == "srt":
            files = {".srt": srt(rows["clip"])}
        else:
            files = {".jsonl": jsonl(video.video_id, video.duration_s, rows)}
        for suffix, text in files.items():
            rel = f"{folder}/{video.video_id}{suffix}".lstrip("/")
            target.write_bytes(rel, text.encode())
            done.files.append(rel)
    if video_id is not None and done.skipped:
        raise ValueError(f"{reader.store.url('current')}: no current captions of {video_id} yet; run `recap captions`")
    return done
