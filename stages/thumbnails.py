"""Thumbnails for `recap report`: one small JPEG per clip window, the window's middle frame, centre-cropped
square as the encoder sees it. One video per unit:

    thumbnails/<version>/<video_id>/<start_ms>.jpg      start_ms: the window's start in whole milliseconds

A video whose thumbnails are committed (its marker) is not decoded again.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from stages.base import Resources, Stage, Unit
from stages.decode import WindowReader, window_times
from store import Store, fingerprint, read_videos

THUMBNAILS = "thumbnails"


def thumbnail_rel(version: str, video_id: str, start_s: float) -> str:
    return f"{THUMBNAILS}/{version}/{video_id}/{round(start_s * 1000)}.jpg"


@dataclass(eq=False)
class ThumbnailStage(Stage):
    clip_s: float = 4.0      # the clip windows of the features and the clip captions
    size: int = 96           # pixels, square
    quality: int = 80        # JPEG
    batch: int = 32          # windows decoded at a time
    name = THUMBNAILS
    work_name = "windows"
    resources = Resources(cpus=1.0, memory_gb=0.5)

    def version(self) -> str:
        params = {"clip_s": self.clip_s, "size": self.size, "quality": self.quality, "frame": "middle, centre crop"}
        return f"thumbnails-{fingerprint(params, length=8)}"

    @property
    def output_dir(self) -> str:
        return f"{THUMBNAILS}/{self.version()}"

    def plan(self, store: Store) -> list[Unit]:
        return [Unit(v["video_id"], v["video_id"], fingerprint(self.version(), v["content_id"]),
                     work=len(window_times(v["duration_s"], self.clip_s)),
                     payload={"uri": v["uri"], "duration_s": v["duration_s"]}) for v in read_videos(store)]

    def process(self, unit: Unit, store: Store) -> dict:
        from PIL import Image  # Pillow: a dependency of matplotlib

        windows = window_times(unit.payload["duration_s"], self.clip_s)
        folder = f"{self.output_dir}/{unit.video_id}"
        store.remove_temporaries(folder, older_than_s=store.TMP_STALE_S)  # what a killed run left
        store.fs.makedirs(store.abs(folder), exist_ok=True)
        outputs = {}
        try:
            reader = WindowReader(unit.payload["uri"], self.size, 1, windows)
            for i in range(0, len(windows), self.batch):
                frames = reader.read(i, min(i + self.batch, len(windows)))
                for (start, _), frame in zip(windows[i:i + len(frames)], frames):
                    buf = io.BytesIO()
                    Image.fromarray(np.ascontiguousarray(frame[0])).save(buf, "JPEG", quality=self.quality)
                    rel = thumbnail_rel(self.version(), unit.video_id, float(start))
                    outputs[rel] = store.tmp_name(rel)
                    with store.fs.open(store.abs(outputs[rel]), "wb") as f:
                        f.write(buf.getvalue())
        except BaseException:  # a video that stops decoding half-way: no temporaries left behind
            for tmp in outputs.values():
                store.remove(tmp)
            raise
        stats = {"thumbnails": len(outputs)}
        store.commit(self.name, self.version(), unit.id, unit.fingerprint, outputs, stats)
        return stats
