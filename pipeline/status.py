"""What the store holds, per stage and level: units done, failed, pending, and sizes; every version in the
store, which of them the store's settings make current, and the first failure messages."""

from __future__ import annotations

from pipeline.runner import todo_units
from stages.base import Stage
from store import LEVELS, Store, read_groundtruth, read_videos


def _mb(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def status_rows(store: Store, stages: list[Stage]) -> list[dict]:
    """One row per stage (and level), with done / failed / pending counts and bytes on disk."""
    rows = []
    all_videos = read_videos(store, status=None)
    ok = sum(v["status"] == "ok" for v in all_videos)
    ingest_failed = len(store.failures("ingest"))
    rows.append({"stage": "ingest", "what": "videos", "done": ok, "failed": ingest_failed, "pending": None,
                 "size": store.size("videos.parquet"),
                 "note": f"{sum(v['duration_s'] or 0 for v in all_videos) / 3600:.2f} h of video"})
    for level in LEVELS:
        gt = read_groundtruth(store, level)
        if gt is not None:
            splits = {}
            for s in gt["split"].to_pylist():
                splits[s] = splits.get(s, 0) + 1
            rows.append({"stage": "groundtruth", "what": level, "done": gt.num_rows, "failed": None,
                         "pending": None, "size": store.size(f"groundtruth/{level}.parquet"),
                         "note": ", ".join(f"{k} {v}" for k, v in sorted(splits.items()))})
    planned = set()
    for stage in stages:
        todo, done, failed, blocked = todo_units(stage, store)
        version = stage.version()
        planned.add((stage.name, version))
        rows.append({"stage": stage.name, "what": version, "done": len(done), "failed": len(failed),
                     "pending": len(todo) + len(blocked), "size": stage_size(store, stage),
                     "note": "current" + (f", {len(blocked)} blocked on upstream" if blocked else "")})
    for name in store.listdir("markers"):
        for version in store.listdir(f"markers/{name}"):
            if (name, version) not in planned:
                rows.append({"stage": name, "what": version, "done": len(store.listdir(f"markers/{name}/{version}")),
                             "failed": len(store.failures(name, version)), "pending": None, "size": None,
                             "note": "not current (other settings)"})
    return rows


def failure_groups(store: Store, rows: list[dict], first: int = 3) -> list[dict]:
    """Per stage version with failures (and ingest): how many, and the first records (unit, error, message)."""
    keys = ("unit", "video_id", "error_type", "message", "attempts", "failed_at")
    groups = []
    for r in rows:
        if r["stage"] in ("ingest", "groundtruth") or not r["failed"]:
            continue
        records = store.failures(r["stage"], r["what"])
        groups.append({"stage": r["stage"], "version": r["what"], "failed": len(records),
                       "first": [{k: f.get(k) for k in keys} for f in records[:first]]})
    ingest = store.failures("ingest")
    if ingest:
        groups.append({"stage": "ingest", "version": None, "failed": len(ingest),
                       "first": [{k: f.get(k) for k in keys} for f in ingest[:first]]})
    return groups


def failure_lines(store: Store, rows: list[dict], first: int = 3) -> list[str]:
    """The first failure messages of every stage version that has failures."""
    lines = []
    for g in failure_groups(store, rows, first):
        if g["stage"] == "ingest":
            lines.append(f"ingest: {g['failed']} failed")
            lines += [f"  {f['message']}" for f in g["first"]]
        else:
            lines.append(f"{g['stage']} {g['version']}: {g['failed']} failed")
            lines += [f"  {f['unit']}: {f['message']}" for f in g["first"]]
    return lines


def stage_size(store: Store, stage: Stage) -> int | None:
    rel = getattr(stage, "output_dir", None)
    return store.size(rel) if rel else None


def format_status(rows: list[dict]) -> str:
    header = ["stage", "what", "done", "failed", "pending", "size", "note"]
    table = [header] + [[
        str(r["stage"]), str(r["what"]),
        *("-" if r[k] is None else str(r[k]) for k in ("done", "failed", "pending")),
        "-" if r["size"] is None else _mb(r["size"]), r["note"] or "",
    ] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)
