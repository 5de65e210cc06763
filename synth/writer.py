"""Writes a corpus to disk: H.264 files and the ground truth, both in the
Ego4D-HCap layout (pickles and JSON per split) and as Parquet tables, which
also hold the facts behind every caption (`synth.facts`); the retrieval
queries (`synth.queries`), a Parquet table in the same schema; and the
reordered and composed summaries of training segments, that schema plus their parts."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Iterable

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synth.facts import facts_of_clip, facts_of_segment, facts_of_video
from synth.presets import SPLITS
from synth.queries import plan_queries
from synth.world import ComposedSummary, Session

GROUNDTRUTH_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("split", pa.string()), ("level", pa.string()),
    ("start_s", pa.float64()), ("end_s", pa.float64()), ("text", pa.string()),
    ("facts", pa.string()),  # JSON: what the caption states (synth.facts)
])
QUERIES_FILE = "queries.parquet"  # under groundtruth/, next to the level tables
# Summaries of training segments told in orders no video has: a video's segments in another order
# (synth.world.ReorderedSummary) and segments of several videos of one place (ComposedSummary). The ground-truth
# schema plus `parts`, JSON of the [video, start, end] of each segment in the order told; `video_id` is the
# first part's video, [start_s, end_s] its whole video for a reordered summary, [0, the parts' length] else.
REORDERED_FILE = "reordered.parquet"
REORDERED_SCHEMA = GROUNDTRUTH_SCHEMA.append(pa.field("parts", pa.string()))


def write_mp4(path: Path, frames: Iterable[np.ndarray], width: int, height: int, fps: int, gop: int) -> None:
    """Byte-for-byte reproducible: one encoder thread, fixed GOP, no B-frames,
    no wall-clock metadata. Written under a temporary name, then renamed."""
    partial = path.with_name(path.name + ".partial")
    with av.open(str(partial), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={
            "preset": "veryfast", "crf": "18", "threads": "1", "bf": "0", "g": str(gop)})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    os.replace(partial, path)


def write_groundtruth(out: Path, sessions: list[Session]) -> None:
    for split in SPLITS:
        chosen = [s for s in sessions if s.split == split]
        _atomic_write(out / f"clips_{split}.pkl", pickle.dumps(
            [(s.vid, c.start_s, c.end_s, c.caption) for s in chosen for c in s.clips], protocol=5))
        _atomic_write(out / f"segments_{split}.pkl", pickle.dumps([
            {"vid": s.vid, "sid": j, "start_sec": g.start_s, "end_sec": g.end_s,
             "captions_gt": [c.caption for c in g.clips], "segment_description": g.description}
            for s in chosen for j, g in enumerate(s.segments)], protocol=5))
        _atomic_write(out / f"videos_{split}.json", json.dumps([
            {"vid": s.vid, "start_sec": 0.0, "end_sec": s.duration_s,
             "segment_descriptions": [g.description for g in s.segments], "video_summary": s.summary}
            for s in chosen] + [
            {"vid": s.vid, "start_sec": p.start_s, "end_sec": p.end_s,
             "segment_descriptions": [g.description for g in p.segments], "video_summary": p.summary}
            for s in chosen for p in s.span_summaries], indent=1).encode())

    levels = {
        "clip": [(s, c.start_s, c.end_s, c.caption, facts_of_clip(c.action)) for s in sessions for c in s.clips],
        "segment": [(s, g.start_s, g.end_s, g.description, facts_of_segment(g)) for s in sessions for g in s.segments],
        "video": [(s, 0.0, s.duration_s, s.summary, facts_of_video(s.place, s.segments)) for s in sessions] + [
            (s, p.start_s, p.end_s, p.summary, facts_of_video(s.place, p.segments))
            for s in sessions for p in s.span_summaries],
    }
    (out / "groundtruth").mkdir(exist_ok=True)
    for level, rows in levels.items():
        table = pa.table({
            "video_id": [s.vid for s, *_ in rows], "split": [s.split for s, *_ in rows],
            "level": [level] * len(rows), "start_s": [r[1] for r in rows],
            "end_s": [r[2] for r in rows], "text": [r[3] for r in rows],
            "facts": [json.dumps(r[4], sort_keys=True) for r in rows],
        }, schema=GROUNDTRUTH_SCHEMA)
        _write_parquet(table, out / "groundtruth" / f"{level}.parquet")


def write_reordered(out: Path, sessions: list[Session], composed: tuple[ComposedSummary, ...] = ()) -> None:
    """groundtruth/reordered.parquet: the reordered summaries of the training videos, then the composed summaries
    (none: an empty table)."""
    def row(video: str, split: str, start: float, end: float, place: str, summary: str, parts) -> dict:
        return {"video_id": video, "split": split, "level": "video", "start_s": start, "end_s": end, "text": summary,
                "facts": json.dumps(facts_of_video(place, [g for _, g in parts]), sort_keys=True),
                "parts": json.dumps([[v, g.start_s, g.end_s] for v, g in parts])}
    rows = [row(s.vid, s.split, 0.0, s.duration_s, s.place, r.summary, [(s.vid, g) for g in r.segments])
            for s in sessions for r in s.reordered_summaries]
    rows += [row(c.parts[0][0], "train", 0.0, sum(g.end_s - g.start_s for g in c.segments), c.place, c.summary,
                 c.parts) for c in composed]
    (out / "groundtruth").mkdir(exist_ok=True)
    _write_parquet(pa.Table.from_pylist(rows, schema=REORDERED_SCHEMA), out / "groundtruth" / REORDERED_FILE)


def write_queries(out: Path, sessions: list[Session], seed: int) -> None:
    """groundtruth/queries.parquet: the retrieval queries (synth.queries), in the ground-truth schema."""
    (out / "groundtruth").mkdir(exist_ok=True)
    _write_parquet(pa.Table.from_pylist(plan_queries(sessions, seed), schema=GROUNDTRUTH_SCHEMA),
                   out / "groundtruth" / QUERIES_FILE)


def _write_parquet(table: pa.Table, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    pq.write_table(table, partial)
    os.replace(partial, path)


def write_json(path: Path, obj) -> None:
    _atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())


def _atomic_write(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)
