"""Ingest orchestration: probe many files in parallel, register the good ones, record the bad ones."""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

from pipeline.progress import Progress, Summary
from stages.ingest import VIDEO_SUFFIXES, list_videos, probe_video, read_hcap, read_hcap_queries, read_hcap_reordered
from store import (
    Store, fingerprint, read_videos, register_videos, video_id_for, write_groundtruth, write_queries, write_reordered,
)

STAGE, VERSION = "ingest", "v1"


def ingest(store: Store, sources: list[str], threads: int = 4, stream=None) -> Summary:
    """Register every video found in `sources` (folders, list files or video paths)."""
    stream = sys.stderr if stream is None else stream  # at the call: --log-file replaces it
    start = time.monotonic()
    uris = []
    for source in sources:
        uris += [source] if Path(source).suffix.lower() in VIDEO_SUFFIXES \
            else list_videos(source)
    uris = [_absolute(uri) for uri in uris]
    summary = Summary(STAGE)
    registered = {v["video_id"]: v for v in read_videos(store, status=None)}
    known = {vid: row["uri"] for vid, row in registered.items()}
    claimed: dict[str, str] = {}
    units = []
    for uri in uris:
        vid = video_id_for(Path(uri).stem, uri)
        owner = claimed.get(vid) or known.get(vid)
        if owner is not None and owner != uri:
            record = store.record_failure(STAGE, VERSION, f"{vid}@{fingerprint(uri, length=10)}", ValueError(
                f"{uri}: video id {vid!r} is already taken by {owner}; rename one of the files"), vid)
            summary.failed += 1
            summary.failures.append(record)
            print(f"[{STAGE}] FAILED {record['message']}", file=stream)
            continue
        claimed[vid] = uri
        units.append((vid, uri))

    progress = Progress(STAGE, len(units), len(units), "videos", stream)
    rows = []

    def probe(item):
        vid, uri = item
        try:
            row = registered.get(vid)
            return vid, probe_video(uri, row if row and row["uri"] == uri else None), None
        except Exception as e:
            return vid, None, e

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for vid, row, error in pool.map(probe, units):
            if error is None:
                rows.append(row)
            else:
                record = store.record_failure(STAGE, VERSION, vid, error)
                summary.failed += 1
                summary.failures.append(record)
                progress.write(f"[{STAGE}] FAILED {record['message']}")
            progress.advance(1)
    progress.close()
    for row in rows:
        old = registered.get(row["video_id"])
        if old and old["content_id"] and old["content_id"] != row["content_id"]:
            print(f"[{STAGE}] {row['uri']}: content changed since it was registered; later stages will redo "
                  f"{row['video_id']} (earlier outputs are kept under superseded/)", file=stream)
    counts = register_videos(store, rows)
    for row in rows:
        store.remove(f"failures/{STAGE}/{VERSION}/{row['video_id']}.json")
    summary.done = counts["added"] + counts["updated"]
    summary.skipped = counts["unchanged"]
    summary.work = len(units)
    summary.wall_s = time.monotonic() - start
    print(summary.line(), file=stream, flush=True)
    return summary


def ingest_hcap(store: Store, metadata_dir: str, videos_root: str, threads: int = 4,
                stream=None) -> Summary:
    """Ego4D-HCap: ground truth from the metadata files (and a synthetic corpus's retrieval queries and reordered
    and composed summaries), and ROOT/{vid}.mp4 registered. The ground truth is keyed by the registry's ids (an id
    unsafe as a file name is cleaned the same way in both)."""
    stream = sys.stderr if stream is None else stream
    tables = read_hcap(metadata_dir)
    root = videos_root.rstrip("/")
    uris = {vid: _absolute(f"{root}/{vid}.mp4") for t in tables.values() for vid in t["video_id"].to_pylist()}
    ids = {vid: video_id_for(Path(uri).stem, uri) for vid, uri in uris.items()}
    for level, table in tables.items():
        if table.num_rows:
            write_groundtruth(store, level, _keyed(table, ids))
            print(f"[{STAGE}] ground truth {level}: {table.num_rows} rows", file=stream)
    queries = read_hcap_queries(metadata_dir)
    if queries is not None and queries.num_rows:
        write_queries(store, _keyed(queries, ids))
        print(f"[{STAGE}] retrieval queries: {queries.num_rows} rows", file=stream)
    reordered = read_hcap_reordered(metadata_dir)
    if reordered is not None:  # even none: a corpus without them replaces those of its videos from an earlier one
        write_reordered(store, _keyed_parts(_keyed(reordered, ids), ids), videos=sorted(set(ids.values())))
        print(f"[{STAGE}] reordered and composed summaries: {reordered.num_rows} rows", file=stream)
    return ingest(store, sorted(set(uris.values())), threads, stream)


def _keyed(table: pa.Table, ids: dict[str, str]) -> pa.Table:
    keyed = pa.array([ids[v] for v in table["video_id"].to_pylist()], pa.string())
    return table.set_column(table.schema.get_field_index("video_id"), "video_id", keyed)


def _keyed_parts(table: pa.Table, ids: dict[str, str]) -> pa.Table:
    """The videos named in the parts of reordered and composed summaries, as the store knows them."""
    parts = [json.dumps([[ids[p[0]], *p[1:]] if len(p) == 3 else p for p in json.loads(text)])
             for text in table["parts"].to_pylist()]
    return table.set_column(table.schema.get_field_index("parts"), "parts", pa.array(parts, pa.string()))


def _absolute(uri: str) -> str:
    """Registered absolute: later stages run from other folders, or on other Ray nodes."""
    return uri if "://" in uri else os.path.abspath(uri)
