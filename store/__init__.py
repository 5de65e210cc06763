"""The feature store and tables. Imports nothing else of ours."""

from store.current import committed_captions, current_rel, current_versions, read_current, write_current
from store.features import FEATURE_DIMS, FeatureSet
from store.hashing import file_digest, fingerprint, path_digest, sampled_digest
from store.ids import check_name, is_safe_name, video_id_for
from store.levels import LEVEL, LEVELS, Level, latest_checkpoint, record_latest
from store.runs import commit_epoch, epoch_dir, last_epoch
from store.store import Store, now_iso
from store.tables import (
    CAPTION_SCHEMA, GROUNDTRUTH_SCHEMA, QUERIES_REL, REORDERED_REL, REORDERED_SCHEMA, VIDEO_SCHEMA, captions_dir,
    captions_rel, read_captions, read_groundtruth, read_queries, read_reordered, read_videos, register_videos,
    write_groundtruth, write_queries, write_reordered,
)

__all__ = [
    "Store", "now_iso", "FeatureSet", "FEATURE_DIMS", "fingerprint", "file_digest", "path_digest", "sampled_digest",
    "check_name", "is_safe_name", "video_id_for",
    "LEVEL", "LEVELS", "Level", "latest_checkpoint", "record_latest", "commit_epoch", "epoch_dir", "last_epoch",
    "CAPTION_SCHEMA", "GROUNDTRUTH_SCHEMA", "VIDEO_SCHEMA", "captions_dir", "captions_rel",
    "read_captions", "read_groundtruth", "read_videos", "register_videos", "write_groundtruth",
    "QUERIES_REL", "read_queries", "write_queries",
    "REORDERED_REL", "REORDERED_SCHEMA", "read_reordered", "write_reordered",
    "committed_captions", "current_rel", "current_versions", "read_current", "write_current",
]
