"""Ingest: probe video files into registry rows; read Ego4D-HCap ground truth."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import av
import decord
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from stages.decode import quiet_decoders
from store import GROUNDTRUTH_SCHEMA, REORDERED_SCHEMA, file_digest, now_iso, sampled_digest, video_id_for

VIDEO_SUFFIXES = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v"}
SPLITS = ("train", "val", "test")


class BadVideo(ValueError):
    """A file that is not a usable video; the message names the file and the problem."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def probe_video(uri: str, known: dict | None = None) -> dict:
    """Registry row of one video file; raises BadVideo naming the file and the problem. `known`: the file's
    registered row, whose content id stands while size and modification time are unchanged (no re-read)."""
    quiet_decoders()
    fs, path = fsspec.core.url_to_fs(uri)
    local = "file" in fs.protocol
    if local and os.path.islink(path) and not os.path.exists(path):
        problem = "symbolic link loop" if _is_loop(path) else "broken symbolic link"
        raise BadVideo(f"{uri}: {problem}")
    if not fs.exists(path):
        raise BadVideo(f"{uri}: file not found")
    if fs.isdir(path):
        raise BadVideo(f"{uri}: a folder, not a video file")
    size = int(fs.size(path))
    if size == 0:
        raise BadVideo(f"{uri}: empty file (0 bytes)")
    if local:
        _check_container(uri, path)
    local = path if local else fs.open(path, "rb")
    try:
        reader = decord.VideoReader(local, num_threads=1)
    except Exception as e:
        raise BadVideo(f"{uri}: not a readable video ({_first_line(e)})") from None
    frames, fps = len(reader), float(reader.get_avg_fps())
    if frames == 0:
        raise BadVideo(f"{uri}: no video frames")
    if not fps > 0:
        raise BadVideo(f"{uri}: no frame rate in the stream")
    try:
        height, width = reader[0].shape[:2]
        reader[frames - 1]
        end_s = float(reader.get_frame_timestamp([frames - 1])[0, 1])  # right for variable frame rate too
    except Exception as e:
        raise BadVideo(f"{uri}: truncated or corrupt, cannot decode all {frames} frames ({_first_line(e)})") from None
    return {
        "video_id": video_id_for(Path(path).stem, uri), "uri": uri, "content_id": _content_id(fs, path, known),
        "size_bytes": size, "mtime_ns": _mtime_ns(fs, path), "duration_s": end_s if end_s > 0 else frames / fps, "fps": fps, "width": int(width),
        "height": int(height), "frames": frames, "codec": _codec_name(local), "status": "ok",
        "error": None, "ingested_at": now_iso(),
    }


def _mtime_ns(fs, path: str) -> int | None:
    mtime = fs.info(path).get("mtime")
    return int(mtime * 1e9) if isinstance(mtime, (int, float)) else None


def _content_id(fs, path: str, known: dict | None) -> str:
    if known and known.get("content_id"):
        if known.get("mtime_ns") is not None:
            if (known["size_bytes"], known["mtime_ns"]) == (int(fs.size(path)), _mtime_ns(fs, path)):
                return known["content_id"]
        elif sampled_digest(fs, path) == known["content_id"]:  # a row from before full hashing, unchanged
            return known["content_id"]
    return file_digest(fs, path)


def _is_loop(path: str) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == 40  # ELOOP
    return False


def _check_container(uri: str, path: str) -> None:
    """The common ways a file is not a video, said in words (decord would give a C++ trace)."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams})
                raise BadVideo(f"{uri}: no video stream" + (" (audio only)" if kinds == ["audio"] else
                                                            f" ({', '.join(kinds)} only)" if kinds else ""))
    except av.FFmpegError:
        with open(path, "rb") as f:
            head = f.read(12)
        if head[4:8] == b"ftyp":
            raise BadVideo(f"{uri}: truncated: the file ends before the index (moov atom)") from None
        raise BadVideo(f"{uri}: not a video file (no container format recognised)") from None


def _codec_name(local) -> str | None:
    try:
        if not isinstance(local, str):
            local.seek(0)
        with av.open(local) as container:
            return container.streams.video[0].codec_context.name
    except Exception:
        return None


def list_videos(source: str) -> list[str]:
    """Video paths from a folder (recursively, by suffix) or a text file of paths/URLs."""
    fs, path = fsspec.core.url_to_fs(source)
    if not fs.exists(path):
        raise FileNotFoundError(f"{source}: no such folder or list file")
    if fs.isdir(path):  # folders named like videos too: probing says what they are
        found = [p for p in fs.find(path, withdirs=True) if Path(p).suffix.lower() in VIDEO_SUFFIXES]
        return sorted(fs.unstrip_protocol(p) if "file" not in fs.protocol else p for p in found)
    with fs.open(path, "r") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


# ---- Ego4D-HCap metadata -------------------------------------------------------

class _PlainUnpickler(pickle.Unpickler):
    """HCap metadata holds only builtin containers; refuse anything else."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: metadata must be plain data")


def _load_pickle(path: Path):
    """Plain data from a metadata pickle; anything else is a ValueError naming the file."""
    with open(path, "rb") as f:
        try:
            return _PlainUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: {e}") from None
        except (EOFError, pickle.PickleError) as e:
            raise ValueError(f"{path}: not a readable pickle ({type(e).__name__})") from None


def read_hcap(metadata_dir: str | os.PathLike) -> dict[str, pa.Table]:
    """Ground-truth tables per level from Ego4D-HCap metadata files.

    clips_{split}.pkl: [(vid, start_sec, end_sec, caption)]
    segments_{split}.pkl: [{vid, sid, start_sec, end_sec, captions_gt, segment_description}]
    videos_{split}.json: [{vid, start_sec, end_sec, segment_descriptions, video_summary}]
    groundtruth/{level}.parquet (optional): the same rows with the facts behind each caption, which
        our synthetic corpus writes; they are attached by (video, start, end).
    """
    root = Path(metadata_dir)
    rows = {"clip": [], "segment": [], "video": []}
    found = False
    for split in SPLITS:
        clips, segments, videos = root / f"clips_{split}.pkl", root / f"segments_{split}.pkl", root / f"videos_{split}.json"
        if clips.exists():
            found = True
            for vid, start, end, caption in _load_pickle(clips):
                rows["clip"].append((vid, split, "clip", start, end, caption))
        if segments.exists():
            found = True
            for seg in _load_pickle(segments):
                rows["segment"].append((seg["vid"], split, "segment", seg["start_sec"], seg["end_sec"],
                                        seg["segment_description"]))
        if videos.exists():
            found = True
            for video in json.loads(videos.read_text()):
                rows["video"].append((video["vid"], split, "video", video["start_sec"], video["end_sec"],
                                      video["video_summary"]))
    if not found:
        raise FileNotFoundError(f"{root}: no Ego4D-HCap metadata (clips_*.pkl, segments_*.pkl, videos_*.json)")
    tables = {}
    for level, level_rows in rows.items():
        known = _facts(root / "groundtruth" / f"{level}.parquet")
        tables[level] = pa.Table.from_pylist(
            [{**dict(zip(GROUNDTRUTH_SCHEMA.names, r)), "facts": known.get((r[0], r[3], r[4]))} for r in level_rows],
            schema=GROUNDTRUTH_SCHEMA)
    return tables


def read_hcap_queries(metadata_dir: str | os.PathLike) -> pa.Table | None:
    """groundtruth/queries.parquet, the retrieval queries our synthetic corpus writes next to its ground truth
    (synth.queries), in the ground-truth schema; None for metadata without them (Ego4D-HCap)."""
    path = Path(metadata_dir) / "groundtruth" / "queries.parquet"
    return pq.read_table(path).select(GROUNDTRUTH_SCHEMA.names).cast(GROUNDTRUTH_SCHEMA) if path.is_file() else None


def read_hcap_reordered(metadata_dir: str | os.PathLike) -> pa.Table | None:
    """groundtruth/reordered.parquet, the summaries of training segments told in orders no video has that our
    synthetic corpus writes (synth.world.ReorderedSummary, ComposedSummary); None for metadata without them
    (Ego4D-HCap)."""
    path = Path(metadata_dir) / "groundtruth" / "reordered.parquet"
    return pq.read_table(path).select(REORDERED_SCHEMA.names).cast(REORDERED_SCHEMA) if path.is_file() else None


def _facts(path: Path) -> dict[tuple[str, float, float], str]:
    """(video, start, end) -> facts JSON from a corpus's ground-truth table, if it has one with facts."""
    if not path.is_file():
        return {}
    table = pq.read_table(path)
    if "facts" not in table.column_names:
        return {}
    columns = (table[c].to_pylist() for c in ("video_id", "start_s", "end_s", "facts"))
    return {(vid, start, end): facts for vid, start, end, facts in zip(*columns)}
