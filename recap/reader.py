"""Reading a store without knowing its layout or version hashes. Reads only: never creates or changes a store."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from store import (
    CAPTION_SCHEMA, FEATURE_DIMS, VIDEO_SCHEMA, FeatureSet, Store, captions_dir, committed_captions, current_versions,
    read_current, read_groundtruth, read_videos,
)
from store.levels import check_level


def open_store(path: str) -> StoreReader:
    """A store for reading (a folder or fsspec URL); FileNotFoundError if there is none."""
    return StoreReader(path)


class StoreReader:
    def __init__(self, path: str):
        self.store = Store(path, create=False)

    def __repr__(self) -> str:
        return f"open_store({self.store.root!r})"

    @property
    def videos(self) -> pd.DataFrame:
        """The registry, every video sorted by id; `status` is "ok" for readable ones."""
        return pa.Table.from_pylist(read_videos(self.store, status=None), schema=VIDEO_SCHEMA).to_pandas()

    def versions(self) -> dict[str, str]:
        """{level: version, "features": feature set} that are current: current/versions.json, written after each
        caption run; before any, what the store's settings produce (a level without a checkpoint is absent)."""
        written = current_versions(self.store)
        if written is not None:
            return written
        from pipeline.config import settle  # torch and the stages: only when there is no current/
        from pipeline.current import resolved_versions

        return resolved_versions(settle(self.store.root, record=False), self.store)

    def captions(self, level: str, video_id: str | None = None, version: str | None = None) -> pd.DataFrame:
        """Committed captions of a level (one video's, or all), sorted by video and start: the current version's
        by default (current/<level>.parquet), or `version`'s. Every row names its version."""
        check_level(level)
        if version is None:
            table = read_current(self.store, level, video_id)
            if table is None:
                version = self.versions().get(level)
                if version is None:
                    raise FileNotFoundError(f"{self.store.url('current')}: no current {level} version (no {level} "
                                            f"checkpoint in the store's settings); pass version=")
        elif not self.store.exists(captions_dir(level, version)):
            raise FileNotFoundError(f"{self.store.url(captions_dir(level, version))}: no {level} captions of "
                                    f"version {version}")
        if version is not None:
            table = committed_captions(self.store, level, version, video_id)
        return table.cast(CAPTION_SCHEMA).to_pandas()

    def groundtruth(self, level: str, split: str | None = None) -> pd.DataFrame:
        """Reference captions of a level (one split, or all); `facts` is JSON where the corpus knows them."""
        table = read_groundtruth(self.store, check_level(level), split)
        if table is None:
            raise FileNotFoundError(f"{self.store.url(f'groundtruth/{level}.parquet')}: no {level} ground truth")
        return table.to_pandas()

    def features(self, video_id: str, feature_set: str | None = None):
        """A video's features as an xarray Dataset of lazy (dask) arrays: cls (window, channel), tokens (window,
        token, channel) where stored, windows (window, bound), with start_s / end_s per window. From the current
        feature set, or `feature_set`'s. Built from the Zarr arrays, so arrays without dimension names read too."""
        import dask.array as da
        import xarray as xr

        name = feature_set or self.versions().get("features")
        features = FeatureSet(self.store, name)
        info = features.info(video_id)
        if info is None:
            raise FileNotFoundError(f"{self.store.url(features.rel(video_id))}: no features of {video_id} in "
                                    f"feature set {name}")
        arrays = features.arrays(video_id)
        windows = arrays["windows"][:]
        return xr.Dataset({k: (FEATURE_DIMS[k], da.from_zarr(a)) for k, a in arrays.items()},
                          coords={"start_s": ("window", windows[:, 0]), "end_s": ("window", windows[:, 1])},
                          attrs={**info, "feature_set": name, "video_id": video_id})

    def metrics(self) -> pd.DataFrame:
        """Every evaluation table under metrics/ (`recap evaluate`, the demo), one row per score; `run` names
        the table."""
        table = self.store.read_table("metrics")
        if table is None:
            raise FileNotFoundError(f"{self.store.url('metrics')}: no evaluation results; run `recap evaluate`")
        return table.to_pandas()
