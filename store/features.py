"""Per-window video features in Zarr v3.

features/<feature_set>/<video_id>/
    cls      [n_windows, D]     float16, chunks of `rows_per_chunk` rows
    tokens   [n_windows, N, D]  float16, optional, chunks of a few windows
    windows  [n_windows, 2]     float64 seconds [start, end)
    zarr.json                   attributes: fingerprint, encoder, sizes

CLS and tokens are separate arrays, so reading a few CLS rows never touches
token chunks. Arrays are created whole before any rows are written; work
units then fill disjoint, chunk-aligned row ranges and each commits a marker.

Arrays carry Zarr v3 `dimension_names` (FEATURE_DIMS), so `xr.open_zarr(group)`
reads a video's group (arrays created before had none: `recap.open_store(...)
.features(video_id)` names them either way). The group's metadata is not
consolidated: a video's tokens/ folder may be deleted, and consolidated metadata
would still list it.
"""

from __future__ import annotations

import numpy as np
import zarr

from store.ids import check_name
from store.store import Store

FEATURE_DIMS = {"cls": ("window", "channel"), "tokens": ("window", "token", "channel"), "windows": ("window", "bound")}


class FeatureSet:
    def __init__(self, store: Store, name: str):
        self.store = store
        self.name = check_name(name, "feature set")

    def rel(self, video_id: str) -> str:
        return f"features/{self.name}/{check_name(video_id, 'video id')}"

    def videos(self) -> list[str]:
        return self.store.listdir(f"features/{self.name}")

    def info(self, video_id: str) -> dict | None:
        """The video's group attributes, or None if it has no complete group."""
        if not self.store.exists(f"{self.rel(video_id)}/zarr.json"):
            return None
        return dict(zarr.open_group(self.store.url(self.rel(video_id)), mode="r").attrs)

    def create(self, video_id: str, windows: np.ndarray, dim: int, num_tokens: int | None,
               fingerprint: str, attrs: dict | None = None, rows_per_chunk: int = 64,
               token_rows_per_chunk: int = 4) -> bool:
        """Create the video's empty arrays; returns False if they already exist for this fingerprint.

        A group of another fingerprint is moved to superseded/ first. The group
        is built under a hidden name and renamed into place, so a reader never
        sees a group with missing arrays.
        """
        rel = self.rel(video_id)
        with self.store.lock(f"features.{self.name}.{video_id}"):  # two runs may prepare one video at once
            return self._create(rel, video_id, windows, dim, num_tokens, fingerprint, attrs, rows_per_chunk,
                                token_rows_per_chunk)

    def _create(self, rel, video_id, windows, dim, num_tokens, fingerprint, attrs, rows_per_chunk,
                token_rows_per_chunk) -> bool:
        info = self.info(video_id)
        if info is not None and info.get("fingerprint") == fingerprint:
            return False
        if info is not None:
            self.store.supersede(rel, info.get("fingerprint", "unknown"))
        else:
            self.store.remove(rel)  # a half-moved leftover without group metadata
        n = len(windows)
        tmp = self.store.tmp_name(rel)
        group = zarr.open_group(self.store.url(tmp), mode="w")
        group.attrs.update({**(attrs or {}), "fingerprint": fingerprint, "n_windows": n, "dim": dim,
                            "num_tokens": num_tokens, "rows_per_chunk": rows_per_chunk})
        group.create_array("windows", data=np.asarray(windows, dtype="float64"), chunks=(max(n, 1), 2),
                           dimension_names=FEATURE_DIMS["windows"])
        group.create_array("cls", shape=(n, dim), chunks=(rows_per_chunk, dim), dtype="float16",
                           dimension_names=FEATURE_DIMS["cls"])
        if num_tokens:
            group.create_array("tokens", shape=(n, num_tokens, dim), chunks=(token_rows_per_chunk, num_tokens, dim),
                               dtype="float16", dimension_names=FEATURE_DIMS["tokens"])
        self.store.replace(tmp, rel)
        return True

    def arrays(self, video_id: str) -> dict[str, zarr.Array]:
        """The video's arrays, opened for reading: windows, cls, and tokens where stored."""
        names = ["windows", "cls"] + (["tokens"] if self.has_tokens(video_id) else [])
        return {name: self._array(video_id, name) for name in names}

    def _array(self, video_id: str, name: str, mode: str = "r") -> zarr.Array:
        return zarr.open_array(self.store.url(f"{self.rel(video_id)}/{name}"), mode=mode)

    def write(self, video_id: str, start: int, cls: np.ndarray, tokens: np.ndarray | None = None) -> None:
        """Write rows [start, start + len(cls)) of a created video."""
        self._array(video_id, "cls", "r+")[start:start + len(cls)] = np.asarray(cls, dtype="float16")
        if tokens is not None:
            self.write_tokens(video_id, start, tokens)

    def write_tokens(self, video_id: str, start: int, tokens: np.ndarray) -> None:
        self._array(video_id, "tokens", "r+")[start:start + len(tokens)] = np.asarray(tokens, dtype="float16")

    def windows(self, video_id: str) -> np.ndarray:
        return self._array(video_id, "windows")[:]

    def read_cls(self, video_id: str, rows=None) -> np.ndarray:
        """CLS rows (all, a slice, or an index array) without touching tokens."""
        arr = self._array(video_id, "cls")
        if rows is None:
            return arr[:]
        if isinstance(rows, slice):
            return arr[rows]
        return arr.get_orthogonal_selection((np.asarray(rows, dtype=np.int64), slice(None)))

    def has_tokens(self, video_id: str) -> bool:
        return self.store.exists(f"{self.rel(video_id)}/tokens/zarr.json")

    def read_tokens(self, video_id: str, rows: slice) -> np.ndarray:
        if not self.has_tokens(video_id):
            raise FileNotFoundError(
                f"{self.rel(video_id)}: no tokens stored (features ran with --no-tokens, or the tokens folder was deleted)")
        return self._array(video_id, "tokens")[rows]
