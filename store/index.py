"""The search index: each video's captions at every level, with a text and a video embedding per caption.

index/<version>/<video_id>/           Zarr v3 group, one per video
    text     [rows, E]  float16       the dual encoder's text embedding of the row's caption, unit length
    video    [rows, E]  float16       the row's span: the mean of the unit embeddings of the feature windows
                                      inside it, renormalised (a clip row: its window's embedding)
    zarr.json                         attributes: fingerprint, embed_dim, rows
index/<version>/<video_id>.parquet    video_id, level (clip|segment|video), start_s, end_s, caption, row

Row i of the table is row i of both arrays; arrays carry `dimension_names` ("row", "channel"). Rows are
ordered clip, segment, video, each by start. A level with no committed captions yet has no rows. The group
and the table are written under hidden names and renamed into place by `Store.commit`, the marker last
(markers/index/<version>/<video_id>.json): only videos with a marker are read. The tables read as one
dataset with a glob, `duckdb.sql("SELECT * FROM '<store>/index/<version>/*.parquet'")`, and a group with
`xr.open_zarr("<store>/index/<version>/<video_id>", consolidated=False)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import zarr

from store.ids import check_name
from store.store import Store

INDEX_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("level", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64()),
    ("caption", pa.string()), ("row", pa.int32()),
])
INDEX_DIMS = ("row", "channel")
INDEX_STAGE = "index"


def index_dir(version: str) -> str:
    return f"index/{check_name(version, 'version')}"


def index_group_rel(version: str, video_id: str) -> str:
    return f"{index_dir(version)}/{check_name(video_id, 'video id')}"


def index_table_rel(version: str, video_id: str) -> str:
    return f"{index_group_rel(version, video_id)}.parquet"


def stage_index_group(store: Store, version: str, video_id: str, text: np.ndarray, video: np.ndarray,
                      attrs: dict) -> str:
    """Write a video's arrays into a hidden group next to its final place; return that name for `commit`."""
    rel = index_group_rel(version, video_id)
    tmp = store.tmp_name(rel)
    group = zarr.open_group(store.url(tmp), mode="w")
    group.attrs.update({**attrs, "rows": len(text), "embed_dim": text.shape[1]})
    for name, data in (("text", text), ("video", video)):
        group.create_array(name, data=np.asarray(data, dtype="float16"), chunks=(max(len(data), 1), data.shape[1]),
                           dimension_names=INDEX_DIMS)
    return tmp


@dataclass
class IndexRows:
    """Every committed row of an index version, videos one after another: `table` (INDEX_SCHEMA), `text` and
    `video` (rows, E) float16, `offsets[i]:offsets[i + 1]` the rows of `video_ids[i]`."""

    table: pa.Table
    text: np.ndarray
    video: np.ndarray
    video_ids: list[str]
    offsets: np.ndarray


def read_index(store: Store, version: str) -> IndexRows:
    """The rows and embeddings of every video whose index marker is committed (FileNotFoundError if none)."""
    videos = sorted(store.markers(INDEX_STAGE, version))
    if not videos:
        raise FileNotFoundError(f"{store.url(index_dir(version))}: no committed index of version {version}; "
                                "run `recap index`")
    tables, text, video, counts = [], [], [], []
    for vid in videos:
        table = store.read_table(index_table_rel(version, vid), schema=INDEX_SCHEMA)
        group = zarr.open_group(store.url(index_group_rel(version, vid)), mode="r")
        if table is None:
            raise FileNotFoundError(f"{store.url(index_table_rel(version, vid))}: missing; run `recap index`")
        if not (table.num_rows == group["text"].shape[0] == group["video"].shape[0]):
            raise ValueError(f"{store.url(index_group_rel(version, vid))}: {group['text'].shape[0]} embeddings for "
                             f"{table.num_rows} table rows; run `recap index` again")
        tables.append(table.sort_by("row"))
        text.append(group["text"][:])
        video.append(group["video"][:])
        counts.append(table.num_rows)
    return IndexRows(pa.concat_tables(tables), np.concatenate(text), np.concatenate(video), videos,
                     np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
