"""Schemas and readers of the store's Parquet tables: registry, ground truth, captions."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from store.ids import check_name
from store.levels import check_level
from store.store import Store

REGISTRY = "videos.parquet"

VIDEO_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("uri", pa.string()), ("content_id", pa.string()),
    ("size_bytes", pa.int64()), ("mtime_ns", pa.int64()), ("duration_s", pa.float64()), ("fps", pa.float64()),
    ("width", pa.int32()), ("height", pa.int32()), ("frames", pa.int64()),
    ("codec", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("ingested_at", pa.string()),
])

GROUNDTRUTH_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("split", pa.string()), ("level", pa.string()),
    ("start_s", pa.float64()), ("end_s", pa.float64()), ("text", pa.string()),
    ("facts", pa.string()),  # JSON of what the caption states, where the corpus knows it (synth.facts); else null
])

# Video-level training targets that tell training segments in orders no video has (synth.world.ReorderedSummary,
# ComposedSummary): the ground-truth schema plus `parts`, JSON of the [video, start, end] of each segment in the order
# the summary tells them (tables written before composed summaries hold [start, end]: the row's own video).
REORDERED_SCHEMA = GROUNDTRUTH_SCHEMA.append(pa.field("parts", pa.string()))

CAPTION_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("level", pa.string()), ("start_s", pa.float64()),
    ("end_s", pa.float64()), ("text", pa.string()), ("score", pa.float64()),
    ("fingerprint", pa.string()),
    ("version", pa.string()),  # the caption folder's name; tables written before it had none (read_captions)
])


# ---- registry ----------------------------------------------------------------

def read_videos(store: Store, status: str | None = "ok") -> list[dict]:
    """Registered videos (only readable ones by default), sorted by id."""
    table = _registry(store)
    if table is None:
        return []
    if status is not None:
        table = table.filter(pc.equal(table["status"], status))
    return sorted(table.to_pylist(), key=lambda r: r["video_id"])


def _registry(store: Store) -> pa.Table | None:
    """The registry in today's schema (older registries have no mtime_ns: null)."""
    table = store.read_table(REGISTRY)
    if table is not None and "mtime_ns" not in table.column_names:
        table = table.append_column("mtime_ns", pa.nulls(table.num_rows, pa.int64()))
    return None if table is None else table.select(VIDEO_SCHEMA.names).cast(VIDEO_SCHEMA)


def register_videos(store: Store, rows: list[dict]) -> dict[str, int]:
    """Add or update registry rows by video_id; returns counts per outcome.

    A row equal to the registered one is left alone; a changed row (the file
    at that uri changed, or a failed probe now reads) replaces it, and its
    downstream outputs are recomputed because their fingerprints include the
    video's content id.
    """
    counts = {"added": 0, "updated": 0, "unchanged": 0}
    if not rows:
        return counts
    for r in rows:
        check_name(r["video_id"], "video id")
    with store.lock("registry"):
        current = {r["video_id"]: r for r in (_registry(store) or VIDEO_SCHEMA.empty_table()).to_pylist()}
        for row in rows:
            row = {name: row.get(name) for name in VIDEO_SCHEMA.names}
            old = current.get(row["video_id"])
            same = old is not None and all(old[k] == row[k] for k in VIDEO_SCHEMA.names if k != "ingested_at")
            counts["unchanged" if same else "updated" if old else "added"] += 1
            if not same:
                current[row["video_id"]] = row
        ordered = [current[k] for k in sorted(current)]
        store.write_table(REGISTRY, pa.Table.from_pylist(ordered, schema=VIDEO_SCHEMA))
    return counts


# ---- ground truth ------------------------------------------------------------

def groundtruth_rel(level: str) -> str:
    return f"groundtruth/{check_level(level)}.parquet"


def _conform_groundtruth(table: pa.Table) -> pa.Table:
    """The ground-truth schema; a table without facts (older stores, corpora without them) gets null facts."""
    if "facts" not in table.column_names:
        table = table.append_column("facts", pa.nulls(table.num_rows, pa.string()))
    return table.select(GROUNDTRUTH_SCHEMA.names).cast(GROUNDTRUTH_SCHEMA)


def write_groundtruth(store: Store, level: str, table: pa.Table) -> int:
    """Merge ground truth of one level: rows of the given videos replace theirs."""
    return _merge_by_video(store, groundtruth_rel(level), f"groundtruth-{level}", table)


def _merge_by_video(store: Store, rel: str, lock: str, table: pa.Table, conform=_conform_groundtruth,
                    videos: list[str] | None = None) -> int:
    """Rows of `videos` (default: the table's) replaced by the table's."""
    table = conform(table)
    videos = pc.unique(table["video_id"]) if videos is None else pa.array(videos, pa.string())
    with store.lock(lock):
        old = store.read_table(rel)
        if old is not None:
            keep = pc.invert(pc.is_in(old["video_id"], value_set=videos))
            table = pa.concat_tables([conform(old.filter(keep)), table])
        table = table.sort_by([("video_id", "ascending"), ("start_s", "ascending")])
        store.write_table(rel, table)
    return table.num_rows


def read_groundtruth(store: Store, level: str, split: str | None = None) -> pa.Table | None:
    return _read_split(store, groundtruth_rel(level), split)


def _read_split(store: Store, rel: str, split: str | None, conform=_conform_groundtruth) -> pa.Table | None:
    table = store.read_table(rel)
    table = None if table is None else conform(table)
    if table is not None and split is not None:
        table = table.filter(pc.equal(table["split"], split))
    return table


# ---- retrieval queries -----------------------------------------------------------

QUERIES_REL = "groundtruth/queries.parquet"  # retrieval queries, in the ground-truth schema (synth.queries)


def write_queries(store: Store, table: pa.Table) -> int:
    """Merge retrieval queries: rows of the given videos replace theirs."""
    return _merge_by_video(store, QUERIES_REL, "groundtruth-queries", table)


def read_queries(store: Store, split: str | None = None) -> pa.Table | None:
    """The retrieval queries (of one split), or None if the store has none."""
    return _read_split(store, QUERIES_REL, split)


# ---- reordered summaries ----------------------------------------------------------

REORDERED_REL = "groundtruth/reordered.parquet"


def _conform_reordered(table: pa.Table) -> pa.Table:
    return table.select(REORDERED_SCHEMA.names).cast(REORDERED_SCHEMA)


def write_reordered(store: Store, table: pa.Table, videos: list[str] | None = None) -> int:
    """Merge reordered summaries: the table's rows replace those of `videos` (default: the table's)."""
    return _merge_by_video(store, REORDERED_REL, "groundtruth-reordered", table, _conform_reordered, videos)


def read_reordered(store: Store, split: str | None = None) -> pa.Table | None:
    """The reordered summaries (of one split), or None if the store has none."""
    return _read_split(store, REORDERED_REL, split, _conform_reordered)


# ---- captions ----------------------------------------------------------------

def captions_dir(level: str, version: str) -> str:
    return f"captions/{check_level(level)}/{check_name(version, 'version')}"


def captions_rel(level: str, version: str, video_id: str) -> str:
    return f"{captions_dir(level, version)}/{check_name(video_id, 'video id')}.parquet"


def read_captions(store: Store, level: str, version: str, video_id: str | None = None) -> pa.Table | None:
    """Captions of one level and version (one video, or all), in today's schema: rows of tables written
    before captions carried their version get it from the folder name."""
    rel = captions_rel(level, version, video_id) if video_id else captions_dir(level, version)
    table = store.read_table(rel, schema=CAPTION_SCHEMA)
    if table is None:
        return None
    i = table.schema.get_field_index("version")
    return table.set_column(i, "version", pc.fill_null(table["version"], version))
