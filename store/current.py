"""current/: each level's captions of its current version, for readers who know no version hash.

current/<level>.parquet   every committed row of the level's current version (the one the store's settings
                          produce), sorted by video and start: `pd.read_parquet("<store>/current/clip.parquet")`
current/versions.json     {"clip": version, "segment": ..., "video": ..., "features": feature set}

Caption folders keep every version; these are a consolidated copy, rewritten by the caption stages'
drivers after a run (pipeline.current), under the store's atomic writes and one lock, tables first and
versions.json last. A row is committed when its video's marker holds the row's fingerprint: output renamed
into place by a run killed before its marker, or replaced since, is left out. A level without a version
(no checkpoint) has no table.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from store.levels import LEVEL, LEVELS, check_level
from store.store import Store
from store.tables import CAPTION_SCHEMA, read_captions

VERSIONS = "current/versions.json"


def current_rel(level: str) -> str:
    return f"current/{check_level(level)}.parquet"


def committed_captions(store: Store, level: str, version: str, video_id: str | None = None) -> pa.Table:
    """The rows of `version` (one video's, or all) whose video's completion marker holds their fingerprint,
    sorted by video and start."""
    stage = LEVEL[check_level(level)].stage
    if video_id is None:
        markers = store.markers(stage, version)
    else:
        marker = store.marker(stage, version, video_id)
        markers = {video_id: marker} if marker else {}
    table = read_captions(store, level, version, video_id) if markers else None
    if table is None:
        return CAPTION_SCHEMA.empty_table()
    keys = pc.binary_join_element_wise(table["video_id"], table["fingerprint"], "\n")
    committed = pa.array([f"{unit}\n{m.get('fingerprint')}" for unit, m in markers.items()], pa.string())
    table = table.filter(pc.is_in(keys, value_set=committed))
    return table.sort_by([("video_id", "ascending"), ("start_s", "ascending"), ("end_s", "ascending")])


def write_current(store: Store, versions: dict[str, str], features: str, levels: Iterable[str] = LEVELS) -> None:
    """Make `versions` ({level: version}) current. The tables of `levels` (the ones just run) are rewritten,
    and those of levels whose version changed; a level missing from `versions` loses its table."""
    refresh = set(levels)
    with store.lock("current"):  # two drivers at once: the later one reads the later markers
        before = store.read_json(VERSIONS) or {}
        for level in LEVELS:
            rel, version = current_rel(level), versions.get(level)
            if version is None:
                store.remove(rel)
            elif level in refresh or before.get(level) != version or not store.exists(rel):
                store.write_table(rel, committed_captions(store, level, version))
        store.write_json(VERSIONS, {**{k: v for k, v in versions.items() if k in LEVEL}, "features": features})


def current_versions(store: Store) -> dict[str, str] | None:
    """current/versions.json, or None when no caption run has written it."""
    return store.read_json(VERSIONS)


def read_current(store: Store, level: str, video_id: str | None = None) -> pa.Table | None:
    """current/<level>.parquet (one video's rows, or all), or None when the level has no current table."""
    only = None if video_id is None else pc.field("video_id") == video_id
    return store.read_table(current_rel(level), filter=only, schema=CAPTION_SCHEMA)
