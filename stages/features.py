"""Features: per 4-s window CLS (and optionally all tokens) of a frozen video encoder, into Zarr.

A unit is a chunk of one video's windows, aligned to the CLS array's Zarr
chunks, so an hour-long video spreads over the cluster and each chunk commits
on its own. Decoding the next batch overlaps encoding the current one.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import decord
import numpy as np
import torch

from models.encoders import build_encoder, describe_encoder
from stages.base import Resources, Stage, Unit
from stages.decode import WindowReader, window_times
from store import FeatureSet, Store, fingerprint, path_digest, read_videos


@dataclass(eq=False)
class FeaturesStage(Stage):
    """Plain parameters (`pipeline.dag.features_stage` resolves them from the configuration)."""

    encoder: str = "tsf-base"      # models.encoders.ENCODERS
    checkpoint: str = ""           # local LaViLa .pth or VideoPrism folder; empty: seeded random weights
    clip_s: float = 4.0            # window length
    tokens: bool = True            # keep every token of a window, not only the CLS
    batch_size: int = 4            # windows per encoder call
    device: str = "cpu"
    chunk_windows: int = 128       # windows per unit; a multiple of rows_per_chunk
    rows_per_chunk: int = 64       # Zarr chunk rows of the CLS array
    decode_threads: int = 1
    random_weights: bool = False   # allow a full-size encoder without a checkpoint
    name = "features"
    work_name = "windows"
    encoder_model = None           # built per worker in setup()

    def __post_init__(self):
        if self.chunk_windows % self.rows_per_chunk:
            raise ValueError(f"features.chunk_windows ({self.chunk_windows}) must be a multiple of "
                             f"features.rows_per_chunk ({self.rows_per_chunk})")
        self.spec = describe_encoder(self.encoder, self.checkpoint or None)
        self.resources = Resources(cpus=1.0, gpus=1.0 if self.device.startswith("cuda") else 0.0, memory_gb=2.0)
        self._reader: tuple[tuple, WindowReader] | None = None  # the last video's, reused by its next chunk
        self._version = None

    def version(self) -> str:
        if self._version is None:
            weights = path_digest(*_fs_path(self.checkpoint)) if self.checkpoint else "random-seed0"
            params = {"encoder": self.encoder, "weights": weights, "clip_s": self.clip_s,
                      "tokens": self.tokens, "spec": vars(self.spec)}
            self._version = f"{self.encoder}-{fingerprint(params, length=8)}"
        return self._version

    @property
    def output_dir(self) -> str:
        return f"features/{self.version()}"

    def feature_set(self, store: Store) -> FeatureSet:
        return FeatureSet(store, self.version())

    def plan(self, store: Store) -> list[Unit]:
        units = []
        for video in read_videos(store):
            n = len(window_times(video["duration_s"], self.clip_s))
            for start in range(0, n, self.chunk_windows):
                stop = min(start + self.chunk_windows, n)
                units.append(Unit(
                    id=f"{video['video_id']}@{start:06d}", video_id=video["video_id"],
                    fingerprint=fingerprint(self.version(), video["content_id"], start, stop),
                    work=stop - start,
                    payload={"uri": video["uri"], "duration_s": video["duration_s"], "start": start, "stop": stop,
                             "content_id": video["content_id"]}))
        return units

    def __getstate__(self):  # Ray workers build their own encoder in setup() and open their own videos
        return {**self.__dict__, "encoder_model": None, "_reader": None}

    def check(self) -> None:
        """A checkpoint that does not fit the encoder fails here once, naming the keys, not in every worker."""
        if self.checkpoint:
            build_encoder(self.encoder, self.checkpoint, "cpu")
        elif not self.encoder.endswith("-tiny") and not self.random_weights:
            raise ValueError(f"features.encoder = {self.encoder!r} has no checkpoint: its features would come "
                             "from random weights. Set features.checkpoint (--checkpoint), or features.random_weights"
                             " = true to run it anyway (benchmarks)")

    def prepare(self, store: Store, units: list[Unit]) -> None:
        """Create each video's arrays once, on the driver, before its chunks run anywhere."""
        fs = self.feature_set(store)
        for unit in {u.video_id: u for u in units}.values():
            windows = window_times(unit.payload["duration_s"], self.clip_s)
            fs.create(unit.video_id, windows, self.spec.dim, self.spec.num_tokens if self.tokens else None,
                      fingerprint=fingerprint(self.version(), unit.payload["content_id"]),
                      attrs={"encoder": self.encoder, "clip_s": self.clip_s, "uri": unit.payload["uri"]},
                      rows_per_chunk=self.rows_per_chunk)

    def setup(self) -> None:
        self.use_reserved_cpus()
        weights = f"from {self.checkpoint}" if self.checkpoint else "with random weights"
        with self.loading(f"{self.encoder} {weights} on {self.device}"):
            self.encoder_model = build_encoder(self.encoder, self.checkpoint or None, self.device)

    def process(self, unit: Unit, store: Store) -> dict:
        if self.encoder_model is None:
            self.setup()
        uri = unit.payload["uri"]
        windows = window_times(unit.payload["duration_s"], self.clip_s)
        try:
            return self._encode_chunk(unit, store, windows)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"{uri}: {e}" if uri not in str(e) else str(e)) from None
        except decord.DECORDError as e:  # a C++ trace: keep its last line
            raise ValueError(f"{uri}: cannot decode ({_last_line(e)})") from None

    def _encode_chunk(self, unit: Unit, store: Store, windows: np.ndarray) -> dict:
        p = unit.payload
        fs = self.feature_set(store)
        reader = self._open(p["uri"], p["content_id"], windows)
        batches = [(s, min(s + self.batch_size, p["stop"])) for s in range(p["start"], p["stop"], self.batch_size)]
        cls = np.empty((p["stop"] - p["start"], self.spec.dim), np.float16)
        with ThreadPoolExecutor(max_workers=1) as decoder:
            pending = decoder.submit(reader.read, *batches[0])
            for i, (start, stop) in enumerate(batches):
                frames = pending.result()
                if i + 1 < len(batches):
                    pending = decoder.submit(reader.read, *batches[i + 1])
                batch_cls, tokens = self.encoder_model.encode(torch.from_numpy(frames))
                cls[start - p["start"]:stop - p["start"]] = batch_cls.cpu().numpy()
                if self.tokens:
                    fs.write_tokens(unit.video_id, start, tokens.cpu().numpy())
        fs.write(unit.video_id, p["start"], cls)
        self._reader = ((p["uri"], p["content_id"]), reader)  # kept only after a chunk that read cleanly
        stats = {"windows": p["stop"] - p["start"]}
        store.commit(self.name, self.version(), unit.id, unit.fingerprint, {fs.rel(unit.video_id): None}, stats)
        return stats

    def _open(self, uri: str, content_id: str, windows: np.ndarray) -> WindowReader:
        """The reader of this video's previous chunk when this worker ran it, else a new one: opening
        indexes every frame's timestamp, a large share of an hour's decode time (`make bench`)."""
        cached, self._reader = self._reader, None
        if cached is not None and cached[0] == (uri, content_id):
            return cached[1]
        return WindowReader(_local_path(uri), self.spec.image_size, self.spec.num_frames, windows,
                            self.decode_threads)

    def complete_videos(self, store: Store) -> set[str]:
        """Videos whose every chunk is committed with the current fingerprint."""
        markers = store.markers(self.name, self.version())
        by_video: dict[str, bool] = {}
        for unit in self.plan(store):
            done = markers.get(unit.id, {}).get("fingerprint") == unit.fingerprint
            by_video[unit.video_id] = by_video.get(unit.video_id, True) and done
        return {v for v, done in by_video.items() if done}


def _fs_path(uri: str):
    import fsspec

    return fsspec.core.url_to_fs(uri)


def _local_path(uri: str) -> str:
    """decord reads local files; remote videos must be on a shared filesystem or mounted."""
    fs, path = _fs_path(uri)
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        raise ValueError(f"{uri}: decoding reads local or mounted paths; mount the bucket or copy the video")
    return path


def _last_line(e: BaseException) -> str:
    """decord messages are C++ traces; their last line says what went wrong."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    last = re.sub(r"^\[[\d:]+\] \S+: (Check failed: )?", "", lines[-1]) if lines else type(e).__name__
    return last[:200]
